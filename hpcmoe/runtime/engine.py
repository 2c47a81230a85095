"""The generate loop: prefill, greedy decode, per-step records to rank 0, the run file.

The rank engines (ep.py, ma.py) compute one step of their share; this loop builds them, starts
every rank together (the common start barrier), and after each step gathers the records to
rank 0, which appends them to the run file. The clock that TTFT and TPOT read is rank 0's: the
time at which it holds each step's tokens, everything (records, HDF5 append, stop vote) included.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import torch

import hpcmoe
from hpcmoe.config import LAYER_KILL_PHASES, Config
from hpcmoe.model.attention import StepInputs
from hpcmoe.model.transformer import rotate_skew
from hpcmoe.parallel.layout import ParallelLayout
from hpcmoe.parallel.placement import Placement
from hpcmoe.parallel.plan import process_bytes, rank_estimates
from hpcmoe.runfile.output import (
    RunWriter,
    Timer,
    busy_and_idle,
    compute_metrics,
    file_loads,
    previous_imbalance,
    rank_load_imbalance,
    request_metrics,
    run_attrs,
    step_imbalance,
)
from hpcmoe.runtime import tags
from hpcmoe.runtime.comm import Where, wait_all, wait_until
from hpcmoe.runtime.fault import (
    CLOCK,
    KILL,
    RECOVERED,
    RankFailed,
    failure_rows,
    is_failure,
    maybe_die,
    track,
)
from hpcmoe.runtime.topology import STOP_REQUESTED, Topology, keep_freed_memory, listen_for_stop


class RootGather:
    """Per-step records from every rank to rank 0 with Isend and matched probes (no collective)."""

    def __init__(self, comm, timer: Timer):
        self.comm, self.timer, self.pending = comm, timer, []

    def __call__(self, record, step: int):
        comm, where = self.comm, Where(step, -1, 0, "record_wait")
        if comm.Get_rank() != 0:
            with self.timer.phase("record_wait", step):
                wait_all(self.pending, where)  # the previous record is out: one in flight at most
            self.pending = [comm.isend(record, dest=0, tag=tags.RECORD)]
            return None
        records = [record]
        for source in range(1, comm.Get_size()):
            found = comm.improbe(source=source, tag=tags.RECORD)
            if found is None:
                with self.timer.phase("record_wait", step):

                    def arrived() -> bool:
                        nonlocal found
                        found = comm.improbe(source=source, tag=tags.RECORD)
                        return found is not None

                    wait_until(arrived, where.waiting_for("record_wait", (source,)))
            records.append(found.recv())
        return records

    def close(self, step: int):
        wait_all(self.pending, Where(step, -1, 0, "record_wait"))


class StopSignal:
    """The ranks agree to stop: a stop signal (SIGUSR1, SIGTERM) may reach them at different steps,
    and each rank knows only whether its own requests have all ended. At every step boundary each
    rank posts (stop asked, requests left) in a non-blocking reduction (on a communicator of its
    own) and reads the reduction posted one boundary earlier, which has completed in the background
    meanwhile. Every rank reads the same result at the same boundary, so all stop after the same
    step, and no step waits for a vote in the common case."""

    def __init__(self, world, timer: Timer):
        self.comm, self.timer, self.request = track(world.Dup()), timer, None
        self.flags, self.anyone = np.zeros(2, dtype=int), np.zeros(2, dtype=int)
        self.signalled = False
        listen_for_stop()  # in-process callers did not go through init_mpi

    def agreed(self, step: int, requests_left: bool = True, at_once: bool = False) -> bool:
        """True when the ranks stop after this step: asked to by a signal (then `signalled`), or
        every request on every rank has ended. at_once: wait for this boundary's own vote (after
        the prefill, whose length dwarfs it, so that a signal during the prefill stops right there)."""
        from mpi4py import MPI

        if self.request is not None:
            self.finish_vote(step)
            if self.decided():
                return True
        self.flags[:] = int(STOP_REQUESTED[0]), int(requests_left)
        self.request = self.comm.Iallreduce(self.flags, self.anyone, op=MPI.MAX)
        if at_once:
            self.finish_vote(step)
            return self.decided()
        return False

    def decided(self) -> bool:
        self.signalled = bool(self.anyone[0])
        return self.signalled or not self.anyone[1]

    def finish_vote(self, step: int) -> None:
        if not self.request.Test():
            with self.timer.phase("stop_wait", step):
                wait_all([self.request], Where(step, -1, 0, "stop_wait"))
        self.request = None

    def close(self, step: int):
        if self.request is not None:  # every rank posted the same votes: the last completes everywhere
            self.finish_vote(step)
        STOP_REQUESTED[0] = False
        self.comm.Free()


class Progress:
    """Rank 0's progress: requests done of all, generated tokens/s and the time left, on one line
    redrawn on a terminal, or a plain line every EVERY_S seconds in a batch log."""

    EVERY_S = 5.0

    def __init__(self, total: int, earlier=None):
        self.total, self.tty = total, sys.stderr.isatty()
        self.before = int(earlier.finished.sum()) if earlier is not None else 0  # ended in an earlier run
        self.started, self.shown = time.monotonic(), 0.0

    def update(self, step: int, writer: RunWriter, made: Made, last: bool = False) -> None:
        now = time.monotonic()
        if not last and now - self.shown < (0.5 if self.tty else self.EVERY_S):
            return
        self.shown, elapsed = now, max(now - self.started, 1e-9)
        done = int(writer.finished.sum())
        rate = (done - self.before) / elapsed
        left = f"{(self.total - done) / rate:.0f} s left" if rate > 0 and done < self.total else "-"
        line = (
            f"requests {done}/{self.total} | {sum(made.generated) / elapsed:.1f} generated tok/s | "
            f"step {step + 1} | {elapsed:.0f} s | {left}"
        )
        sys.stderr.write(f"\r{line:<90}" + ("\n" if last else "") if self.tty else f"hpcmoe: {line}\n")
        sys.stderr.flush()


def run(
    config: Config,
    topo: Topology,
    layout: ParallelLayout,
    load=None,
    routing=None,
    device: torch.device = torch.device("cpu"),
    resume=None,
    max_batch: int | None = None,
) -> dict:
    """Generate for every request of the config on `device`; rank 0 writes the run file. Returns the
    metrics. routing: an earlier run's /routing to place experts by (parallel.placement_from);
    resume: a partial run (hpcmoe.runtime.workload.Resume) to continue; max_batch: run.max_batch as the
    start-up check resolved it (default: run.max_batch, else every request of a rank at once)."""
    rank = topo.rank
    config = config.on_device(device.type)
    max_batch = max_batch or config.run.max_batch or len(config.requests)
    KILL[:] = [
        (k.step, k.layer if k.phase in LAYER_KILL_PHASES else -1, k.phase)
        for k in config.run.kill or []
        if k.rank == rank
    ]
    placement = layout.placement(topo.node_of_rank, routing)
    source = f"routing of {config.parallel.placement_from}" if routing is not None else "uniform"
    writer = open_writer(config, topo, device, placement, source, resume, max_batch) if rank == 0 else None
    try:
        metrics = generate(config, topo, layout, placement, source, writer, load, device, resume, max_batch)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return metrics


def open_writer(
    config: Config, topo: Topology, device, placement: Placement, source: str, resume=None, max_batch: int = 0
) -> RunWriter:
    """The run file with its /placement (the run's first), and what the run it resumes finished (on
    rank 0, or its deputy)."""
    m = config.model
    attrs = run_attrs(
        config,
        topo.node_of_rank,
        topo.ranks_per_node,
        device.type,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        max_batch,
    )
    if resume is not None:
        attrs.update(resumed_from=os.path.abspath(resume.path), resumed_at_step=resume.step)
    writer = RunWriter(
        config.output.path,
        attrs,
        config.requests,
        config.steps,
        m.vocab,
        m.moe_layers,
        topo.size,
        m.num_experts,
        config.output.save_logits,
        m.checkpoint,
    )
    writer.write_placement(placement.expert_ranks(), m.moe_layers, placement.mode, source, placement.tp)
    if resume is not None:  # the finished steps, as the stopped run wrote them
        writer.write_finished_steps(resume)
    return writer


def build_engine(config: Config, topo: Topology, layout, placement: Placement, timer: Timer, load, device):
    if config.parallel.layout == "ma":
        from hpcmoe.runtime.ma import ma_engine

        return ma_engine(config, topo, placement, timer, layout, load, device)
    from hpcmoe.runtime.ep import EPEngine

    return EPEngine(config, topo, placement, timer, load, device=device)


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


class Mirror:
    """run.fault_tolerance: rank 0 sends each step's records to rank 1, its deputy, which keeps the
    same Made. When rank 0 dies, the deputy is the survivors' new rank 0: it opens the run file,
    writes the steps it holds and the run goes on (the writer role moves)."""

    def __init__(self, comm, made: Made):
        self.comm, self.made, self.pending = comm, made, []
        self.rank = comm.Get_rank() if comm.Get_size() > 1 else -1  # one rank: nothing to mirror
        if self.rank in (0, 1) and made.records is None:
            made.records = []

    def send(self, entry: tuple) -> None:
        """Rank 0: (step, records, (started_at, held_at), written_at) to the deputy."""
        if self.rank == 0:
            self.pending = [request for request in self.pending if not request.Test()]
            self.pending.append(self.comm.isend(entry, dest=1, tag=tags.MIRROR))

    def receive(self) -> None:
        """The deputy: every entry that has arrived (never waits)."""
        while self.rank == 1 and (found := self.comm.improbe(source=0, tag=tags.MIRROR)) is not None:
            self.made.add(*found.recv())

    def close(self, done: int, step: int) -> None:
        where = Where(step, -1, 0, "record_wait")
        if self.rank == 0:
            wait_all(self.pending, where)
        elif self.rank == 1:
            wait_until(lambda: self.receive() or self.made.done >= done, where)

    def hand_over(self, comm) -> None:
        """After a recovery: rank 0's Made to the (maybe new) deputy, rank 1."""
        if comm.Get_size() > 1 and comm.Get_rank() in (0, 1):
            made = comm.sendrecv(
                self.made if comm.Get_rank() == 0 else None,
                dest=1 - comm.Get_rank(),
                source=1 - comm.Get_rank(),
            )
            if comm.Get_rank() == 1:
                vars(self.made).update(vars(made))


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
    failures: list = field(default_factory=list)

    @property
    def capacity(self) -> int:
        """Expert slots a survivor may hold: the placement's most per rank, plus run.rebuild_slots."""
        p = self.placement
        return max(len(p.slots_of_rank(r)) for r in range(p.num_ranks)) + self.config.run.rebuild_slots


