"""What the steps made: the record each rank sends rank 0 after a step and at the end, rank 0's
account of every step (mirrored on its deputy), and how a step's records are written to the run file.

Separate from the loop so that the writer, its deputy and the recovery (which writes the mirrored
steps when the writer died) share one definition of a step's records. Records cross MPI pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from hpcmoe.runfile.writer import RunWriter
from hpcmoe.runtime.batch import Events


@dataclass
class StepRecord:
    """What one rank sends rank 0 after a step."""

    events: (
        Events  # the tokens its requests made, the requests admitted (none on a rank that does not report)
    )
    logits: Optional[np.ndarray]  # [tokens made, vocab] with output.save_logits, else None
    routing: np.ndarray  # [moe_layers, experts] token slots this rank routed
    traffic: np.ndarray  # [moe_layers, original ranks] bytes it sent to each rank
    dropped: int  # token slots over capacity (parallel.capacity_factor)
    timings: np.ndarray  # the timer's rows since its last record

    def empty(self) -> StepRecord:
        """A dead rank's record after a recovery: nothing made, the same shapes."""
        return StepRecord(Events(), None, self.routing * 0, self.traffic * 0, 0, self.timings[:0])


@dataclass
class FinalRecord:
    """What one rank sends rank 0 at the end of the run."""

    peak_rss_bytes: int
    cache_digest: str  # sha256 over its requests' KV cache rows (Batch.cache_digest), "" when stopped
    weight_digests: list  # [switches] sha256 of its expert weights after each placement switch
    timings: np.ndarray  # the timer's rows since its last record

    def empty(self) -> FinalRecord:
        """A dead rank's final record."""
        return FinalRecord(0, "", [], self.timings[:0])


@dataclass
class WrittenStep:
    """A step as rank 0 wrote it (and sent it to its deputy), times on rank 0's clock."""

    step: int
    records: list  # [StepRecord] in original rank order
    started_at: float  # when the step began
    held_at: float  # when rank 0 held its tokens
    written_at: float  # when it was written

    def write(self, writer: RunWriter) -> None:
        """/routing, /traffic, /timings and the requests' tokens of this step."""
        routing = np.stack([r.routing for r in self.records], axis=1)  # [moe_layers, ranks, experts]
        traffic = np.stack([r.traffic for r in self.records], axis=1)  # [moe_layers, src, dst]
        writer.append_step(self.step, routing, traffic)
        writer.append_timings(np.concatenate([r.timings for r in self.records]))
        writer.take_tokens(
            self.step,
            [r.events for r in self.records],
            [r.logits for r in self.records],
            self.started_at,
            self.held_at,
        )


@dataclass
class Made:
    """What the steps made so far (rank 0's lists, mirrored on its deputy under run.fault_tolerance),
    kept across a recovery from a dead rank."""

    first: int = 0  # the step this run (or resume) began at
    token_times: list = field(default_factory=list)  # when rank 0 held each step's tokens (steps with tokens)
    generated: list = field(default_factory=list)  # tokens made per step from `first` on
    step_times: dict = field(default_factory=dict)  # step -> when rank 0 last finished it
    dropped: int = 0
    load_s: float = 0.0  # rank 0: process start to the common start
    runtime_bytes: int = 0  # rank 0's resident memory before the model is built
    records: Optional[list] = None  # [WrittenStep] of every step: rank 0, its deputy

    @property
    def done(self) -> int:
        """Rank 0: the steps written."""
        return self.first + len(self.generated)

    def add(self, written: WrittenStep) -> None:
        """A step's records as rank 0 wrote them."""
        count = int(sum(len(record.events.token) for record in written.records))
        self.generated.append(count)
        if count:
            self.token_times.append(written.held_at)
        self.dropped += sum(record.dropped for record in written.records)
        self.step_times[written.step] = written.written_at
        if self.records is not None:
            self.records.append(written)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
