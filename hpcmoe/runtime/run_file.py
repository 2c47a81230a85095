"""The run file at the two ends of a run: opened with the run's attributes and first placement (or
by the deputy that takes over), finished with the metrics over the steps done.

Separate from the step loop, which only appends steps; what a finished file holds is decided here.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hpcmoe.config import Config
from hpcmoe.parallel.placement import Placement
from hpcmoe.parallel.plan import rank_estimates
from hpcmoe.runfile.output import (
    RunWriter,
    busy_and_idle,
    compute_metrics,
    file_loads,
    previous_imbalance,
    rank_load_imbalance,
    request_metrics,
    run_attrs,
    step_imbalance,
)
from hpcmoe.runtime.records import Made
from hpcmoe.runtime.topology import Topology


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