def generate(
    config: Config,
    topo: Topology,
    layout,
    placement: Placement,
    source: str,
    writer,
    load,
    device,
    resume=None,
    max_batch: int = 1,
) -> dict:
    """Build this rank's engine and run every step; with run.fault_tolerance, after a dead rank the
    survivors rebuild everything among themselves and go on with the requests not finished."""
    from mpi4py import MPI

    from hpcmoe.runtime.device import Streams

    timer = Timer(topo.rank, time.perf_counter(), Streams(device))  # rows keep the original world rank
    made, survivors = (
        Made(first=resume.step if resume is not None else 0, runtime_bytes=process_bytes()),
        None,
    )
    recovery = Recovery(config, topo, placement, source, device, max_batch, resume)
    mirror = Mirror(topo.world, made) if config.run.fault_tolerance else None
    given = writer
    engine_config = dataclasses.replace(config, run=dataclasses.replace(config.run, max_batch=max_batch))
    earlier = resume.done if resume is not None else None
    requests = config.requests
    longest = int((requests.prompt_lengths + requests.max_new_tokens).max())
    try:
        while True:
            try:
                if survivors is not None:  # after a recovery: the (maybe new) deputy mirrors rank 0
                    mirror = Mirror(topo.world, made)
                    mirror.hand_over(topo.world)
                engine = build_engine(engine_config, topo, layout, placement, timer, load, device)
                keep_freed_memory()  # from here: the build's large temporaries went back to the kernel
                new_rows = lambda n: engine.new_cache(n, longest)
                cache = new_rows(0)
                state = batch_of(config, engine, requests, new_rows, cache, max_batch, earlier)
                gather, stop = RootGather(topo.world, timer), StopSignal(topo.world, timer)
                progress = Progress(len(requests), earlier) if topo.rank == 0 else None
                if survivors is None:
                    if device.type != "cpu":
                        torch.accelerator.synchronize(
                            device
                        )  # the model and cache are in place before the clock starts
                    topo.world.Barrier()  # the common start: every timing row and TTFT count from here
                    timer.restart(time.perf_counter())
                    made.load_s = time.time() - hpcmoe.STARTED
                    CLOCK[0] = timer.now
                done = run_steps(
                    config, engine, timer, state, gather, writer, progress, stop, made, survivors, mirror
                )
                break
            except (RankFailed, MPI.Exception) as error:  # MPI.Exception: a death while the engine is built
                failed = (
                    error if isinstance(error, RankFailed) else building_failed(config, error, made, timer)
                )
                topo, layout, placement, survivors, earlier, writer = recover(
                    recovery, topo, layout, placement, writer, timer, made, failed, survivors
                )
        stop.close(done)
        if progress is not None:
            progress.update(done - 1, writer, made, last=True)
        if mirror is not None:
            mirror.close(done, done)
    except BaseException:
        if writer is not None and writer is not given:
            writer.discard()
        raise
    history = engine.rebalancer.history if getattr(engine, "rebalancer", None) is not None else []
    records = gather(
        ((peak_rss_bytes(), state.cache_digest(), [s.digest for s in history]), None, None, timer.take()),
        done,
    )
    gather.close(done)
    engine.close()
    if records is None:
        return {}
    if survivors is not None:
        records = survivors.widen_final(records)
    return finish(
        config,
        recovery.original,
        writer,
        records,
        made,
        done,
        stop.signalled,
        history,
        failure_rows(recovery.failures, made.step_times),
    )


