"""The generate loop: prefill, greedy decode, per-step records to rank 0, the run file.

The rank engines (ep.py, ma.py) compute one step of their share; this module builds them, the live
batch and the hooks after each step (hooks.py), starts every rank together (the common start
barrier) and runs the step loop (steps.py); after a dead rank (run.fault_tolerance) it builds them
again among the survivors (recovery.py). After each step the records go to rank 0, which appends
them to the run file. The clock that TTFT and TPOT read is rank 0's: the time at which it holds each
step's tokens, everything (records, HDF5 append, stop vote) included.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

import hpcmoe
from hpcmoe.config import Config
from hpcmoe.parallel.layout import ParallelLayout
from hpcmoe.parallel.placement import Placement
from hpcmoe.parallel.plan import process_bytes
from hpcmoe.runfile.timer import Timer
from hpcmoe.runtime.batch import Batch, batch_of
from hpcmoe.runtime.fault import FaultState, RankFailed, failure_rows
from hpcmoe.runtime.hooks import Mirror, Output, Progress, Records, RootGather, StopSignal
from hpcmoe.runtime.records import FinalRecord, Made, peak_rss_bytes
from hpcmoe.runtime.recovery import Ranks, Recovery, building_failed, recover
from hpcmoe.runtime.run_file import Ended, RunStart, finish, open_writer
from hpcmoe.runtime.steps import RankEngine, StepLoop
from hpcmoe.runtime.topology import Topology, keep_freed_memory
from hpcmoe.runtime.waits import wait_policy


def run(
    config: Config,
    topo: Topology,
    layout: ParallelLayout,
    load=None,
    routing=None,
    device: torch.device = torch.device("cpu"),
    resume=None,
    max_batch: int | None = None,
    fault: FaultState | None = None,
) -> dict:
    """Generate for every request of the config on `device`; rank 0 writes the run file. Returns the
    metrics. routing: an earlier run's /routing to place experts by (parallel.placement_from);
    resume: a partial run (hpcmoe.runtime.resume.Resume) to continue; max_batch: run.max_batch as the
    start-up check resolved it (default: run.max_batch, else every request of a rank at once); fault: the
    run's FaultState (default: this rank's run.kill points), read after the run for `recovered`."""
    config = config.on_device(device.type)
    max_batch = max_batch or config.run.max_batch or len(config.requests)
    fault = fault if fault is not None else FaultState.of(config, topo.rank)
    placement = layout.placement(topo.node_of_rank, routing)
    source = f"routing of {config.parallel.placement_from}" if routing is not None else "uniform"
    start = RunStart(config, topo, layout, placement, source, device, max_batch, resume, load, fault)
    writer = open_writer(start) if topo.rank == 0 else None
    try:
        return generate(start, writer)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise


def build_engine(
    config: Config, topo: Topology, layout, placement: Placement, timer: Timer, load, device, fault
) -> RankEngine:
    if config.parallel.layout == "ma":
        from hpcmoe.runtime.ma import ma_engine

        return ma_engine(config, topo, placement, timer, layout, load, device, fault)
    from hpcmoe.runtime.ep import EPEngine

    return EPEngine(config, topo, placement, timer, load, device=device, fault=fault)


def generate(start: RunStart, writer) -> dict:
    """Build this rank's engine and run every step; with run.fault_tolerance, after a dead rank the
    survivors rebuild everything among themselves and go on with the requests not finished."""
    from mpi4py import MPI

    from hpcmoe.runtime.device import Streams

    resume = start.resume
    # rows keep the original world rank
    timer = Timer(start.topo.rank, time.perf_counter(), Streams(start.device))
    made = Made(first=resume.step if resume is not None else 0, runtime_bytes=process_bytes())
    recovery, earlier = Recovery(start), resume.done if resume is not None else None
    ranks = Ranks(start.topo, start.layout, start.placement, writer, earlier)
    try:
        while True:
            try:
                stepping = Stepping.build(start, ranks, timer, made)
                done = stepping.loop.run()
                break
            except (RankFailed, MPI.Exception) as error:  # MPI.Exception: a death while the engine is built
                failed = (
                    error
                    if isinstance(error, RankFailed)
                    else building_failed(start.config, error, made, timer)
                )
                ranks = recover(recovery, ranks, timer, made, failed)
        stepping.close(done)
    except BaseException:
        if ranks.writer is not None and ranks.writer is not writer:
            ranks.writer.discard()
        raise
    records, history = stepping.final_records(done, timer)
    start.fault.release()  # the run's communicators are freed
    if records is None:
        return {}
    if ranks.survivors is not None:
        records = ranks.survivors.widen(records)
    failures = failure_rows(recovery.failures, made.step_times)
    return finish(start, ranks.writer, made, Ended(records, done, stepping.stop.signalled, history, failures))


@dataclass
class Stepping:
    """What this rank steps with, built on the ranks of the start or on the survivors of a failure."""

    engine: RankEngine
    batch: Batch
    gather: RootGather
    stop: StopSignal
    progress: Optional[Progress]  # rank 0's
    mirror: Optional[Mirror]  # run.fault_tolerance: rank 0's records to its deputy
    loop: StepLoop

    @classmethod
    def build(cls, start: RunStart, ranks: Ranks, timer, made: Made) -> Stepping:
        """The engine, the live batch and the hooks after each step (collective); on the ranks of the
        start, the common start too."""
        config, topo, fault = start.config, ranks.topo, start.fault
        policy = wait_policy(config, topo)  # the engine's: this topology's
        mirror = (
            Mirror(topo.world, made, policy)
            if config.run.fault_tolerance or ranks.survivors is not None
            else None
        )
        if ranks.survivors is not None:  # after a recovery: the (maybe new) deputy mirrors rank 0
            mirror.hand_over(topo.world)
        engine_config = dataclasses.replace(
            config, run=dataclasses.replace(config.run, max_batch=start.max_batch)
        )
        engine = build_engine(
            engine_config, topo, ranks.layout, ranks.placement, timer, start.load, start.device, fault
        )
        keep_freed_memory()  # from here: the build's large temporaries went back to the kernel
        batch = batch_of(config, engine, start.max_batch, ranks.earlier)
        gather, stop = RootGather(topo.world, timer, policy), StopSignal(topo.world, timer, fault, policy)
        progress = (
            Progress(len(config.requests), ranks.writer, made, ranks.earlier) if topo.rank == 0 else None
        )
        if ranks.survivors is None:
            start_together(start, timer, made)
        records = Records(gather, ranks.writer, made, fault, engine.reports, ranks.survivors)
        output = Output(timer, [hook for hook in (records, mirror, progress) if hook is not None])
        first = made.done if ranks.survivors is not None else made.first
        loop = StepLoop(config, engine, timer, batch, first, [output, *engine.step_hooks(), stop])
        return cls(engine, batch, gather, stop, progress, mirror, loop)

    def close(self, done: int) -> None:
        """After the last step: the last vote read, the last progress line, the deputy up to date."""
        self.stop.close(done)
        if self.progress is not None:
            self.progress.update(done - 1, last=True)
        if self.mirror is not None:
            self.mirror.close(done, done)

    def final_records(self, done: int, timer) -> tuple[Optional[list], list]:
        """Every rank's FinalRecord to rank 0 (None elsewhere), then the engine is closed.
        -> (records in current rank order, the placement switches)."""
        history = self.engine.placement_history()
        final = FinalRecord(
            peak_rss_bytes(), self.batch.cache_digest(), [s.digest for s in history], timer.take()
        )
        records = self.gather(final, done)
        self.gather.close(done)
        self.engine.close()
        return records, history


def start_together(start: RunStart, timer, made: Made) -> None:
    """The common start: every timing row and TTFT count from here."""
    if start.device.type != "cpu":
        # the model and cache are in place before the clock starts
        torch.accelerator.synchronize(start.device)
    start.topo.world.Barrier()
    timer.restart(time.perf_counter())
    made.load_s = time.time() - hpcmoe.STARTED
    start.fault.clock = timer.now
