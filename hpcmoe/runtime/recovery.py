"""ULFM recovery: after a dead rank the survivors shrink the world, agree on the step, rebuild the
layout and placement among themselves and go on, or stop with a partial file.

Separate from the generate loop, which only catches the failure and starts again on what this
module returns (fault.py holds the MPI side: revoking, shrinking, the kill points).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import torch

from hpcmoe.config import Config
from hpcmoe.parallel.layout import ParallelLayout
from hpcmoe.parallel.placement import Placement
from hpcmoe.runfile.output import RunWriter
from hpcmoe.runtime.fault import FaultState, RankFailed, is_failure
from hpcmoe.runtime.records import Made, peak_rss_bytes, write_step
from hpcmoe.runtime.run_file import finish, open_writer
from hpcmoe.runtime.topology import Topology


@dataclass
class Recovery:
    """What the survivors of a dead rank need to go on: the run as it started, and its failures."""

    config: Config
    original: Topology  # the world at the start (the run file's rank axes)
    placement: Placement  # the placement at the start (the run file's /placement)
    source: str
    device: torch.device
    max_batch: int
    resume: object  # the partial run this one resumed, or None
    fault: FaultState
    failures: list = field(default_factory=list)

    @property
    def capacity(self) -> int:
        """Expert slots a survivor may hold: the placement's most per rank, plus run.rebuild_slots."""
        p = self.placement
        return max(len(p.slots_of_rank(r)) for r in range(p.num_ranks)) + self.config.run.rebuild_slots


def building_failed(config: Config, error, made: Made, timer) -> RankFailed:
    """A failure met outside the step loop (its collectives: communicators, the common start), as
    the step loop would report it; any other error goes on up."""
    if not (config.run.fault_tolerance and is_failure(error)):
        raise error
    failed = RankFailed(made.done, getattr(error, "where", None), timer.now())
    failed.__cause__ = error
    return failed


def recover(
    recovery: Recovery,
    topo: Topology,
    layout,
    placement: Placement,
    writer,
    timer,
    made: Made,
    failed: RankFailed,
    survivors,
):
    """After a dead rank: shrink, agree, and rebuild the layout, topology and placement among the
    survivors, who continue every unfinished request from its prompt and the tokens made so far (rank 0's)
    and go on from the first step rank 0 has not written. Survivors keep their experts (an expert
    with a surviving replica is served by it); an expert that lost every replica is built on the
    survivor with the fewest slots (ep, or a MoE rank in ma); in ma a standby takes its dead
    primary's head shard. When rank 0 (the writer) died its deputy, the new rank 0, writes the file
    from the steps it mirrored. When the survivors cannot go on, the run stops (stop_after_failure).
    -> (topology, layout, placement, Survivors, Done, writer) of the survivors."""
    from mpi4py import MPI

    from hpcmoe.parallel.layout import MALayout
    from hpcmoe.parallel.placement import on_survivors
    from hpcmoe.runtime.fault import Survivors
    from hpcmoe.runtime.topology import build_topology

    config, original = recovery.config, recovery.original
    now = survivors.world_ranks if survivors is not None else tuple(range(topo.size))
    world, kept_now, dead, where = topo.world, list(range(topo.size)), [], failed.where
    row = lambda action: [
        (
            rank,
            step,
            getattr(where, "layer", -1),
            getattr(where, "phase", ""),
            failed.detected_at,
            timer.now(),
            action,
            made.done,
        )
        for rank in dead
    ]
    retrying = None
    while True:  # again when a rank dies during the recovery itself: survive among those left
        shrunk, dead_here, kept_here = recovery.fault.survive(world)
        if retrying is not None and not dead_here:  # an MPI error in the recovery, and no one else died
            raise retrying
        dead += [now[kept_now[r]] for r in dead_here]
        kept_now = [kept_now[r] for r in kept_here]  # this layout's ranks still alive
        kept = tuple(now[r] for r in kept_now)
        stop = lambda reason: stop_after_failure(
            recovery, shrunk, writer, timer, made, dead, step, kept, reason
        )
        try:
            step = shrunk.allreduce(failed.step, op=MPI.MIN)  # the earliest step any survivor failed in
            recovery.fault.maybe_die(step, -1, "recovery")  # testing: a second death, after the shrink
            moved = kept_now[0] != 0
            if moved and made.records is not None and shrunk.Get_rank() == 0 and writer is None:
                writer = take_over_writer(recovery, made, now[0])  # the writer died: its deputy takes over
            if moved and not shrunk.bcast(writer is not None if shrunk.Get_rank() == 0 else None, root=0):
                stop("")  # ... unless the deputy died too
            done = shrunk.bcast(made.done, root=0)
            progress = shrunk.bcast(
                writer.done() if writer is not None else None, root=0
            )  # what every request made
            new_topo = build_topology(shrunk, config.parallel.ranks_per_node)
            break
        except MPI.Exception as error:
            if not is_failure(error):
                raise
            world, retrying = shrunk, error
    if not dead:  # an error class taken for a dead peer (ERR_OTHER, ERR_PENDING) that was none: a real error
        raise failed.__cause__ or RuntimeError(f"an MPI failure in step {failed.step}, and no rank died")
    try:
        if isinstance(layout, MALayout):
            layout = layout.survivors(kept_now)
            hosts = range(layout.attention_ranks, layout.world_size)
        else:
            hosts = range(shrunk.Get_size())
        if placement.tp > 1:  # expert groups are formed afresh from the survivors (run.kill names original
            layout = ParallelLayout.from_config(  # ranks: it is not checked against the survivors)
                dataclasses.replace(config, run=dataclasses.replace(config.run, kill=None)), shrunk.Get_size()
            )
            broken = {placement.leader(r) for r in set(range(topo.size)) - set(kept_now)}
            lost = [e for e, holders in enumerate(placement.expert_ranks()) if set(holders) <= broken]
            placement = layout.placement(new_topo.node_of_rank)
        else:
            placement, lost = on_survivors(placement, kept_now, list(hosts), recovery.capacity)
    except ValueError as why:
        recovery.failures += row(f"stopped: {why}"[:96])
        stop(str(why))
    rebuilt = f"; rebuilt expert {','.join(map(str, lost))}" if lost else ""
    writer_moved = f"; rank {kept[0]} writes" if moved else ""
    recovery.failures += row(f"continued on {shrunk.Get_size()} ranks{rebuilt}{writer_moved}")
    recovery.fault.recovered = True
    if shrunk.Get_rank() == 0:
        sys.stderr.write(
            f"hpcmoe: rank(s) {', '.join(map(str, dead))} failed in step {step}: continuing on "
            f"{shrunk.Get_size()} ranks from step {done}{rebuilt}{writer_moved} (every unfinished "
            f"request prefilled again)\n"
        )
    return (new_topo, layout, placement, Survivors(kept, original.size), progress, writer)