def building_failed(config: Config, error, made: Made, timer) -> RankFailed:
    """A failure met outside the step loop (its collectives: communicators, the common start), as
    the step loop would report it; any other error goes on up."""
    if not (config.run.fault_tolerance and is_failure(error)):
        raise error
    failed = RankFailed(made.done, getattr(error, "where", None), timer.now())
    failed.__cause__ = error
    return failed


def batch_of(config: Config, engine, requests, new_rows, cache, max_batch: int, earlier) -> "Batch":
    """This rank's Batch: the requests its engine serves (every attention group's in turn, in file
    order), the checkpoint's end-of-sequence tokens when requests stop at them."""
    from hpcmoe.workload import eos_ids

    r = config.run
    stop_at_eos = r.stop_at_eos if r.stop_at_eos is not None else bool(config.model.checkpoint)
    return Batch(
        requests,
        engine.requests(len(requests)),
        eos_ids(config.model.checkpoint) if stop_at_eos else (),
        new_rows,
        cache,
        r.batching,
        max_batch,
        r.prefill_chunk,
        earlier,
    )


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
    from hpcmoe.runtime.fault import Survivors, survive
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
        shrunk, dead_here, kept_here = survive(world)
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
            maybe_die(step, -1, "recovery")  # testing: a second death, after the shrink
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
    RECOVERED[0] = True
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
    shrunk.Barrier()  # no survivor exits (non-zero: the launcher then kills the rest) before rank 0 wrote and said it
    leave(EXIT_RANK_FAILED)


