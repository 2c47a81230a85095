"""The generate loop of the ep layout: prefill, greedy decode, per-step records to rank 0.

Each rank runs attention and dense layers for its own contiguous block of requests and hosts
its experts of every MoE layer. A step splits the rank's requests into `run.micro_batches`
micro-batches; each is a generator that computes and yields what it waits for (`Pending`), and
one scheduler resumes whichever micro-batch can go on, so the exchange of one overlaps the
compute of another, across layers, with no whole-batch barrier. When none can go on, the
scheduler sleeps in comm.wait_until, the one place a rank waits.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from hpcmoe import __version__
from hpcmoe.attention import StepInputs
import hpcmoe.comm
from hpcmoe import moe_layer
from hpcmoe.comm import Link, Sender, Where, wait_all, wait_until
from hpcmoe.config import Config
from hpcmoe.layout import ParallelLayout, request_range
from hpcmoe.model import Transformer, build_model
from hpcmoe.output import (RunWriter, Timer, compute_metrics, overlap_and_busy, previous_imbalance,
                           rank_load_imbalance)
from hpcmoe.placement import Placement
from hpcmoe.topology import STOP_REQUESTED, Topology, listen_for_stop

RECORD_TAG = 7  # per-step records to rank 0 (MoE exchanges use tags >= 100)


@dataclass
class StepStats:
    routing: np.ndarray  # [moe_layers, experts] token slots this rank sent to each expert
    traffic: np.ndarray  # [moe_layers, ranks] payload bytes this rank sent to each rank
    dropped: int = 0     # token slots over capacity (parallel.capacity_factor)


def run_concurrently(generators: list, timer: Timer, step: int, sender: Sender) -> list:
    """Drive micro-batch generators to completion; -> their return values in order."""
    results, waiting = [None] * len(generators), {i: None for i in range(len(generators))}
    while waiting:
        progressed = False
        for i in sorted(waiting):
            pending = waiting[i]
            got = None if pending is None else pending.poll()
            if pending is None or got is not None:
                try:
                    waiting[i] = generators[i].send(got)
                except StopIteration as finished:
                    results[i] = finished.value
                    del waiting[i]
                progressed = True
        sender.test()
        if waiting and not progressed:  # nothing can run: sleep until something arrives
            first = waiting[min(waiting)]
            with timer.phase(first.where.phase, step, first.where.layer, first.where.micro_batch):
                wait_until(lambda: any(p.poll() is not None for p in waiting.values()), first.missing)
    return results


class EPEngine:
    """One rank's share of the model and the schedule that runs it."""

    def __init__(self, config: Config, topo: Topology, placement: Placement, timer: Timer, load=None):
        self.config, self.topo, self.placement, self.timer = config, topo, placement, timer
        self.comm, self.rank = topo.world, topo.rank
        self.my_experts = placement.experts_of_rank(self.rank)
        self.model: Transformer = build_model(config.model, self.my_experts, load)
        link = config.parallel.link
        self.link = Link(topo.node_of_rank, link.bandwidth_gbps if link else None, link.latency_us if link else 0.0)
        self.sender = Sender(self.comm, self.link)
        hpcmoe.comm.SPIN = config.parallel.wait == "spin"  # one policy per process
        hpcmoe.comm.WATCHDOG_S = config.run.timeout_s
        self.micro_batches = config.run.micro_batches
        self.exchange = moe_layer.two_stage if config.parallel.dispatch == "two_stage" else moe_layer.flat
        self.peers = list(range(topo.size))  # the ranks this one exchanges tokens with
        self.reports = True                  # whether this rank's tokens go into the run file
        self.stalled = False                 # run.stall_rank has slept already
        self.step = 0

    def requests(self, batch: int) -> range:
        """The requests this rank computes: a contiguous block."""
        return request_range(batch, self.topo.size, self.rank)

    def new_cache(self, batch: int, max_len: int):
        return self.model.new_cache(batch, max_len)

    @torch.no_grad()
    def forward(self, inputs: StepInputs, cache, stats: StepStats) -> torch.Tensor:
        """One step for this rank's requests: [b, t] tokens -> [b, vocab] float32 logits."""
        b = inputs.tokens.shape[0]
        blocks = [request_range(b, self.micro_batches, i) for i in range(self.micro_batches)]
        generators = [self.forward_micro_batch(i, inputs.rows(r.start, r.stop),
                                               [[c.rows(r.start, r.stop) for c in layer] for layer in cache], stats)
                      for i, r in enumerate(blocks)]
        logits = run_concurrently(generators, self.timer, self.step, self.sender)
        self.sender.wait(Where(self.step, -1, 0, "send_wait"))
        return torch.cat(logits)

    def forward_micro_batch(self, mb: int, inputs: StepInputs, cache, stats: StepStats):
        """Generator: one micro-batch through every layer; yields Pending, returns [b_mb, vocab] logits."""
        phase, model, step = self.timer.phase, self.model, self.step
        with phase("embed", step, micro_batch=mb):
            x = model.embed_tokens(inputs.tokens)
        for layer, (block, layer_cache) in enumerate(zip(model.layers, cache)):
            self.maybe_fail(layer)
            with phase("attention", step, layer, mb):
                x = block.attend(x, layer_cache, inputs)
                h = block.post_attention_layernorm(x)[inputs.valid]
            if block.is_moe:
                out = yield from self.exchange(self, block.mlp, layer, mb, h, stats)
            else:
                with phase("mlp", step, layer, mb):
                    out = block.mlp(h)
            x[inputs.valid] += out
        with phase("lm_head", step, micro_batch=mb):
            return model.logits(x, inputs)

    def maybe_stall(self):
        """run.stall_rank: sleep (far past the watchdog) before the first dispatch of step 0."""
        if self.config.run.stall_rank == self.rank and self.step == 0 and not self.stalled:
            self.stalled = True
            time.sleep(4 * self.config.run.timeout_s)

    def maybe_fail(self, layer: int):
        run = self.config.run
        if run.fail_rank == self.rank and run.fail_at_layer == layer and run.fail_at_step == self.step:
            raise RuntimeError(f"injected failure (run.fail_rank={self.rank}) at step {self.step} layer {layer}")


