"""The attention:MoE split of an ma run: every split the model allows, scored by a trained
predictor's times (propose) or simulated on a machine file with the engine's schedule
(simulate_splits); choose_split for parallel.attention_ranks: auto, with the line that says why.
"""

from __future__ import annotations

import numpy as np

from hpcmoe.analysis import predict
from hpcmoe.model.attention import split_heads


def split_features(config, attention: int, moe: int, machine: dict) -> np.ndarray:
    """The features of an attention rank and of a MoE rank of an attention:MoE split, for the prefill
    and for a decode step halfway through: -> [2 (prefill, decode), 2 (attention, MoE rank), 5]."""
    m, prompts, steps = config.model, config.prompts, config.run.max_new_tokens
    lengths = np.array(list(map(len, prompts)), float)
    share = 1.0 / attention  # every attention rank takes its share of the heads of all requests
    half = max(steps // 2, 1)
    rows = []
    for tokens, context in (
        (lengths.sum(), (lengths * (lengths + 1) / 2).sum()),
        (float(len(lengths)), (lengths + half).sum()),
    ):
        slots = tokens * m.top_k / moe
        rows.append(
            [
                [share * tokens, share * context, m.hidden, 0.0, machine["memory_bandwidth"]],
                [0.0, 0.0, m.hidden, slots, machine["memory_bandwidth"]],
            ]
        )
    return np.array(rows)


def step_ms(attention_ms: float, moe_ms: float, attention: int, moe: int, cores: int) -> float:
    """A step of a split: its slower side, or all ranks' work shared over the cores when they are fewer."""
    slower = max(attention_ms, moe_ms)
    if attention + moe <= cores:
        return slower
    return max(slower, (attention * attention_ms + moe * moe_ms) / cores)


def propose(model, config, ranks: int, machine: dict, threshold: float = 0.05) -> dict:
    """Best attention:MoE split of `ranks` for a config's workload by predicted times.

    Attention work divides over attention ranks (head shards), expert work over MoE ranks; a step
    takes as long as its slower side, or, when the ranks outnumber the machine's cores (a box where
    they share cores), as long as all ranks' work over the cores. Each split is scored by its
    predicted generation time (the prefill plus max_new_tokens - 1 decode steps taken halfway
    through), and the fastest wins.
    Rebalancing is flagged when the two sides of the chosen split's decode step differ by more
    than `threshold`. model: anything with predict_ms(features [n, 5]) -> [n, 2] milliseconds."""
    m = config.model
    options = []
    for attention in range(1, ranks):
        moe = ranks - attention
        if moe > m.num_experts or attention > m.heads:
            continue
        predicted = model.predict_ms(split_features(config, attention, moe, machine).reshape(-1, 5)).reshape(
            2, 2, 2
        )
        # (attention, MoE) ms
        sides = [(predicted[phase, 0, 0], predicted[phase, 1, 1]) for phase in range(2)]
        step = [step_ms(a, e, attention, moe, machine.get("cores", ranks)) for a, e in sides]
        total = step[0] + (config.run.max_new_tokens - 1) * step[1]
        options.append((total, attention, moe, *sides[1]))
    if not options:
        raise ValueError(
            f"no attention:MoE split of {ranks} ranks fits {m.heads} heads and {m.num_experts} experts"
        )
    total, attention, moe, t_attention, t_moe = min(options)
    mismatch = abs(t_attention - t_moe) / max(t_attention, t_moe, 1e-12)
    return {
        "attention_ranks": attention,
        "moe_ranks": moe,
        "predicted_attention_ms": float(t_attention),
        "predicted_moe_ms": float(t_moe),
        "predicted_total_ms": float(total),
        "mismatch": float(mismatch),
        "rebalance": bool(mismatch > threshold),
        "heads_per_rank": [len(r) for r in split_heads(m.heads, attention)],
        "options": {f"{a}:{e}": float(t) for t, a, e, *_ in sorted(options, key=lambda o: o[1])},
    }


def choose_split(config, world_size: int):
    """parallel.attention_ranks: auto -> the config with the chosen split of `world_size` ranks, and
    one line saying what chose it and why. parallel.predictor a machine file (YAML): every split is
    simulated on it with the engine's schedule (simulate_splits); a file of `hpcmoe
    predict train`: the trained predictor's times, with a warning outside the runs it was fitted on."""
    import dataclasses

    from hpcmoe.config import validate

    p = config.parallel
    if is_machine_file(p.predictor):
        proposal = simulate_splits(config, world_size, p.predictor)
        by = f"simulated on {p.predictor} (machine {proposal['machine']})"
        side = f"TPOT {proposal['predicted_tpot_ms']:.2f} ms"
        warning = ""
    else:
        model, machine = predict.load(p.predictor)
        proposal = propose(model, config, world_size, machine)
        by = f"predicted by {p.predictor}"
        side = (
            f"its decode step: attention {proposal['predicted_attention_ms']:.2f} ms, "
            f"MoE {proposal['predicted_moe_ms']:.2f} ms"
        )
        warning = outside_training(p.predictor, model.fitted_ranges, config, world_size, proposal)
    chosen = dataclasses.replace(
        p, attention_ranks=proposal["attention_ranks"], moe_ranks=proposal["moe_ranks"]
    )
    config = dataclasses.replace(config, parallel=chosen)
    validate(config)
    options = ", ".join(f"{split} {ms:.1f} ms" for split, ms in proposal["options"].items())
    why = (
        f"hpcmoe: parallel.attention_ranks=auto: {proposal['attention_ranks']} attention : "
        f"{proposal['moe_ranks']} "
        f"MoE ranks (heads per attention rank {proposal['heads_per_rank']}), the fastest generation {by} "
        f"({options}); {side}{warning}"
    )
    return config, why


def is_machine_file(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def outside_training(path: str, fitted: dict, config, world_size: int, proposal: dict) -> str:
    """'' or a warning: a trained predictor's times for ranks, batch or prompt lengths outside the
    runs it was fitted on (`fitted`: its fitted_ranges) are extrapolated, and a predictor that
    answers the same time for every split tells nothing."""
    times = list(proposal["options"].values())
    if len(times) > 1 and max(times) - min(times) <= 1e-6 * max(max(times), 1e-12):
        raise ValueError(
            f"parallel.predictor: {path} predicts the same time ({times[0]:.1f} ms) for every split "
            f"of {world_size} ranks: it cannot choose; use a machine file (the simulator) or "
            f"set parallel.attention_ranks and moe_ranks"
        )
    if not fitted:
        return ""
    batch = len(config.requests)
    prompt = int(config.requests.prompt_lengths.max())
    outside = [
        f"{name} {value} (fitted on {low}..{high})"
        for name, value, (low, high) in (
            ("ranks", world_size, fitted["ranks"]),
            ("batch", batch, fitted["batch"]),
            ("prompt length", prompt, fitted["prompt_length"]),
        )
        if not low <= value <= high
    ]
    return ("; WARNING: outside the runs it was fitted on: " + ", ".join(outside)) if outside else ""


def splits(config, ranks: int) -> list[tuple[int, int]]:
    """Every attention:MoE split of `ranks` the model and layout allow."""
    m, p = config.model, config.parallel
    step = p.attention_replicas * (2 if p.attention_standby else 1)
    return [
        (a, ranks - a)
        for a in range(1, ranks)
        if a % step == 0 and a // step <= m.heads and ranks - a <= m.num_experts
    ]


def simulate_splits(config, ranks: int, machine_path: str, threshold: float = 0.05) -> dict:
    """`hpcmoe predict propose --machine M.yaml`: every attention:MoE split of `ranks` (splits)
    simulated on the machine; the split whose run ends first (prefill and every decode step, each as
    the engine schedules it) -> propose's keys, `rebalance` when the chosen split's attention
    and MoE ranks are busy for shares of the run more than `threshold` apart. Where the engine would
    batch a rank's requests in turns (run.max_batch, run.prefill_chunk) every split is still
    simulated with all of them from the first step: a ranking, not the run's time."""
    import dataclasses

    from hpcmoe.model.attention import split_heads
    from hpcmoe.sim.machine import load_machine
    from hpcmoe.sim.simulate import simulate

    machine, options = load_machine(machine_path), {}
    for attention, moe in splits(config, ranks):
        split = dataclasses.replace(config.parallel, layout="ma", attention_ranks=attention, moe_ranks=moe)
        metrics = simulate(dataclasses.replace(config, parallel=split), machine, ranks, one_batch=False)
        options[attention, moe] = metrics
    if not options:
        raise ValueError(
            f"no attention:MoE split of {ranks} ranks fits {config.model.heads} heads and "
            f"{config.model.num_experts} experts"
        )
    (attention, moe), best = min(options.items(), key=lambda item: item[1]["total_s"])
    busy = best["busy_fraction_attention"], best["busy_fraction_moe"]
    mismatch = abs(busy[0] - busy[1]) / max(*busy, 1e-12)
    return {
        "attention_ranks": attention,
        "moe_ranks": moe,
        "predicted_total_ms": 1e3 * best["total_s"],
        "predicted_tpot_ms": best["tpot_ms"],
        "busy_fraction_attention": busy[0],
        "busy_fraction_moe": busy[1],
        "mismatch": mismatch,
        "rebalance": bool(mismatch > threshold),
        "machine": machine.name,
        "heads_per_rank": [len(r) for r in split_heads(config.model.heads, attention)],
        "options": {f"{a}:{m}": 1e3 * metrics["total_s"] for (a, m), metrics in sorted(options.items())},
    }