class Row:
    """A live request: its cache row holds `cached` positions; `todo` are the tokens it feeds before it
    chooses its next token (the rest of its prompt, or its last token); `take` of them this step."""

    def __init__(self, index: int, request_id: str, todo: list[int], made: int, limit: int):
        self.index, self.id, self.todo, self.made, self.limit, self.take = (
            index,
            request_id,
            todo,
            made,
            limit,
            0,
        )


@dataclass
class Events:
    """What a rank's requests did in one step: the tokens made (request index, token, and the
    finish reason, "" while it goes on) and the requests admitted."""

    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    token: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reason: list = field(default_factory=list)
    admitted: list = field(default_factory=list)


class Batch:
    """A rank's requests as they generate (continuous batching). Requests join in file order while
    the batch has fewer than max_batch: with run.batching=continuous as soon as a slot frees, their
    prompts prefilled in chunks inside the decode steps (at most run.prefill_chunk prompt tokens a
    step, a row already in prefill first, at least one token each); with static, a whole batch at
    once when the last one has ended, each prompt in one pass. A request leaves when it reaches its
    max_new_tokens or, with run.stop_at_eos, makes an end-of-sequence token (kept as its last);
    its KV cache rows are freed. Every decision reads only this rank's own requests and tokens, so
    the ranks of an attention group (ma), which see the same tokens, decide the same."""

    def __init__(
        self,
        source,
        mine,
        eos: tuple[int, ...],
        new_rows,
        cache,
        batching: str,
        max_batch: int,
        prefill_chunk: int,
        earlier=None,
    ):
        """source: the run's requests (len, [i]); mine: the indices this rank serves, in file order;
        new_rows(n): n empty KV cache rows, one list per layer; earlier: the Done (workload) of a stopped
        run or of the steps before a recovery (finished requests skipped, the others continued)."""
        self.source, self.eos, self.new_rows, self.cache = source, set(eos), new_rows, cache
        self.static, self.max_batch, self.chunk = batching == "static", max_batch, prefill_chunk
        self.earlier = earlier
        self.waiting = (i for i in mine if earlier is None or not earlier.finished[i])
        self.next = next(self.waiting, None)
        self.rows: list[Row] = []
        self.cached = torch.zeros(0, dtype=torch.int64)  # positions in the cache, per row
        self.digests: dict[int, bytes] = {}  # sha256 of the KV cache rows of each request that left

    @property
    def busy(self) -> bool:
        """Requests live or still to come on this rank."""
        return bool(self.rows) or self.next is not None

    @property
    def busy_after_next(self) -> bool:
        """Requests live or to come after the next step (False when every live request surely ends
        in it by its token limit), so that the ranks' lagged stop vote ends the run without an
        empty step."""
        return self.next is not None or any(
            len(row.todo) > 1 or row.made + 1 < row.limit for row in self.rows
        )

    def inputs(self, device) -> tuple[StepInputs, list[int]]:
        """Admit what fits, then share out this step's tokens -> (the step's inputs, admitted indices)."""
        budget = float("inf") if self.static else self.chunk
        for row in self.rows:
            row.take = 1 if len(row.todo) == 1 else max(1, min(len(row.todo), budget))
            budget -= row.take if len(row.todo) > 1 else 0
        joining = []
        room = self.max_batch - len(self.rows) if not self.static or not self.rows else 0
        while len(joining) < room and self.next is not None and budget > 0:
            request = self.source[self.next]
            made = self.earlier.partial.get(self.next, []) if self.earlier is not None else []
            row = Row(
                self.next,
                request.id,
                list(request.prompt_ids) + list(made),
                len(made),
                request.max_new_tokens,
            )
            row.take = min(len(row.todo), budget)
            budget -= row.take
            joining.append(row)
            self.next = next(self.waiting, None)
        if joining:
            for layer, new in zip(self.cache, self.new_rows(len(joining))):
                for part, rows in zip(layer, new):
                    part.data = torch.cat([part.data, rows.data])
            self.rows += joining
            self.cached = torch.cat([self.cached, torch.zeros(len(joining), dtype=torch.int64)])
        return StepInputs.build([row.todo[: row.take] for row in self.rows], self.cached, device), [
            row.index for row in joining
        ]

    def positions(self) -> list[int]:
        """The index, within its request, of the token each row chooses this step (seeds sampling)."""
        return [row.made for row in self.rows]

    def advance(self, chosen: np.ndarray) -> tuple[Events, list[int]]:
        """chosen: [rows] this step's tokens (read for the rows whose prompt is all in) -> (the step's
        events, the rows that made a token); the requests that ended leave the batch."""
        self.cached += torch.tensor([row.take for row in self.rows], dtype=torch.int64)
        events, made, keep = Events(), [], []
        index, tokens = [], []
        for r, row in enumerate(self.rows):
            del row.todo[: row.take]
            if row.todo:  # its prompt goes on in the next step
                keep.append(r)
                continue
            token = int(chosen[r])
            row.made += 1
            made.append(r)
            index.append(row.index)
            tokens.append(token)
            reason = "eos" if token in self.eos else "length" if row.made >= row.limit else ""
            events.reason.append(reason)
            if reason:
                self.digests[row.index] = row_digest(self.cache, r)
            else:
                row.todo = [token]
                keep.append(r)
        events.index, events.token = np.array(index, np.int64), np.array(tokens, np.int64)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[r] for r in keep]
            self.cached = self.cached[keep]
            keep_cache_rows(self.cache, keep)
        return events, made

    def cache_digest(self) -> str:
        """sha256 over every request's KV cache rows in request order (those of requests that left
        the batch taken as they left): replicas that must agree bit for bit can be compared."""
        import hashlib

        digest = hashlib.sha256()
        live = {row.index: r for r, row in enumerate(self.rows)}
        for i in sorted(set(self.digests) | set(live)):
            digest.update(self.digests[i] if i in self.digests else row_digest(self.cache, live[i]))
        return digest.hexdigest()


