"""run.fault_tolerance: the survivors of a dead rank go on without it (ULFM).

With an MPI that implements ULFM (Open MPI 5 launched with `mpirun --with-ft ulfm`; `make ft`
installs one with pip) errors return instead of aborting. Every wait of a run tests its requests
(waits.wait_until), so the first survivor that meets the dead rank raises, and so does every
survivor waiting on a communicator it revokes: each survivor revokes every communicator of the
run (no one stays blocked), the world shrinks to the survivors and they agree on the step; the
engine (recovery.recover) then rebuilds the run among them and re-runs the steps not yet written,
or, when they cannot go on, writes a partial file (NAME.partial.h5, `/metrics/failures` saying who
died where) that `hpcmoe run ... --resume` continues. MPI finalization is skipped after a failure
(it can hang).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, NoReturn, Optional

EXIT_RANK_FAILED = 4  # the survivors of a dead rank could not go on (a partial file, unless the writers died)


@dataclass
class FaultState:
    """One run's fault state on this rank: the points at which it kills itself (run.kill, testing),
    the run's clock for the kill line, the communicators the run waits on (revoked after a failure,
    released when the run recovers or ends), and whether it went on after a dead rank (then MPI
    finalization is skipped)."""

    kills: frozenset = frozenset()  # (step, layer or -1, phase)
    clock: Optional[Callable[[], float]] = None  # seconds since the common start
    communicators: list = field(default_factory=list)
    recovered: bool = False

    @classmethod
    def of(cls, config, rank: int) -> FaultState:
        """This rank's kill points of config.run.kill (a layer counts only in the layer phases)."""
        from hpcmoe.config import LAYER_KILL_PHASES

        return cls(
            frozenset(
                (k.step, k.layer if k.phase in LAYER_KILL_PHASES else -1, k.phase)
                for k in config.run.kill or []
                if k.rank == rank
            )
        )

    def maybe_die(self, step: int, layer: int, phase: str) -> None:
        """run.kill: a process failure as a real one looks, SIGKILL, at a configured point. Its last
        line gives the time on the run's clock, from which recovery is measured (the survivors learn
        of the death only later: that detection latency is part of the recovery a user sees)."""
        from hpcmoe.config import LAYER_KILL_PHASES

        if self.kills and (step, layer if phase in LAYER_KILL_PHASES else -1, phase) in self.kills:
            at = f" at {self.clock():.6f} s on the run's clock" if self.clock is not None else ""
            sys.stderr.write(f"hpcmoe: killed (run.kill) in step {step} layer {layer} phase {phase}{at}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), 9)

    def track(self, comm):
        """Remember a communicator the run waits on (to revoke it after a failure); returns it."""
        self.communicators.append(comm)
        return comm

    def release(self) -> None:
        """The run ended, or its communicators were revoked: nothing of it is waited on any more."""
        self.communicators.clear()

    def survive(self, world):
        """Revoke everything and shrink to the survivors (the survivors then agree on the step: a
        death during that agreement is one more failure to survive, recovery.recover).
        -> (survivors' communicator, dead world ranks, the survivors' world ranks)."""
        from mpi4py import MPI

        for comm in self.communicators + [world]:
            try:
                comm.Revoke()
            except MPI.Exception:
                pass  # already revoked, or freed
        self.release()
        shrunk = world.Shrink()
        survivors = MPI.Group.Translate_ranks(
            shrunk.Get_group(), list(range(shrunk.Get_size())), world.Get_group()
        )
        dead = sorted(set(range(world.Get_size())) - set(survivors))
        return shrunk, dead, list(survivors)


def killed_at(stderr: str) -> list[float]:
    """The run-clock times of the kill lines (maybe_die) in a job's stderr, in order."""
    import re

    return [
        float(t)
        for t in re.findall(r"hpcmoe: killed \(run\.kill\) .* at ([0-9.]+) s on the run's clock", stderr)
    ]


def check_mpi() -> str | None:
    """None when this MPI survives a dead rank (ULFM enabled), else why not."""
    from mpi4py import MPI

    version = " ".join(MPI.Get_library_version().splitlines()[0].split())
    if "Open MPI" not in version:
        return (
            f"run.fault_tolerance needs an MPI with ULFM, this is {version}: run `make ft` and launch with "
            f".venv-ft/bin/mpirun --with-ft ulfm -n N .venv-ft/bin/hpcmoe run ..."
        )
    if os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true"):
        return f"run.fault_tolerance needs ULFM enabled at launch: mpirun --with-ft ulfm ... ({version})"
    return None


def is_failure(error: BaseException) -> bool:
    """A dead process, or a communicator another survivor revoked. Also the classes a dead peer
    shows up as where MPI does not name it: an error in one of several requests' statuses
    (ERR_IN_STATUS, ERR_PENDING), and ERR_OTHER from a collective whose peer died between its stages
    (Open MPI's bcast of a pickled object): the run's messages are well formed, so under fault
    tolerance these are a dead peer too. Recovery checks that someone did die (recovery.recover)."""
    from mpi4py import MPI

    classes = {
        MPI.ERR_PROC_FAILED,
        MPI.ERR_REVOKED,
        MPI.ERR_IN_STATUS,
        MPI.ERR_PENDING,
        MPI.ERR_OTHER,
        getattr(MPI, "ERR_PROC_FAILED_PENDING", MPI.ERR_PROC_FAILED),
    }
    return isinstance(error, MPI.Exception) and error.Get_error_class() in classes


@dataclass
class RankFailed(Exception):
    """Raised out of the step loop when a wait met a failure."""

    step: int
    where: object  # waits.Where of the wait that saw it (or None)
    detected_at: float  # seconds on the run's clock


def failure_rows(failures: list, step_times: dict) -> list:
    """(rank, step, layer, phase, detected_at, _, action, step resumed at) -> /metrics/failures rows,
    recovered_at = when the resumed step was done again (NaN when it never was)."""
    return [row[:5] + (step_times.get(row[7], float("nan")),) + row[6:7] for row in failures]


def leave(code: int) -> NoReturn:
    """Exit without MPI finalization (after a failure it can hang)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
