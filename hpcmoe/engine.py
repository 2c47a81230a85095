"""The generate loop: prefill, greedy decode, per-step records to rank 0, the run file.

The rank engines (ep.py, ma.py) compute one step of their share; this loop builds them, starts
every rank together (the common start barrier), and after each step gathers the records to
rank 0, which appends them to the run file. The clock that TTFT and TPOT read is rank 0's: the
time at which it holds each step's tokens, everything (records, HDF5 append, stop vote) included.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from hpcmoe import __version__
from hpcmoe.attention import StepInputs
from hpcmoe.comm import Where, wait_all, wait_until
from hpcmoe.config import Config
from hpcmoe.layout import ParallelLayout
from hpcmoe.output import (RunWriter, Timer, busy_and_idle, compute_metrics, previous_imbalance,
                           rank_load_imbalance)
from hpcmoe.placement import Placement
from hpcmoe.topology import STOP_REQUESTED, Topology, listen_for_stop

RECORD_TAG = 7  # per-step records to rank 0 (MoE exchanges use tags >= 100)


class RootGather:
    """Per-step records from every rank to rank 0 with Isend and matched probes (no collective)."""

    def __init__(self, comm, timer: Timer):
        self.comm, self.timer, self.pending = comm, timer, []

    def __call__(self, record, step: int):
        comm, where = self.comm, Where(step, -1, 0, "record_wait")
        if comm.Get_rank() != 0:
            with self.timer.phase("record_wait", step):
                wait_all(self.pending, where)  # the previous record is out: one in flight at most
            self.pending = [comm.isend(record, dest=0, tag=RECORD_TAG)]
            return None
        records = [record]
        for source in range(1, comm.Get_size()):
            found = comm.improbe(source=source, tag=RECORD_TAG)
            if found is None:
                with self.timer.phase("record_wait", step):
                    def arrived() -> bool:
                        nonlocal found
                        found = comm.improbe(source=source, tag=RECORD_TAG)
                        return found is not None

                    wait_until(arrived, where.waiting_for("record_wait", (source,)))
            records.append(found.recv())
        return records

    def close(self, step: int):
        wait_all(self.pending, Where(step, -1, 0, "record_wait"))


class StopSignal:
    """The ranks agree to stop: SIGUSR1 may reach them at different steps, so at every step boundary
    each rank posts its flag in a non-blocking reduction (on a communicator of its own) and reads
    the reduction posted one boundary earlier, which has completed in the background meanwhile.
    Every rank reads the same result at the same boundary, so all stop after the same step, one
    step after the signal, and no step waits for a vote in the common case."""

    def __init__(self, world, timer: Timer):
        self.comm, self.timer, self.request = world.Dup(), timer, None
        self.flag, self.anyone = np.zeros(1, dtype=int), np.zeros(1, dtype=int)
        listen_for_stop()  # in-process callers did not go through init_mpi

    def agreed(self, step: int) -> bool:
        from mpi4py import MPI
        if self.request is not None:
            self.finish_vote(step)
            if self.anyone[0]:
                return True
        self.flag[0] = int(STOP_REQUESTED[0])
        self.request = self.comm.Iallreduce(self.flag, self.anyone, op=MPI.MAX)
        return False

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
    """Rank 0's progress: a bar on a terminal, a plain line now and then under a batch system."""

    def __init__(self, steps: int):
        self.steps, self.tty = steps, sys.stderr.isatty()

    def update(self, step: int, seconds: float):
        done = step + 1
        kind = "prefill" if step == 0 else "decode"
        if self.tty:
            bar = "#" * (30 * done // self.steps)
            sys.stderr.write(f"\r[{bar:<30}] step {done}/{self.steps} {kind} {1e3 * seconds:.1f} ms")
            sys.stderr.write("\n" if done == self.steps else "")
        elif step % -(-self.steps // 10) == 0 or done == self.steps:
            sys.stderr.write(f"hpcmoe: step {done}/{self.steps} ({kind}) {1e3 * seconds:.1f} ms\n")
        sys.stderr.flush()


def run(config: Config, topo: Topology, layout: ParallelLayout, load=None, routing=None,
        device: torch.device = torch.device("cpu")) -> dict:
    """Generate for every request of the config on `device`; rank 0 writes the run file. Returns the
    metrics. routing: an earlier run's /routing to place experts by (parallel.placement_from)."""
    rank, size = topo.rank, topo.size
    config = config.on_device(device.type)
    placement = layout.placement(topo.node_of_rank, routing)
    source = f"routing of {config.parallel.placement_from}" if routing is not None else "uniform"
    prompts = config.prompts
    steps, model_cfg = config.run.max_new_tokens, config.model
    writer = None
    if rank == 0:
        attrs = {"config": config.to_yaml(), "hpcmoe_version": __version__, "world_size": size,
                 "ranks_per_node": topo.ranks_per_node, "num_nodes": topo.num_nodes,
                 "node_of_rank": np.array(topo.node_of_rank, np.int64),
                 "layout": config.parallel.layout, "device": device.type,
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        writer = RunWriter(config.output.path, attrs, prompts, steps, model_cfg.vocab, model_cfg.moe_layers,
                           size, model_cfg.num_experts, config.output.save_logits)
    try:
        metrics = generate(config, topo, layout, placement, source, prompts, writer, load, device)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return metrics


def build_engine(config: Config, topo: Topology, layout, placement: Placement, timer: Timer, load, device):
    if config.parallel.layout == "ma":
        from hpcmoe.ma import ma_engine
        return ma_engine(config, topo, placement, timer, layout, load, device)
    from hpcmoe.ep import EPEngine
    return EPEngine(config, topo, placement, timer, load, device=device)


def generate(config: Config, topo: Topology, layout, placement: Placement, source: str,
             prompts: list[list[int]], writer, load, device) -> dict:
    from hpcmoe.device import Streams
    rank, steps, model_cfg = topo.rank, config.run.max_new_tokens, config.model
    timer = Timer(rank, time.perf_counter(), Streams(device))
    engine = build_engine(config, topo, layout, placement, timer, load, device)
    if writer is not None:
        writer.write_placement(placement.expert_ranks(), model_cfg.moe_layers, placement.mode, source)
    local = [prompts[i] for i in engine.requests(len(prompts))]
    cache = engine.new_cache(len(local), max(map(len, prompts)) + steps)
    gather, progress = RootGather(topo.world, timer), Progress(steps) if rank == 0 else None
    stop = StopSignal(topo.world, timer)
    if device.type != "cpu":
        torch.accelerator.synchronize(device)  # the model and cache are in place before the clock starts
    topo.world.Barrier()  # the common start: every timing row and TTFT count from here
    timer.restart(time.perf_counter())
    done, token_times, dropped = run_steps(config, topo, engine, timer, cache, local, writer, gather, progress, stop)
    stop.close(done)
    records = gather(((peak_rss_bytes(), cache_digest(cache)), None, None, timer.take()), done)
    gather.close(done)
    engine.close()
    if records is None:
        return {}
    return finish(config, topo, writer, records, prompts, token_times, dropped)


def run_steps(config, topo, engine, timer, cache, local, writer, gather, progress, stop):
    """Prefill and decode until max_new_tokens, or until the ranks agree to stop.

    -> (steps done, rank 0's token times [steps done] in seconds since the start, dropped token slots)."""
    steps = config.run.max_new_tokens
    cached = torch.zeros(len(local), dtype=torch.int64)
    new_tokens, dropped, token_times = local, 0, []
    for step in range(steps):
        engine.step = step
        stats = engine.new_stats()
        with timer.phase("step", step):
            inputs = StepInputs.build(new_tokens, cached, engine.device)
            chosen, logits = engine.forward(inputs, cache, stats)
        cached += inputs.lengths
        chosen = chosen.cpu()  # the step's one wait
        logits = logits.cpu() if config.output.save_logits and logits is not None else None
        new_tokens = [[t] for t in chosen.tolist()]
        with timer.phase("output", step):
            reported = slice(None) if engine.reports else slice(0)
            record = (chosen[reported].numpy(), logits[reported].numpy() if logits is not None else None,
                      (stats.routing.cpu().numpy(), stats.traffic, int(stats.dropped)), timer.take())
            records = gather(record, step)
            if records is not None:
                token_times.append(timer.now())  # rank 0 holds this step's tokens
                write_step(writer, step, records)
                dropped += sum(r[2][2] for r in records)
                progress.update(step, token_times[-1] - (token_times[-2] if step else 0.0))
        if step + 1 < steps and stop.agreed(step):
            return step + 1, token_times, dropped
    return steps, token_times, dropped


def finish(config, topo, writer, records, prompts, token_times: list[float], dropped: int) -> dict:
    """Rank 0: metrics over the steps done, then the file is complete (or partial when stopped early)."""
    writer.append_timings(np.concatenate([r[3] for r in records]))
    writer.write()
    timings = writer.file["timings"][:]
    done = len(token_times)
    metrics, spans = compute_metrics(np.array(token_times), sum(map(len, prompts)), len(prompts))
    per_rank = busy_and_idle(timings, topo.size)
    metrics["idle_fraction"] = float(per_rank["idle_fraction_per_rank"].mean())
    metrics["busy_fraction"] = float(per_rank["busy_fraction_per_rank"].mean())
    per_rank["peak_rss_bytes"] = np.array([r[0][0] for r in records], np.int64)
    if config.parallel.layout == "ma":
        attention = config.parallel.attention_ranks
        for name in ("busy", "idle"):
            values = per_rank[f"{name}_fraction_per_rank"]
            metrics[f"{name}_fraction_attention"] = float(values[:attention].mean())
            metrics[f"{name}_fraction_moe"] = float(values[attention:].mean())
        metrics["peak_rss_bytes_attention"] = int(per_rank["peak_rss_bytes"][:attention].max())
        metrics["peak_rss_bytes_moe"] = int(per_rank["peak_rss_bytes"][attention:].max())
    metrics["rank_load_max_over_mean"] = rank_load_imbalance(writer.file["traffic"][:done])
    metrics["dropped_token_slots"] = dropped
    if config.parallel.placement_from:  # the load balance before this placement, for comparison
        metrics["placement_from_rank_load_max_over_mean"] = previous_imbalance(config.parallel.placement_from)
    per_rank["kv_cache_digest"] = np.array([r[0][1] for r in records], dtype="S64")
    per_rank["token_time_s"] = np.array(token_times)
    stopped = done < config.run.max_new_tokens
    if stopped:
        metrics["stopped_at_step"] = done
    metrics["path"] = writer.finish(metrics, spans, per_rank, complete=not stopped)
    return metrics


def cache_digest(cache) -> str:
    """sha256 of this rank's whole KV cache: replicas that must agree bit for bit can be compared."""
    import hashlib
    digest = hashlib.sha256()
    for layer in cache:
        for part in layer:
            digest.update(part.data.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_step(writer: RunWriter, step: int, records: list) -> None:
    """records: per rank (tokens [b_r], logits [b_r, vocab] or None, (routing, traffic, dropped), timing rows)."""
    tokens = np.concatenate([r[0] for r in records])
    logits = np.concatenate([r[1] for r in records if r[1] is not None]) if records[0][1] is not None else None
    routing = np.stack([r[2][0] for r in records], axis=1)   # [moe_layers, ranks, experts]
    traffic = np.stack([r[2][1] for r in records], axis=1)   # [moe_layers, src, dst]
    writer.append_step(step, tokens, logits, routing, traffic)
    writer.append_timings(np.concatenate([r[3] for r in records]))