def row_digest(cache, row: int) -> bytes:
    import hashlib

    digest = hashlib.sha256()
    for layer in cache:
        for part in layer:
            digest.update(part.data[row].contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.digest()


def keep_cache_rows(cache, rows: list[int]) -> None:
    """Keep only these rows of every layer's KV cache (in this order); the others' memory is freed."""
    index = torch.tensor(rows, dtype=torch.int64)
    for layer in cache:
        for part in layer:
            part.data = part.data.index_select(0, index.to(part.data.device))


def run_steps(
    config,
    engine,
    timer,
    state: Batch,
    gather,
    writer,
    progress,
    stop,
    made: Made,
    survivors=None,
    mirror=None,
) -> int:
    """Step until every request of every rank has ended, or until the ranks agree to stop; resumed
    (or after a recovery), from the step the run stopped at. Rank 0 keeps what the steps made in
    `made` and writes each request as it ends; survivors (after a recovery) widen the records to
    the original ranks. -> the steps done."""
    from hpcmoe.workload import choose

    r = config.run
    sampling = r.sampling if r.sampling is not None and r.sampling.temperature > 0 else None
    step = first = made.done if survivors is not None else made.first
    rebalancer = getattr(engine, "rebalancer", None)
    try:
        while True:
            engine.step, engine.prefill = (
                step,
                step == first,
            )  # every live request's prompt (again) in the first
            if r.skew_drift:
                rotate_skew(engine.model, step // r.skew_drift)
            if r.signal_at_step == step and engine.topo.rank == engine.topo.size - 1:
                os.kill(
                    os.getpid(), signal.SIGUSR1
                )  # testing: a stop signal to one rank, as Slurm would send
            stats = engine.new_stats()
            started_at = timer.now()
            with timer.phase("step", step):
                inputs, admitted = state.inputs(engine.device)
                chosen, logits = engine.forward(inputs, state.cache, stats)
            if (
                sampling is not None
            ):  # needs every logit: drawn on the host, the same on every rank that holds them
                logits = logits.cpu()
                chosen = choose(logits.numpy(), [row.id for row in state.rows], state.positions(), sampling)
            else:
                chosen = chosen.cpu().numpy()  # the step's one wait
            logits = logits.cpu().numpy() if config.output.save_logits and logits is not None else None
            events, rows = state.advance(chosen)
            events.admitted = admitted
            with timer.phase("output", step):
                if not engine.reports:
                    events, logits = Events(), None
                elif logits is not None:
                    logits = logits[rows]
                routing, traffic = stats.routing.cpu().numpy(), stats.traffic
                if survivors is not None:
                    traffic = survivors.widen_traffic(traffic)
                record = (events, logits, (routing, traffic, int(stats.dropped)), timer.take())
                maybe_die(step, -1, "record")
                records = gather(record, step)
                if records is not None:
                    if survivors is not None:
                        records = survivors.widen_steps(records)
                    times = (started_at, timer.now())  # rank 0 holds this step's tokens
                    write_step(writer, step, records, times)
                    entry = (step, records, times, timer.now())
                    made.add(*entry)
                    if mirror is not None:
                        mirror.send(entry)
                    progress.update(step, writer, made)
                elif mirror is not None:
                    mirror.receive()
            if rebalancer is not None:
                rebalancer.after_step(step, routing)
            step += 1
            # the vote posted now is read at the next boundary (at once after the first step): so it
            # says whether this rank still has requests after the next step
            at_once = step - 1 == first
            maybe_die(step - 1, -1, "stop_vote")
            if stop.agreed(
                step - 1, requests_left=state.busy if at_once else state.busy_after_next, at_once=at_once
            ):
                return step
            maybe_die(step - 1, -1, "between_steps")
    except Exception as error:  # noqa: BLE001 (a dead rank, under run.fault_tolerance: the survivors go on)
        if r.fault_tolerance and is_failure(error):
            raise RankFailed(engine.step, getattr(error, "where", None), timer.now()) from error
        raise


def finish(
    config, topo, writer, records, made: Made, done: int, signalled: bool, history=(), failures=()
) -> dict:
    """Rank 0: metrics over the steps this run did (a resumed run: those after it resumed), then the
    file is complete, or partial (NAME.partial.h5) when a signal stopped it after `done` steps (its
    live requests written with finish reason `stop`, to continue)."""
    writer.append_timings(np.concatenate([r[3] for r in records]))
    writer.write()
    timings = writer.file["timings"][:]
    metrics, spans = compute_metrics(
        np.array(made.token_times),
        int(config.requests.prompt_lengths.sum()),
        np.array([g for g in made.generated if g]),
    )
    writer.stop_live(done - 1, made.token_times[-1] if made.token_times else 0.0)
    writer.write_requests(config)
    rows = writer.file["requests"]
    ended = rows["finish_reason"][:] != b"stop"
    metrics["prompt_tokens_per_s"] = int(config.requests.prompt_lengths.sum()) / metrics["total_s"]
    metrics.update(
        wall_s=metrics["total_s"], load_s=made.load_s, wall_with_load_s=made.load_s + metrics["total_s"]
    )
    metrics.update(
        request_metrics(
            rows["ttft_s"][:][ended],
            (rows["finished_at"][:] - rows["admitted_at"][:])[ended],
            np.array([len(c) for c in rows["completion_ids"][:][ended]]),
            metrics["total_s"],
        )
    )
    first_tokens = writer.file["requests/first_token_at"][:]
    if (
        len(first_tokens) and first_tokens.max() > first_tokens.min()
    ):  # prompts were prefilled all through the
        metrics["prefill_tokens_per_s"] = (
            int(config.requests.prompt_lengths.sum()) / metrics["total_s"]
        )  # run
    per_rank = busy_and_idle(timings, topo.size)
    metrics["idle_fraction"] = float(per_rank["idle_fraction_per_rank"].mean())
    metrics["busy_fraction"] = float(per_rank["busy_fraction_per_rank"].mean())
    per_rank["peak_rss_bytes"] = np.array([r[0][0] for r in records], np.int64)
    per_rank["memory_estimate_bytes"] = rank_estimates(
        config, topo.size, int(writer.file.attrs["max_batch"]), made.runtime_bytes
    )
    metrics["memory_estimate_bytes"] = int(per_rank["memory_estimate_bytes"].max())
    metrics["peak_over_estimate"] = float(
        (per_rank["peak_rss_bytes"] / per_rank["memory_estimate_bytes"]).max()
    )
    if config.parallel.layout == "ma":
        attention = config.parallel.attention_ranks
        for name in ("busy", "idle"):
            values = per_rank[f"{name}_fraction_per_rank"]
            metrics[f"{name}_fraction_attention"] = float(values[:attention].mean())
            metrics[f"{name}_fraction_moe"] = float(values[attention:].mean())
        metrics["peak_rss_bytes_attention"] = int(per_rank["peak_rss_bytes"][:attention].max())
        metrics["peak_rss_bytes_moe"] = int(per_rank["peak_rss_bytes"][attention:].max())
    if config.parallel.rebalance is not None:
        writer.write_placement_history(history, [r[0][2] for r in records], done)
        metrics["placement_switches"] = len(history)
    loads = file_loads(writer.file, done)  # [steps, moe_layers, places] on the placements in force
    metrics["rank_load_max_over_mean"] = rank_load_imbalance(loads)
    metrics["rank_load_max_over_mean_per_step"] = step_imbalance(loads)
    metrics["dropped_token_slots"] = made.dropped
    if config.parallel.placement_from:  # the load balance before this placement, for comparison
        metrics["placement_from_rank_load_max_over_mean"] = previous_imbalance(config.parallel.placement_from)
    per_rank["kv_cache_digest"] = np.array([r[0][1] for r in records], dtype="S64")
    per_rank["token_time_s"] = np.array(made.token_times)
    if signalled:
        metrics["stopped_at_step"] = done
    metrics["path"] = writer.finish(metrics, spans, per_rank, complete=not signalled, failures=failures)
    return metrics


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
