"""A simulation's metrics and run file: the same schema and the same metric functions as `hpcmoe run`
(hpcmoe.runfile), with root attrs `simulated: true` and `machine`, /generated all -1 (no tokens are
computed), /generated_lengths the tokens each request would make, and the memory plan of
`hpcmoe plan` against the machine's memory instead of a measured peak RSS."""

from __future__ import annotations

import numpy as np

from hpcmoe.runfile.loads import rank_load_imbalance, rank_loads, step_imbalance
from hpcmoe.runfile.metrics import busy_and_idle, compute_metrics, request_metrics
from hpcmoe.runfile.schema import TIMING_DTYPE, run_attrs
from hpcmoe.runfile.writer import RunWriter


def metrics_and_file(sim, output: str | None) -> dict:
    """-> the run's metrics (as run_file.finish computes them, from the simulated clock); writes `output`."""
    from hpcmoe.parallel.plan import rank_memory

    config, ranks = sim.config, sim.ranks
    requests = config.requests
    made = [sum(r.max_new_tokens > step for r in requests) for step in range(config.steps)]
    metrics, spans = compute_metrics(
        np.array(sim.token_times),
        sum(len(r.prompt_ids) for r in requests),
        np.array([count for count in made if count]),
    )
    timings = np.array(sim.rows, dtype=TIMING_DTYPE)
    per_rank = busy_and_idle(timings, ranks)
    metrics["idle_fraction"] = float(per_rank["idle_fraction_per_rank"].mean())
    metrics["busy_fraction"] = float(per_rank["busy_fraction_per_rank"].mean())
    if sim.is_ma:
        attention = config.parallel.attention_ranks
        for name in ("busy", "idle"):
            values = per_rank[f"{name}_fraction_per_rank"]
            metrics[f"{name}_fraction_attention"] = float(values[:attention].mean())
            metrics[f"{name}_fraction_moe"] = float(values[attention:].mean())
    metrics["prompt_tokens_per_s"] = sum(len(r.prompt_ids) for r in requests) / metrics["total_s"]
    # the start-up and model load are not simulated: NaN, not a figure that looks measured
    metrics.update(wall_s=metrics["total_s"], load_s=float("nan"), wall_with_load_s=float("nan"))
    times, limits = np.array(sim.token_times), requests.max_new_tokens  # every request in the first batch
    metrics.update(
        request_metrics(
            np.full(len(limits), times[0]),
            times[np.minimum(limits, len(times)) - 1],
            limits,
            metrics["total_s"],
        )
    )
    table = np.array(
        [
            ranks + [-1] * (max(map(len, sim.placement.expert_ranks())) - len(ranks))
            for ranks in sim.placement.expert_ranks()
        ]
    )
    loads = rank_loads(sim.routing_counts, [(0, table)], list(sim.node_of_rank), sim.placement.tp)
    metrics["rank_load_max_over_mean"] = rank_load_imbalance(loads)
    metrics["rank_load_max_over_mean_per_step"] = step_imbalance(loads)
    metrics["dropped_token_slots"] = sim.dropped
    metrics["tokens_per_s_per_rank"] = metrics["decode_tokens_per_s"] / ranks
    memory = rank_memory(config, ranks)["max_rank_bytes"]
    metrics["planned_max_rank_bytes"] = int(memory)
    metrics["fits_machine_memory"] = bool(memory <= sim.memory_per_rank)
    per_rank["token_time_s"] = np.array(sim.token_times)
    if output:
        write_run_file(sim, output, metrics, spans, per_rank, timings)
        metrics["path"] = output
    return metrics


def write_run_file(sim, path: str, metrics: dict, spans, per_rank: dict, timings: np.ndarray) -> None:
    config, m, ranks = sim.config, sim.config.model, sim.ranks
    nodes = max(sim.node_of_rank) + 1
    attrs = {
        **run_attrs(
            config,
            sim.node_of_rank,
            max(sim.node_of_rank.count(n) for n in range(nodes)),
            sim.machine.device,
            f"simulated {sim.machine.name}",
            len(config.requests),
        ),
        "simulated": True,
        "machine": sim.machine.name,
    }
    if sim.context is not None:
        attrs["steady_decode_context"] = sim.context
    writer = RunWriter(
        path, attrs, config.requests, config.steps, m.vocab, m.moe_layers, ranks, m.num_experts, False
    )
    try:
        source = (
            f"routing of {config.parallel.placement_from}" if config.parallel.placement_from else "uniform"
        )
        writer.write_placement(
            sim.placement.expert_ranks(), m.moe_layers, sim.placement.mode, source, sim.placement.tp
        )
        for step in range(config.steps):
            writer.append_step(step, sim.routing_counts[step], sim.traffic[step])
        writer.append_timings(timings)
        writer.write_requests(config)
        writer.file["generated_lengths"][:] = config.requests.max_new_tokens
        writer.finish(metrics, spans, per_rank)
    except BaseException:
        writer.discard()
        raise
