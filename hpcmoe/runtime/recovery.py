"""ULFM recovery: after a dead rank the survivors shrink the world, agree on the step, rebuild the
layout and placement among themselves and go on, or stop with a partial file.

Separate from the generate loop, which only catches the failure and starts again on the Ranks this
module returns (fault.py holds the MPI side: revoking, shrinking, the kill points).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import NoReturn, Optional

import numpy as np

from hpcmoe.config import Config
from hpcmoe.parallel.layout import ParallelLayout
from hpcmoe.parallel.placement import Placement
from hpcmoe.runfile.writer import RunWriter
from hpcmoe.runtime.fault import EXIT_RANK_FAILED, RankFailed, failure_rows, is_failure, leave
from hpcmoe.runtime.records import FinalRecord, Made, peak_rss_bytes
from hpcmoe.runtime.run_file import Ended, RunStart, finish, open_writer
from hpcmoe.runtime.topology import Topology


@dataclass(frozen=True)
class Survivors:
    """After a recovery: the original world rank of each current rank; records and traffic are
    widened back to the original ranks (the dead ones' entries empty) so the run file keeps its axes."""

    world_ranks: tuple[int, ...]
    world_size: int

    def widen_traffic(self, traffic: np.ndarray) -> np.ndarray:
        """[moe_layers, current ranks] -> [moe_layers, original ranks]."""
        wide = np.zeros((traffic.shape[0], self.world_size), traffic.dtype)
        wide[:, list(self.world_ranks)] = traffic
        return wide

    def widen(self, records: list) -> list:
        """Records (records.StepRecord or FinalRecord) in current rank order -> in original rank
        order, empty ones for the dead ranks."""
        wide = [records[0].empty()] * self.world_size
        for rank, record in zip(self.world_ranks, records):
            wide[rank] = record
        return wide


@dataclass
class Ranks:
    """The ranks the steps run on: those of the start, or the survivors after a recovery."""

    topo: Topology
    layout: ParallelLayout
    placement: Placement
    writer: Optional[RunWriter]  # rank 0's (the deputy's, once the writer died); None elsewhere
    earlier: object = None  # workload.Done: what the requests made before (a resumed run, or a recovery)
    survivors: Optional[Survivors] = None  # after a recovery


@dataclass
class Recovery:
    """What the survivors of a dead rank need to go on: the run as it started, and its failures."""

    start: RunStart
    failures: list = field(default_factory=list)  # (rank, step, layer, phase, detected_at, _, action, done)

    @property
    def capacity(self) -> int:
        """Expert slots a survivor may hold: the placement's most per rank, plus run.rebuild_slots."""
        p = self.start.placement
        return max(len(p.slots_of_rank(r)) for r in range(p.num_ranks)) + self.start.config.run.rebuild_slots


@dataclass
class Agreed:
    """What the survivors agreed on after a failure."""

    comm: object  # the survivors' communicator
    now: tuple  # the original rank of each rank of the layout that failed
    dead: list  # original ranks, in the order their deaths were seen
    kept_now: list  # the failed layout's ranks still alive
    writer: Optional[RunWriter]
    step: int  # the earliest step any survivor failed in
    done: int = 0  # the steps rank 0 (or the deputy) has written
    earlier: object = None  # workload.Done: what every request made
    topo: Optional[Topology] = None  # the survivors' topology

    @property
    def kept(self) -> tuple:
        """The survivors' original ranks."""
        return tuple(self.now[r] for r in self.kept_now)

    @property
    def moved(self) -> bool:
        """The writer (the layout's rank 0) died."""
        return self.kept_now[0] != 0


def building_failed(config: Config, error, made: Made, timer) -> RankFailed:
    """A failure met outside the step loop (its collectives: communicators, the common start), as
    the step loop would report it; any other error goes on up."""
    if not (config.run.fault_tolerance and is_failure(error)):
        raise error
    failed = RankFailed(made.done, getattr(error, "where", None), timer.now())
    failed.__cause__ = error
    return failed


def recover(recovery: Recovery, ranks: Ranks, timer, made: Made, failed: RankFailed) -> Ranks:
    """After a dead rank: shrink, agree, and rebuild the layout, topology and placement among the
    survivors, who continue every unfinished request from its prompt and the tokens made so far (rank
    0's) and go on from the first step rank 0 has not written. Survivors keep their experts (an expert
    with a surviving replica is served by it); an expert that lost every replica is built on the
    survivor with the fewest slots (ep, or a MoE rank in ma); in ma a standby takes its dead
    primary's head shard. When rank 0 (the writer) died its deputy, the new rank 0, writes the file
    from the steps it mirrored. When the survivors cannot go on, the run stops (stop_after_failure)."""
    agreed = agree(recovery, ranks, timer, made, failed)
    if not agreed.dead:  # an error class taken for a dead peer (ERR_OTHER, ERR_PENDING) that was none
        raise failed.__cause__ or RuntimeError(f"an MPI failure in step {failed.step}, and no rank died")
    layout, placement, lost = rebuild(recovery, ranks, agreed, timer, made, failed)
    size = agreed.comm.Get_size()
    rebuilt = f"; rebuilt expert {','.join(map(str, lost))}" if lost else ""
    writer_moved = f"; rank {agreed.kept[0]} writes" if agreed.moved else ""
    recovery.failures += dead_rows(
        agreed, failed, timer, made, f"continued on {size} ranks{rebuilt}{writer_moved}"
    )
    recovery.start.fault.recovered = True
    if agreed.comm.Get_rank() == 0:
        sys.stderr.write(
            f"hpcmoe: rank(s) {', '.join(map(str, agreed.dead))} failed in step {agreed.step}: continuing on "
            f"{size} ranks from step {agreed.done}{rebuilt}{writer_moved} (every unfinished "
            f"request prefilled again)\n"
        )
    survivors = Survivors(agreed.kept, recovery.start.topo.size)
    return Ranks(agreed.topo, layout, placement, agreed.writer, agreed.earlier, survivors)


def agree(recovery: Recovery, ranks: Ranks, timer, made: Made, failed: RankFailed) -> Agreed:
    """Shrink to the survivors and agree on the step, the writer (its deputy takes over when it died)
    and what every request made; again when a rank dies during this (survive among those left)."""
    from mpi4py import MPI

    from hpcmoe.runtime.topology import build_topology

    fault, topo = recovery.start.fault, ranks.topo
    now = ranks.survivors.world_ranks if ranks.survivors is not None else tuple(range(topo.size))
    world, kept_now, dead, writer, retrying = topo.world, list(range(topo.size)), [], ranks.writer, None
    while True:
        shrunk, dead_here, kept_here = fault.survive(world)
        if retrying is not None and not dead_here:  # an MPI error in the recovery, and no one else died
            raise retrying
        dead += [now[kept_now[r]] for r in dead_here]
        kept_now = [kept_now[r] for r in kept_here]  # this layout's ranks still alive
        agreed = Agreed(shrunk, now, dead, kept_now, writer, failed.step)
        root = shrunk.Get_rank() == 0
        try:
            # the earliest step any survivor failed in
            agreed.step = shrunk.allreduce(failed.step, op=MPI.MIN)
            fault.maybe_die(agreed.step, -1, "recovery")  # testing: a second death, after the shrink
            if agreed.moved and made.records is not None and root and writer is None:
                writer = agreed.writer = take_over_writer(recovery, made, now[0])  # the writer died
            if agreed.moved and not shrunk.bcast(writer is not None if root else None, root=0):
                stop_after_failure(recovery, agreed, timer, made, "")  # ... and so did its deputy
            agreed.done = shrunk.bcast(made.done, root=0)
            agreed.earlier = shrunk.bcast(writer.done() if writer is not None else None, root=0)
            agreed.topo = build_topology(shrunk, recovery.start.config.parallel.ranks_per_node)
            return agreed
        except MPI.Exception as error:
            if not is_failure(error):
                raise
            world, retrying = shrunk, error


def rebuild(recovery: Recovery, ranks: Ranks, agreed: Agreed, timer, made: Made, failed: RankFailed):
    """The survivors' layout and placement -> (layout, placement, experts that lost every replica);
    the run stops when they do not fit."""
    from hpcmoe.parallel.layout import MALayout
    from hpcmoe.parallel.placement import on_survivors

    config, layout, placement, size = (
        recovery.start.config,
        ranks.layout,
        ranks.placement,
        agreed.comm.Get_size(),
    )
    try:
        if isinstance(layout, MALayout):
            layout = layout.survivors(agreed.kept_now)
            hosts = range(layout.attention_ranks, layout.world_size)
        else:
            hosts = range(size)
        if placement.tp > 1:  # expert groups are formed afresh from the survivors (run.kill names original
            layout = ParallelLayout.from_config(  # ranks: it is not checked against the survivors)
                dataclasses.replace(config, run=dataclasses.replace(config.run, kill=None)), size
            )
            broken = {placement.leader(r) for r in set(range(ranks.topo.size)) - set(agreed.kept_now)}
            lost = [e for e, holders in enumerate(placement.expert_ranks()) if set(holders) <= broken]
            return layout, layout.placement(agreed.topo.node_of_rank), lost
        placement, lost = on_survivors(placement, agreed.kept_now, list(hosts), recovery.capacity)
        return layout, placement, lost
    except ValueError as why:
        recovery.failures += dead_rows(agreed, failed, timer, made, f"stopped: {why}"[:96])
        stop_after_failure(recovery, agreed, timer, made, str(why))


def dead_rows(agreed: Agreed, failed: RankFailed, timer, made: Made, action: str) -> list:
    """Recovery.failures rows of the dead ranks: (rank, step, layer, phase, detected_at, now, action,
    the step the survivors go on from)."""
    where = failed.where
    layer, phase = getattr(where, "layer", -1), getattr(where, "phase", "")
    return [
        (rank, agreed.step, layer, phase, failed.detected_at, timer.now(), action, made.done)
        for rank in agreed.dead
    ]


def take_over_writer(recovery: Recovery, made: Made, dead_writer: int) -> RunWriter:
    """The deputy's run file: the steps rank 0 had mirrored to it, as rank 0 wrote them (the
    steps after those are done again)."""
    writer = open_writer(recovery.start)
    writer.file.attrs["writer_moved"] = (
        f"rank {dead_writer} died; steps before {made.done} as it mirrored them"
    )
    for written in made.records:
        written.write(writer)
    return writer


def stop_after_failure(recovery: Recovery, agreed: Agreed, timer, made: Made, reason: str) -> NoReturn:
    """The survivors cannot go on: rank 0 writes the finished steps as a partial file (to --resume),
    or, when the writer and its deputy are dead, nothing claims completeness; every survivor exits
    EXIT_RANK_FAILED."""
    start, comm, writer = recovery.start, agreed.comm, agreed.writer
    names, step = ", ".join(map(str, agreed.dead)), agreed.step
    if writer is None and comm.Get_rank() == 0:
        writer = take_over_writer(recovery, made, agreed.kept[0]) if made.records is not None else None
    if comm.bcast(writer is None if comm.Get_rank() == 0 else None, root=0):
        if comm.Get_rank() == 0:
            sys.stderr.write(
                f"hpcmoe: rank(s) {names} failed in step {step}, rank 0 (the writer) and its deputy "
                f"among them: the run stops without a file ({start.config.output.path}.tmp is incomplete)\n"
            )
        leave(EXIT_RANK_FAILED)
    done = comm.bcast(made.done, root=0)
    records = comm.gather(FinalRecord(peak_rss_bytes(), "", [], timer.take()), root=0)
    if comm.Get_rank() == 0:
        records = Survivors(agreed.kept, start.topo.size).widen(records)
        failures = failure_rows(recovery.failures, {})  # no step was done again
        metrics = finish(start, writer, made, Ended(records, done, True, failures=failures))
        sys.stderr.write(
            f"hpcmoe: rank(s) {names} failed in step {step}; the survivors cannot go on ({reason}); "
            f"they wrote {metrics['path']} (steps 0..{done - 1}): continue with "
            f"`hpcmoe run ... --resume {metrics['path']}`\n"
        )
    # no survivor exits (non-zero: the launcher then kills the rest) before rank 0 wrote and said it
    comm.Barrier()
    leave(EXIT_RANK_FAILED)
