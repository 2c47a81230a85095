"""The figures an engine scenario compares, read from one run's metrics and run file: the metrics
themselves, inter-node bytes, each role's compute, the experts' time against reading their weights,
online rebalancing's cost, and the overlap scenario's wire time hidden. Most are pure functions of
arrays (tests/test_bench_metrics.py); run_sample and moving_cost read the run file.
"""

from __future__ import annotations

import os

import numpy as np


def run_sample(path: str, config, metrics: dict, topo) -> dict:
    """The figures a scenario compares, from one run's metrics and file."""
    import h5py

    with h5py.File(path) as f:
        timings, traffic, placement = f["timings"][:], f["traffic"][:], f["placement"][:]
    sample = {
        k: metrics[k]
        for k in (
            "ttft_ms",
            "tpot_ms",
            "tps",
            "idle_fraction",
            "busy_fraction",
            "rank_load_max_over_mean",
            "rank_load_max_over_mean_per_step",
        )
    }
    sample["internode_bytes"] = internode_traffic(traffic, topo.node_of_rank)
    link = config.parallel.link
    if link is not None:
        sample["prefill_wire_s"] = critical_wire_seconds(
            traffic[0], topo.node_of_rank, link.bandwidth_gbps, link.latency_us
        )
    sample.update(role_compute_ms(timings, config))
    if config.parallel.rebalance is not None:
        sample.update(moving_cost(path))
    sample.update(expert_time(timings, placement, config))
    for key in ("busy_fraction_attention", "busy_fraction_moe"):
        if key in metrics:
            sample[key] = metrics[key]
    return sample


def expert_time(timings: np.ndarray, placement: np.ndarray, config) -> dict:
    """Decode: the slowest rank's `experts` time per MoE layer and step (summed over micro-batches,
    median over layers and steps), against reading the weights of the experts on the rank that holds
    most once, at the memory bandwidth `hpcmoe calibrate` measured here (machines/this_box.yaml).
    placement: the run's /placement [moe_layers, experts, replicas]."""
    from hpcmoe.model.sizes import parameter_bytes
    from hpcmoe.sim.machine import load_machine

    rows = timings[(timings["phase"] == b"experts") & (timings["step"] > 0)]
    if not len(rows):
        return {}
    keys, where = np.unique(rows[["step", "layer", "rank"]], return_inverse=True)
    per_rank = np.bincount(where.reshape(-1), weights=rows["end"] - rows["start"])
    slowest = {}
    for key, seconds in zip(keys, per_rank):
        slowest[key["step"], key["layer"]] = max(slowest.get((key["step"], key["layer"]), 0.0), seconds)
    m = config.model
    total, with_one = parameter_bytes(m, 1)
    expert_bytes = (with_one - parameter_bytes(m, 0)[1]) / m.moe_layers  # one expert of one layer
    most = np.bincount(placement[0][placement[0] >= 0].reshape(-1)).max()  # slots on the fullest rank
    # the repository: hpcmoe/analysis/bench/figures.py is four levels below it
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    machine = load_machine(os.path.join(root, "machines", "this_box.yaml"))
    return {
        "experts_ms_per_layer": 1e3 * float(np.median(list(slowest.values()))),
        "weight_read_ms_per_layer": 1e3 * most * expert_bytes / machine.memory_bytes_per_s,
    }


def moving_cost(path: str) -> dict:
    """Online rebalancing from a run file: switches, bytes moved, and moving_tps_ratio."""
    import h5py

    with h5py.File(path) as f:
        history, times = f["placement_history"][:], f["metrics/token_time_s"][:]
        made = np.array([len(c) for c in f["requests/completion_ids"][:]])
        last = f["requests/finished_step"][:]
    # one token per step from a request's first through its last (finished_step)
    tokens = np.zeros(max(len(times), int(last.max(initial=-1)) + 1) + 1, np.int64)
    np.add.at(tokens, last - made + 1, 1)
    np.add.at(tokens, last + 1, -1)
    windows = list(zip(history["decided_at_step"], history["step"]))
    return {
        "switches": len(history),
        "moved_mib": float(history["bytes_moved"].sum()) / 2**20,
        "moving_tps_ratio": moving_tps_ratio(times, np.cumsum(tokens)[: len(times)], windows),
    }


