"""The run as it started (RunStart), and its file at the two ends: opened with the run's attributes
and first placement (or by the deputy that takes over), finished with the metrics over the steps done.

Separate from the step loop, which only appends steps; what a finished file holds is decided here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from hpcmoe.config import Config
from hpcmoe.parallel.layout import ParallelLayout
from hpcmoe.parallel.placement import Placement
from hpcmoe.parallel.plan import rank_estimates
from hpcmoe.runfile.loads import file_loads, previous_imbalance, rank_load_imbalance, step_imbalance
from hpcmoe.runfile.metrics import busy_and_idle, compute_metrics, request_metrics
from hpcmoe.runfile.schema import run_attrs
from hpcmoe.runfile.writer import RunWriter
from hpcmoe.runtime.fault import FaultState
from hpcmoe.runtime.records import Made
from hpcmoe.runtime.topology import Topology


@dataclass
class RunStart:
    """The run as it started: what its file records first, and what the survivors of a dead rank
    rebuild from."""

    config: Config
    topo: Topology  # the world at the start (the run file's rank axes)
    layout: ParallelLayout
    placement: Placement  # the placement at the start (the run file's /placement)
    source: str  # what the placement was made from ("uniform", or an earlier run's routing)
    device: torch.device
    max_batch: int
    resume: object = None  # the partial run this one resumes (workload.Resume), or None
    load: object = None  # the checkpoint's tensors (startup.check_model), or None
    fault: FaultState = field(default_factory=FaultState)


@dataclass
class Ended:
    """How the run ended, as rank 0 finishes the file."""

    records: list  # [records.FinalRecord] in original rank order
    done: int  # the steps done
    signalled: bool  # stopped by a signal (or a failure): the file is partial
    history: list = field(default_factory=list)  # the placement switches (parallel.rebalance.Switch)
    failures: list = field(default_factory=list)  # /metrics/failures rows (fault.failure_rows)


def open_writer(start: RunStart) -> RunWriter:
    """The run file with its /placement (the run's first), and what the run it resumes finished (on
    rank 0, or its deputy)."""
    config, topo, device, resume = start.config, start.topo, start.device, start.resume
    m = config.model
    attrs = run_attrs(
        config,
        topo.node_of_rank,
        topo.ranks_per_node,
        device.type,
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        start.max_batch,
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
    placement = start.placement
    writer.write_placement(placement.expert_ranks(), m.moe_layers, placement.mode, start.source, placement.tp)
    if resume is not None:  # the finished steps, as the stopped run wrote them
        writer.write_finished_steps(resume)
    return writer


def finish(start: RunStart, writer: RunWriter, made: Made, ended: Ended) -> dict:
    """Rank 0: metrics over the steps this run did (a resumed run: those after it resumed), then the
    file is complete, or partial (NAME.partial.h5) when a signal stopped it after `done` steps (its
    live requests written with finish reason `stop`, to continue)."""
    config, records, done = start.config, ended.records, ended.done
    writer.append_timings(np.concatenate([r.timings for r in records]))
    writer.write()
    timings = writer.file["timings"][:]
    metrics, spans = token_metrics(config, writer, made, done)
    per_rank = rank_metrics(start, writer, made, records, timings, metrics)
    if config.parallel.rebalance is not None:
        writer.write_placement_history(ended.history, [r.weight_digests for r in records], done)
        metrics["placement_switches"] = len(ended.history)
    loads = file_loads(writer.file, done)  # [steps, moe_layers, places] on the placements in force
    metrics["rank_load_max_over_mean"] = rank_load_imbalance(loads)
    metrics["rank_load_max_over_mean_per_step"] = step_imbalance(loads)
    metrics["dropped_token_slots"] = made.dropped
    if config.parallel.placement_from:  # the load balance before this placement, for comparison
        metrics["placement_from_rank_load_max_over_mean"] = previous_imbalance(config.parallel.placement_from)
    per_rank["kv_cache_digest"] = np.array([r.cache_digest for r in records], dtype="S64")
    per_rank["token_time_s"] = np.array(made.token_times)
    if ended.signalled:
        metrics["stopped_at_step"] = done
    complete = not ended.signalled
    metrics["path"] = writer.finish(metrics, spans, per_rank, complete=complete, failures=ended.failures)
    return metrics


def token_metrics(config: Config, writer: RunWriter, made: Made, done: int) -> tuple[dict, dict]:
    """The throughput and latency metrics, from rank 0's token times and the requests (written here:
    the live ones as stopped after `done` steps) -> (metrics, spans)."""
    prompt_tokens = int(config.requests.prompt_lengths.sum())
    metrics, spans = compute_metrics(
        np.array(made.token_times), prompt_tokens, np.array([g for g in made.generated if g])
    )
    writer.stop_live(done - 1, made.token_times[-1] if made.token_times else 0.0)
    writer.write_requests(config)
    rows = writer.file["requests"]
    ended = rows["finish_reason"][:] != b"stop"
    metrics["prompt_tokens_per_s"] = prompt_tokens / metrics["total_s"]
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
    # prompts were prefilled all through the run
    if len(first_tokens) and first_tokens.max() > first_tokens.min():
        metrics["prefill_tokens_per_s"] = prompt_tokens / metrics["total_s"]
    return metrics, spans


def rank_metrics(
    start: RunStart, writer: RunWriter, made: Made, records: list, timings: np.ndarray, metrics: dict
) -> dict:
    """-> the per-rank rows (busy and idle fractions, peak and estimated memory); their means and
    maxima, per role in ma, go into metrics."""
    config, size = start.config, start.topo.size
    per_rank = busy_and_idle(timings, size)
    metrics["idle_fraction"] = float(per_rank["idle_fraction_per_rank"].mean())
    metrics["busy_fraction"] = float(per_rank["busy_fraction_per_rank"].mean())
    per_rank["peak_rss_bytes"] = np.array([r.peak_rss_bytes for r in records], np.int64)
    per_rank["memory_estimate_bytes"] = rank_estimates(
        config, size, int(writer.file.attrs["max_batch"]), made.runtime_bytes
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
    return per_rank