def take_over_writer(recovery: Recovery, made: Made, dead_writer: int) -> RunWriter:
    """The deputy's run file: the steps rank 0 had mirrored to it, as rank 0 wrote them (the
    steps after those are done again)."""
    writer = open_writer(
        recovery.config,
        recovery.original,
        recovery.device,
        recovery.placement,
        recovery.source,
        recovery.resume,
        recovery.max_batch,
    )
    writer.file.attrs["writer_moved"] = (
        f"rank {dead_writer} died; steps before {made.done} as it mirrored them"
    )
    for step, records, times in made.records:
        write_step(writer, step, records, times)
    return writer


def stop_after_failure(
    recovery: Recovery,
    shrunk,
    writer,
    timer,
    made: Made,
    dead: list[int],
    step: int,
    kept: tuple,
    reason: str,
) -> NoReturn:
    """The survivors cannot go on: rank 0 writes the finished steps as a partial file (to --resume),
    or, when the writer and its deputy are dead, nothing claims completeness; every survivor exits
    EXIT_RANK_FAILED."""
    from hpcmoe.runtime.fault import EXIT_RANK_FAILED, Survivors, failure_rows, leave

    config, names = recovery.config, ", ".join(map(str, dead))
    if writer is None and shrunk.Get_rank() == 0:
        writer = take_over_writer(recovery, made, kept[0]) if made.records is not None else None
    if shrunk.bcast(writer is None if shrunk.Get_rank() == 0 else None, root=0):
        if shrunk.Get_rank() == 0:
            sys.stderr.write(
                f"hpcmoe: rank(s) {names} failed in step {step}, rank 0 (the writer) and its deputy "
                f"among them: the run stops without a file ({config.output.path}.tmp is incomplete)\n"
            )
        leave(EXIT_RANK_FAILED)
    done = shrunk.bcast(made.done, root=0)
    records = shrunk.gather(((peak_rss_bytes(), "", []), None, None, timer.take()), root=0)
    if shrunk.Get_rank() == 0:
        records = Survivors(kept, recovery.original.size).widen_final(records)
        metrics = finish(
            config,
            recovery.original,
            writer,
            records,
            made,
            done,
            True,
            failures=failure_rows(recovery.failures, {}),
        )  # no step was done again
        sys.stderr.write(
            f"hpcmoe: rank(s) {names} failed in step {step}; the survivors cannot go on ({reason}); "
            f"they wrote {metrics['path']} (steps 0..{done - 1}): continue with "
            f"`hpcmoe run ... --resume {metrics['path']}`\n"
        )
    # no survivor exits (non-zero: the launcher then kills the rest) before rank 0 wrote and said it
    shrunk.Barrier()
    leave(EXIT_RANK_FAILED)
