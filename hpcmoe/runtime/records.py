"""What the steps made: rank 0's record of every step (mirrored on its deputy), and how a step's
records are written to the run file.

Separate from the loop so that the writer, its deputy and the recovery (which writes the mirrored
steps when the writer died) share one definition of a step's records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hpcmoe.runfile.output import RunWriter


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
    records: list | None = None  # (step, records, times) of every step: rank 0, its deputy

    @property
    def done(self) -> int:
        """Rank 0: the steps written."""
        return self.first + len(self.generated)

    def add(self, step: int, records: list, times: tuple[float, float], written_at: float) -> None:
        """A step's records (rank order) as rank 0 wrote them at `written_at`; times: (when the step
        began, when its tokens were held) on rank 0."""
        held_at = times[1]
        count = int(sum(len(record[0].token) for record in records))
        self.generated.append(count)
        if count:
            self.token_times.append(held_at)
        self.dropped += sum(record[2][2] for record in records)
        self.step_times[step] = written_at
        if self.records is not None:
            self.records.append((step, records, times))


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_step(writer: RunWriter, step: int, records: list, times: tuple[float, float]) -> None:
    """records: per rank (Events, logits [tokens, vocab] or None, (routing, traffic, dropped), timing
    rows); times: (when the step began, when its tokens were held) on rank 0's clock."""
    routing = np.stack([r[2][0] for r in records], axis=1)  # [moe_layers, ranks, experts]
    traffic = np.stack([r[2][1] for r in records], axis=1)  # [moe_layers, src, dst]
    writer.append_step(step, routing, traffic)
    writer.append_timings(np.concatenate([r[3] for r in records]))
    writer.take_tokens(step, [r[0] for r in records], [r[1] for r in records], *times)