def moving_tps_ratio(token_times: np.ndarray, tokens: np.ndarray, windows) -> float:
    """Generated tokens per wall second over the moving windows over the same for the other decode
    steps (NaN without both). token_times: [steps] when rank 0 held each step's tokens (every step
    made some, as under static batching); tokens: [steps] tokens each step made; windows:
    (decided_at_step, switch step) pairs. A window runs from the step after the decision (moves
    start) through the switch step (the first on the new placement, which pays for the switch)."""
    seconds, made = np.diff(token_times), np.asarray(tokens)[1:]  # decode step i + 1
    moving = np.zeros(len(seconds), bool)
    for decided, switch in windows:
        moving[decided:switch] = True  # steps decided + 1 .. switch
    if not moving.any() or moving.all():
        return float("nan")
    rate = lambda steps: made[steps].sum() / seconds[steps].sum()
    return float(rate(moving) / rate(~moving))


def critical_wire_seconds(
    traffic: np.ndarray, node_of_rank, bandwidth_gbps: float, latency_us: float
) -> float:
    """The wire time on a step's critical path: traffic [moe_layers, src, dst] dispatch bytes.

    Layer after layer, the dispatch lasts as long as the busiest outgoing inter-node link
    (bytes / bandwidth) plus one latency, and so does the return of the same bytes (exact for
    flat dispatch, where answers are the size of the tokens sent)."""
    nodes = np.asarray(node_of_rank)
    crossing = traffic * (nodes[:, None] != nodes[None, :])  # [layers, src, dst]
    seconds = lambda sent: np.where(sent > 0, sent * 8 / (bandwidth_gbps * 1e9) + latency_us * 1e-6, 0.0)
    # per layer: by sender, by expert rank
    out_going, coming_back = (
        crossing.sum(axis=2),
        crossing.sum(axis=1),
    )
    return float(seconds(out_going).max(axis=1).sum() + seconds(coming_back).max(axis=1).sum())


def wire_hidden_raw(ttft_link_ms: float, best_nolink_ms: float, wire_ms: float) -> float:
    """1 - (T_link - T_best_nolink) / T_wire, unclamped: the share of the wire time the schedule hid
    (1 = all of it). Against the fastest schedule without the link, not the variant's own: a schedule
    slower with and without the link must not read well."""
    return 1.0 - (ttft_link_ms - best_nolink_ms) / wire_ms if wire_ms > 0 else float("nan")


def wire_hidden(ttft_link_ms: float, best_nolink_ms: float, wire_ms: float) -> float:
    """wire_hidden_raw clamped to [0, 1] (noise in two runs can push it out); NaN stays NaN."""
    return float(np.clip(wire_hidden_raw(ttft_link_ms, best_nolink_ms, wire_ms), 0.0, 1.0))


def overlap_figures(rows: dict) -> None:
    """Adds best_nolink_ms, wire_hidden_raw and wire_hidden to each variant's samples, rep by rep:
    rows[variant][key] is a list over the reps (every variant ran in every rep), with ttft_ms,
    ttft_nolink_ms and wire_ms. best_nolink_ms: the fastest no-link TTFT of any variant in that rep."""
    best = np.min([samples["ttft_nolink_ms"] for samples in rows.values()], axis=0)
    for samples in rows.values():
        parts = list(zip(samples["ttft_ms"], best, samples["wire_ms"]))
        samples["best_nolink_ms"] = [float(b) for b in best]
        samples["wire_hidden_raw"] = [wire_hidden_raw(*p) for p in parts]
        samples["wire_hidden"] = [wire_hidden(*p) for p in parts]


def role_compute_ms(timings: np.ndarray, config) -> dict[str, float]:
    """Per step, the attention and the expert compute of the busiest rank doing each, measured alone."""
    steps = config.run.max_new_tokens
    out = {}
    for name, phase in (("attention_compute_ms", b"attention"), ("expert_compute_ms", b"experts")):
        rows = timings[timings["phase"] == phase]
        per_rank = [
            1e3 * (rows["end"] - rows["start"])[rows["rank"] == r].sum() / steps for r in set(rows["rank"])
        ]
        out[name] = max(per_rank) if per_rank else 0.0
    return out


def internode_traffic(traffic: np.ndarray, node_of_rank) -> float:
    """Bytes of /traffic [steps, layers, src, dst] between ranks of different nodes."""
    nodes = np.array(node_of_rank)
    return float(traffic[..., nodes[:, None] != nodes[None, :]].sum())