class RootGather:
    """Per-step records from every rank to rank 0 with Isend and matched probes (no collective)."""

    def __init__(self, comm):
        self.comm, self.pending = comm, []

    def __call__(self, record, where: Where):
        comm = self.comm
        if comm.Get_rank() != 0:
            wait_all(self.pending, where)  # the previous record is out: one in flight at most
            self.pending = [comm.isend(record, dest=0, tag=RECORD_TAG)]
            return None
        records = [record]
        for source in range(1, comm.Get_size()):
            found = []

            def arrived() -> bool:
                found.append(comm.improbe(source=source, tag=RECORD_TAG))
                return found[-1] is not None

            wait_until(arrived, Where(where.step, where.layer, 0, where.phase, (source,)))
            records.append(found[-1].recv())
        return records

    def close(self, where: Where):
        wait_all(self.pending, where)


class StopSignal:
    """The ranks agree to stop: SIGUSR1 may reach them at different steps, so at every step boundary
    they reduce the flag (non-blocking, on a communicator of its own) and stop together."""

    def __init__(self, world):
        self.comm = world.Dup()
        listen_for_stop()  # in-process callers did not go through init_mpi

    def agreed(self, step: int) -> bool:
        from mpi4py import MPI
        flag, anyone = np.array([int(STOP_REQUESTED[0])]), np.zeros(1, dtype=int)
        request = self.comm.Iallreduce(flag, anyone, op=MPI.MAX)
        wait_all([request], Where(step, -1, 0, "stop_agree"))
        return bool(anyone[0])

    def close(self):
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


def run(config: Config, topo: Topology, layout: ParallelLayout, load=None, routing=None, device: str = "cpu") -> dict:
    """Generate for every request of the config; rank 0 writes the run file. Returns the metrics.

    routing: an earlier run's /routing to place experts by (parallel.placement_from)."""
    rank, size = topo.rank, topo.size
    placement = layout.placement(topo.node_of_rank, routing)
    source = f"routing of {config.parallel.placement_from}" if routing is not None else "uniform"
    prompts = config.prompts
    steps, model_cfg = config.run.max_new_tokens, config.model
    writer = None
    if rank == 0:
        attrs = {"config": config.to_yaml(), "hpcmoe_version": __version__, "world_size": size,
                 "ranks_per_node": topo.ranks_per_node, "num_nodes": topo.num_nodes,
                 "node_of_rank": np.array(topo.node_of_rank, np.int64),
                 "layout": config.parallel.layout, "device": device}
        writer = RunWriter(config.output.path, attrs, prompts, steps, model_cfg.vocab, model_cfg.moe_layers,
                           size, model_cfg.num_experts, config.output.save_logits)
    try:
        metrics = generate(config, topo, layout, placement, source, prompts, writer, load)
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return metrics


