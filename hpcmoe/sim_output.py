"""A simulation's metrics and run file: the same schema and the same metric functions as `hpcmoe run`
(hpcmoe.output), with root attrs `simulated: true` and `machine`, /generated all -1 (no tokens are
computed), /generated_lengths the tokens each request would make, and the memory plan of
`hpcmoe plan` against the machine's memory instead of a measured peak RSS."""
from __future__ import annotations

import numpy as np

from hpcmoe.output import (TIMING_DTYPE, RunWriter, busy_and_idle, compute_metrics, rank_load_imbalance,
                           rank_loads, request_metrics, run_attrs, step_imbalance)


def metrics_and_file(sim, output: str | None) -> dict:
    """-> the run's metrics (as engine.finish computes them, from the simulated clock); writes `output`."""
    from hpcmoe.plan import rank_memory
    config, ranks = sim.config, sim.ranks
    requests = config.requests
    made = [sum(r.max_new_tokens > step for r in requests) for step in range(config.steps)]
    metrics, spans = compute_metrics(np.array(sim.token_times), sum(len(r.prompt_ids) for r in requests),
                                     np.array([count for count in made if count]))
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
    metrics.update(request_metrics(np.full(len(limits), times[0]), times[np.minimum(limits, len(times)) - 1], limits,
                                   metrics["total_s"]))
    table = np.array([ranks + [-1] * (max(map(len, sim.placement.expert_ranks())) - len(ranks))
                      for ranks in sim.placement.expert_ranks()])
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
    attrs = {**run_attrs(config, sim.node_of_rank, max(sim.node_of_rank.count(n) for n in range(nodes)),
                         sim.machine.device, f"simulated {sim.machine.name}", len(config.requests)),
             "simulated": True, "machine": sim.machine.name}
    if sim.context is not None:
        attrs["steady_decode_context"] = sim.context
    writer = RunWriter(path, attrs, config.requests, config.steps, m.vocab, m.moe_layers, ranks, m.num_experts, False)
    try:
        source = f"routing of {config.parallel.placement_from}" if config.parallel.placement_from else "uniform"
        writer.write_placement(sim.placement.expert_ranks(), m.moe_layers, sim.placement.mode, source, sim.placement.tp)
        for step in range(config.steps):
            writer.append_step(step, sim.routing_counts[step], sim.traffic[step])
        writer.append_timings(timings)
        writer.write_requests(config)
        writer.file["generated_lengths"][:] = config.requests.max_new_tokens
        writer.finish(metrics, spans, per_rank)
    except BaseException:
        writer.discard()
        raise


def command(config_path: str, settings: list[str], machine_path: str, ranks: int, routing_path: str | None,
            output: str | None, context: int | None = None) -> dict:
    """`hpcmoe simulate`: load and check everything (ValueError: one line naming what is wrong), simulate,
    print what `hpcmoe run` prints."""
    from hpcmoe.config import load_config
    from hpcmoe.machine import load_machine
    from hpcmoe.output import read_routing
    from hpcmoe.simulate import node_of_ranks, simulate
    config = load_config(config_path, settings)
    machine = load_machine(machine_path)
    if ranks < 1:
        raise ValueError(f"--ranks: expected an integer >= 1, got {ranks}")
    routing = None
    if routing_path:
        try:
            routing = read_routing(routing_path, config.model.num_experts)
        except ValueError as e:
            raise ValueError(str(e).replace("parallel.placement_from", "--routing")) from None
    if context is not None and context < 0:
        raise ValueError(f"--steady-decode: expected a context length >= 0, got {context}")
    metrics = simulate(config, machine, ranks, routing, output, context)
    nodes = max(node_of_ranks(config, machine, ranks)) + 1
    print(f"hpcmoe simulate: {ranks} ranks on {nodes} node(s) of {machine.name}, layout {config.parallel.layout}, "
          f"{len(config.requests)} requests, {sum(len(r.prompt_ids) for r in config.requests)} prompt tokens, "
          f"up to {config.steps} new tokens each; {metrics['planned_max_rank_bytes'] / 2 ** 30:.1f} GiB on the "
          f"fullest rank ({'fits' if metrics['fits_machine_memory'] else 'does NOT fit'} the machine's memory)")
    print(f"TTFT {metrics['ttft_ms']:.2f} ms | TPOT {metrics['tpot_ms']:.2f} ms | prefill "
          f"{metrics['prefill_tokens_per_s']:.0f} tok/s | decode {metrics['decode_tokens_per_s']:.0f} tok/s | "
          f"tps {metrics['tps']:.0f} tok/s (simulated)")
    if output:
        print(f"wrote {output}")
    return metrics


def propose(config, ranks: int, machine_path: str, threshold: float = 0.05) -> dict:
    """`hpcmoe predict propose --machine M.yaml`: every attention:MoE split of `ranks` (predict.splits)
    simulated on the machine; the split whose run ends first (prefill and every decode step, each as
    the engine schedules it) -> predict.propose's keys, `rebalance` when the chosen split's attention
    and MoE ranks are busy for shares of the run more than `threshold` apart. Where the engine would
    batch a rank's requests in turns (run.max_batch, run.prefill_chunk) every split is still
    simulated with all of them from the first step: a ranking, not the run's time."""
    import dataclasses
    from hpcmoe.attention import split_heads
    from hpcmoe.machine import load_machine
    from hpcmoe.predict import splits
    from hpcmoe.simulate import simulate
    machine, options = load_machine(machine_path), {}
    for attention, moe in splits(config, ranks):
        split = dataclasses.replace(config.parallel, layout="ma", attention_ranks=attention, moe_ranks=moe)
        metrics = simulate(dataclasses.replace(config, parallel=split), machine, ranks, one_batch=False)
        options[attention, moe] = metrics
    if not options:
        raise ValueError(f"no attention:MoE split of {ranks} ranks fits {config.model.heads} heads and "
                         f"{config.model.num_experts} experts")
    (attention, moe), best = min(options.items(), key=lambda item: item[1]["total_s"])
    busy = best["busy_fraction_attention"], best["busy_fraction_moe"]
    mismatch = abs(busy[0] - busy[1]) / max(*busy, 1e-12)
    return {"attention_ranks": attention, "moe_ranks": moe, "predicted_total_ms": 1e3 * best["total_s"],
            "predicted_tpot_ms": best["tpot_ms"], "busy_fraction_attention": busy[0], "busy_fraction_moe": busy[1],
            "mismatch": mismatch, "rebalance": bool(mismatch > threshold), "machine": machine.name,
            "heads_per_rank": [len(r) for r in split_heads(config.model.heads, attention)],
            "options": {f"{a}:{m}": 1e3 * metrics["total_s"] for (a, m), metrics in sorted(options.items())}}
