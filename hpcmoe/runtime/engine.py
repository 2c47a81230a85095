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
import time

import torch

import hpcmoe
from hpcmoe.config import Config
from hpcmoe.model.transformer import rotate_skew
from hpcmoe.parallel.layout import ParallelLayout
from hpcmoe.parallel.placement import Placement
from hpcmoe.parallel.plan import process_bytes
from hpcmoe.runfile.output import Timer
from hpcmoe.runtime.batch import Batch, Events, batch_of
from hpcmoe.runtime.fault import FaultState, RankFailed, failure_rows, is_failure
from hpcmoe.runtime.hooks import Mirror, Progress, RootGather, StopSignal
from hpcmoe.runtime.records import Made, peak_rss_bytes, write_step
from hpcmoe.runtime.recovery import Recovery, building_failed, recover
from hpcmoe.runtime.run_file import finish, open_writer
from hpcmoe.runtime.topology import Topology, keep_freed_memory


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
    resume: a partial run (hpcmoe.runtime.workload.Resume) to continue; max_batch: run.max_batch as the
    start-up check resolved it (default: run.max_batch, else every request of a rank at once); fault: the
    run's FaultState (default: this rank's run.kill points), read after the run for `recovered`."""
    rank = topo.rank
    config = config.on_device(device.type)
    max_batch = max_batch or config.run.max_batch or len(config.requests)
    fault = fault if fault is not None else FaultState.of(config, rank)
    placement = layout.placement(topo.node_of_rank, routing)
    source = f"routing of {config.parallel.placement_from}" if routing is not None else "uniform"
    writer = open_writer(config, topo, device, placement, source, resume, max_batch) if rank == 0 else None
    try:
        metrics = generate(
            config, topo, layout, placement, source, writer, load, device, resume, max_batch, fault
        )
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return metrics


def build_engine(
    config: Config, topo: Topology, layout, placement: Placement, timer: Timer, load, device, fault
):
    if config.parallel.layout == "ma":
        from hpcmoe.runtime.ma import ma_engine

        return ma_engine(config, topo, placement, timer, layout, load, device, fault)
    from hpcmoe.runtime.ep import EPEngine

    return EPEngine(config, topo, placement, timer, load, device=device, fault=fault)


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
    fault: FaultState | None = None,
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
    fault = fault if fault is not None else FaultState()
    recovery = Recovery(config, topo, placement, source, device, max_batch, resume, fault)
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
                engine = build_engine(engine_config, topo, layout, placement, timer, load, device, fault)
                keep_freed_memory()  # from here: the build's large temporaries went back to the kernel
                new_rows = lambda n: engine.new_cache(n, longest)
                cache = new_rows(0)
                state = batch_of(config, engine, requests, new_rows, cache, max_batch, earlier)
                gather, stop = RootGather(topo.world, timer), StopSignal(topo.world, timer, fault)
                progress = Progress(len(requests), earlier) if topo.rank == 0 else None
                if survivors is None:
                    if device.type != "cpu":
                        torch.accelerator.synchronize(
                            device
                        )  # the model and cache are in place before the clock starts
                    topo.world.Barrier()  # the common start: every timing row and TTFT count from here
                    timer.restart(time.perf_counter())
                    made.load_s = time.time() - hpcmoe.STARTED
                    fault.clock = timer.now
                done = run_steps(
                    config,
                    engine,
                    timer,
                    state,
                    gather,
                    writer,
                    progress,
                    stop,
                    made,
                    fault,
                    survivors,
                    mirror,
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
    fault.release()  # the run's communicators are freed
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
    fault: FaultState,
    survivors=None,
    mirror=None,
) -> int:
    """Step until every request of every rank has ended, or until the ranks agree to stop; resumed
    (or after a recovery), from the step the run stopped at. Rank 0 keeps what the steps made in
    `made` and writes each request as it ends; survivors (after a recovery) widen the records to
    the original ranks. -> the steps done."""
    from hpcmoe.runtime.workload import choose

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
                fault.maybe_die(step, -1, "record")
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
            fault.maybe_die(step - 1, -1, "stop_vote")
            if stop.agreed(
                step - 1, requests_left=state.busy if at_once else state.busy_after_next, at_once=at_once
            ):
                return step
            fault.maybe_die(step - 1, -1, "between_steps")
    except Exception as error:  # noqa: BLE001 (a dead rank, under run.fault_tolerance: the survivors go on)
        if r.fault_tolerance and is_failure(error):
            raise RankFailed(engine.step, getattr(error, "where", None), timer.now()) from error
        raise
