"""The text summary of a run file that `hpcmoe report` prints: its metrics, phase seconds per role,
load imbalance, placement, failures and first requests; and the two readings of a run that the
plots share with it (the ranks of each role, the rank load per step).
"""

from __future__ import annotations

import numpy as np

from hpcmoe.runfile.metrics import is_comm, is_compute, is_wait, length, union

METRICS = (
    "ttft_ms",
    "tpot_ms",
    "tps",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "output_tokens_per_s",
    "prompt_tokens_per_s",
    "requests_per_s",
    *(f"request_{name}_p{q}" for name in ("ttft_ms", "itl_ms", "latency_s") for q in (50, 90, 99)),
    "wall_s",
    "load_s",
    "wall_with_load_s",
    "idle_fraction",
    "busy_fraction",
    "busy_fraction_attention",
    "busy_fraction_moe",
    "idle_fraction_attention",
    "idle_fraction_moe",
)


def roles(run: dict) -> list[tuple[str, list[int]]]:
    """(name, ranks) of each role: all ranks for ep; attention and moe ranks for ma."""
    ranks = list(range(run["world_size"]))
    if run["parallel"]["layout"] != "ma":
        return [("all ranks", ranks)]
    attention = run["parallel"]["attention_ranks"]
    return [("attention", ranks[:attention]), ("moe", ranks[attention:])]


def phase_seconds(timings: np.ndarray, ranks: list[int]) -> dict[str, float]:
    """Total seconds of each phase summed over `ranks`, divided by their number, longest first."""
    rows = timings[np.isin(timings["rank"], ranks)]
    totals = {}
    for phase in np.unique(rows["phase"]):
        mine = rows[rows["phase"] == phase]
        totals[phase.decode()] = float((mine["end"] - mine["start"]).sum()) / len(ranks)
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def kind_seconds(timings: np.ndarray, ranks: list[int]) -> dict[str, float]:
    """Mean per rank of the merged compute, communication-in-flight and wait time."""
    kinds = {"compute": is_compute, "comm": is_comm, "wait": is_wait}
    totals = dict.fromkeys(kinds, 0.0)
    for rank in ranks:
        rows = timings[timings["rank"] == rank]
        for kind, test in kinds.items():
            totals[kind] += length(union([(r["start"], r["end"]) for r in rows if test(r["phase"])]))
    return {kind: total / len(ranks) for kind, total in totals.items()}


def summary(run: dict) -> str:
    """The text summary of one run, one `key: value` per line."""
    p, m = run["parallel"], run["metrics"]
    lines = (
        [f"run: {run['path']}"]
        + (partial_lines(run) if run.get("partial") is not None else [])
        + [
            f"layout: {p['layout']}",
            f"world_size: {run['world_size']}",
            f"num_nodes: {len(np.unique(run['node_of_rank']))}",
            "metrics:",
        ]
    )
    for key in METRICS:
        if key in m:
            lines.append(f"  {key}: {m[key]:.4f}" if "fraction" in key else f"  {key}: {m[key]:.3f}")
    for name, ranks in roles(run):
        which = f"ranks {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"
        lines.append(f"phase seconds per rank, {name} ({which}):")
        lines += [f"  {phase}: {s:.6f}" for phase, s in phase_seconds(run["timings"], ranks).items()]
        merged = kind_seconds(run["timings"], ranks)
        lines.append("  merged: " + ", ".join(f"{kind} {s:.6f}" for kind, s in merged.items()))
    slots = run["routing"].sum(axis=(0, 1, 2))  # token slots per expert: all steps, layers, sources
    lines += [
        "load imbalance:",
        f"  rank_load_max_over_mean: {m.get('rank_load_max_over_mean', np.nan):.4f}",
        f"  expert_slots_max: {slots.max()}",
        f"  expert_slots_mean: {slots.mean():.3f}",
        f"  expert_slots_max_over_mean: {slots.max() / max(slots.mean(), 1e-12):.4f}",
    ]
    attrs = run["placement_attrs"]
    tp = int(attrs.get("expert_tp", 1))
    lines.append(
        f"placement (moe layer 0): mode {attrs.get('mode', '?')}, source {attrs.get('source', '?')}"
        + (f", expert_tp {tp}: each replica on the {tp} ranks from the one listed" if tp > 1 else "")
    )
    lines += placement_lines(run["placement"][0])
    lines += [failure_line(row) for row in run["failures"]]
    if run["switches"]:
        load = rank_load_over_steps(run)
        ratio = load.max(1) / np.maximum(load.mean(1), 1e-12)
        lines.append(
            f"online rebalancing: {len(run['switches'])} switch(es), at steps "
            f"{', '.join(str(step) for step, _ in run['switches'])}; rank load max/mean per step: "
            f"mean {ratio.mean():.3f}"
        )
    lines.append(f"first {len(run['samples'])} requests (prompt -> completion):")
    lines += [f"  {request}: {prompt!r} -> {completion!r}" for request, prompt, completion in run["samples"]]
    return "\n".join(lines)


def failure_line(row) -> str:
    """One row of /metrics/failures in words."""
    where = f"rank {row['rank']} in step {row['step']} (layer {row['layer']}, {row['phase'].decode() or '-'})"
    recovery = 1e3 * (row["recovered_at"] - row["detected_at"])
    return (
        f"failure: {where}: detected at {row['detected_at']:.3f} s, recovered (its step done again) at "
        f"{row['recovered_at']:.3f} s: recovery {recovery:.0f} ms; {row['action'].decode()}"
    )


def partial_lines(run: dict) -> list[str]:
    done = run["partial"]
    return [
        f"partial: yes, stopped at step {done} (steps 0-{done - 1} done so far; a time-limit or signal stop)"
    ]


PLACEMENT_LINES = 16  # experts listed one per line; past it, a summary and the first few


def placement_lines(table: np.ndarray) -> list[str]:
    """`expert E -> ranks ...` lines; for many experts the replica counts, the experts per rank and
    the first PLACEMENT_LINES experts, so that 1024 experts do not print 1024 lines."""
    listed = [[int(r) for r in replicas if r >= 0] for replicas in table]
    lines = [f"  expert {e} -> ranks {' '.join(map(str, ranks))}" for e, ranks in enumerate(listed)]
    if len(listed) <= PLACEMENT_LINES:
        return lines
    replicas = np.bincount([len(ranks) for ranks in listed])
    per_rank = np.bincount([r for ranks in listed for r in ranks])
    hosting = per_rank[per_rank > 0]
    counts = ", ".join(f"{n}: {count} experts" for n, count in enumerate(replicas) if count)
    return (
        [
            f"  replicas per expert: {counts}",
            f"  experts per hosting rank: min {hosting.min()}, max {hosting.max()}, "
            f"over {len(hosting)} ranks",
        ]
        + lines[:PLACEMENT_LINES]
        + [f"  ... {len(listed) - PLACEMENT_LINES} more experts (all: the file's /placement)"]
    )


def rank_load_over_steps(run: dict) -> np.ndarray:
    """[steps, places] token slots each rank (expert group) receives per step: the step's /routing on
    the placement in force (the initial one, then each switch's from its step), split over replicas
    as the dispatcher splits them (loads.rank_loads, summed over MoE layers; 0 where no expert)."""
    from hpcmoe.runfile.loads import rank_loads

    in_force = [(0, run["placement"][0])] + list(run["switches"])
    loads = rank_loads(
        run["routing"],
        in_force,
        [int(n) for n in run["node_of_rank"]],
        int(run["placement_attrs"].get("expert_tp", 1)),
    )
    return np.nan_to_num(loads).sum(axis=1)