def generate(config: Config, topo: Topology, layout, placement: Placement, source: str,
             prompts: list[list[int]], writer, load) -> dict:
    rank, steps, model_cfg = topo.rank, config.run.max_new_tokens, config.model
    topo.world.Barrier()  # the common start of every timing row
    timer = Timer(rank, time.perf_counter())
    if config.parallel.layout == "ma":
        from hpcmoe.ma import ma_engine
        engine = ma_engine(config, topo, placement, timer, layout, load)
    else:
        engine = EPEngine(config, topo, placement, timer, load)
    if writer is not None:
        writer.write_placement(placement.expert_ranks(), model_cfg.moe_layers, placement.mode, source)
    local = [prompts[i] for i in engine.requests(len(prompts))]
    cache = engine.new_cache(len(local), max(map(len, prompts)) + steps)
    gather, progress = RootGather(topo.world), Progress(steps) if rank == 0 else None
    stop = StopSignal(topo.world)
    try:
        dropped = run_steps(config, topo, engine, timer, cache, local, writer, gather, progress, stop)
    finally:
        stop.close()
    done = engine.step + 1
    records = gather(((peak_rss_bytes(), cache_digest(cache)), None, None, timer.take()), Where(steps, -1, 0, "output"))
    gather.close(Where(steps, -1, 0, "output"))
    if records is None:
        return {}
    return finish(config, topo, writer, records, prompts, done, dropped)


def run_steps(config, topo, engine, timer, cache, local, writer, gather, progress, stop) -> int:
    """Prefill and decode until max_new_tokens, or until the ranks agree to stop; -> dropped token slots."""
    steps, model_cfg = config.run.max_new_tokens, config.model
    cached = torch.zeros(len(local), dtype=torch.int64)
    new_tokens, dropped = local, 0
    for step in range(steps):
        engine.step = step
        stats = StepStats(np.zeros((model_cfg.moe_layers, model_cfg.num_experts), np.int64),
                          np.zeros((model_cfg.moe_layers, topo.size), np.int64))
        started = time.perf_counter()
        with timer.phase("step", step):
            inputs = StepInputs.build(new_tokens, cached)
            logits = engine.forward(inputs, cache, stats)
            chosen = logits.argmax(dim=-1)
        seconds = time.perf_counter() - started
        cached += inputs.valid.sum(1)
        new_tokens = [[t] for t in chosen.tolist()]
        with timer.phase("output", step):
            reported = slice(None) if engine.reports else slice(0)
            record = (chosen[reported].numpy(), logits[reported].numpy() if config.output.save_logits else None,
                      stats, timer.take())
            records = gather(record, Where(step, -1, 0, "output"))
            if records is not None:
                write_step(writer, step, records)
                dropped += sum(r[2].dropped for r in records)
                progress.update(step, seconds)
        if step + 1 < steps and stop.agreed(step):
            break
    return dropped


def finish(config, topo, writer, records, prompts, done: int, dropped: int) -> dict:
    """Rank 0: metrics over the `done` steps, then the file is complete (or partial when stopped early)."""
    writer.append_timings(np.concatenate([r[3] for r in records]))
    timings = writer.file["timings"][:]
    prompt_tokens = sum(map(len, prompts))
    metrics, spans = compute_metrics(timings, prompt_tokens, len(prompts), done)
    per_rank = overlap_and_busy(timings, topo.size, config.model.num_layers)
    metrics["overlap_fraction"] = float(np.nanmean(per_rank["overlap_fraction_per_rank"]))
    metrics["busy_fraction"] = float(per_rank["busy_fraction_per_rank"].mean())
    if config.parallel.layout == "ma":
        busy, attention = per_rank["busy_fraction_per_rank"], config.parallel.attention_ranks
        metrics["busy_fraction_attention"] = float(busy[:attention].mean())
        metrics["busy_fraction_moe"] = float(busy[attention:].mean())
    metrics["rank_load_max_over_mean"] = rank_load_imbalance(writer.file["traffic"][:])
    metrics["dropped_token_slots"] = dropped
    if config.parallel.placement_from:  # the load balance before this placement, for comparison
        metrics["placement_from_rank_load_max_over_mean"] = previous_imbalance(config.parallel.placement_from)
    per_rank["peak_rss_bytes"] = np.array([r[0][0] for r in records], np.int64)
    per_rank["kv_cache_digest"] = np.array([r[0][1] for r in records], dtype="S64")
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
            digest.update(part.data.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_step(writer: RunWriter, step: int, records: list) -> None:
    """records: per rank (tokens [b_r], logits [b_r, vocab] or None, StepStats, timing rows)."""
    tokens = np.concatenate([r[0] for r in records])
    logits = np.concatenate([r[1] for r in records]) if records[0][1] is not None else None
    routing = np.stack([r[2].routing for r in records], axis=1)   # [moe_layers, ranks, experts]
    traffic = np.stack([r[2].traffic for r in records], axis=1)   # [moe_layers, src, dst]
    writer.append_step(step, tokens, logits, routing, traffic)
    writer.append_timings(np.concatenate([r[3] for r in records]))
