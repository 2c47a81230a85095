"""Rank load from /routing: an earlier run's routing read back (parallel.placement_from), the token
slots each rank's experts compute under the placements in force, and the imbalance figures of
them (max / mean over the expert-hosting ranks, whole run and per step).
"""

from __future__ import annotations

import numpy as np


def read_routing(path: str, num_experts: int) -> np.ndarray:
    """An earlier complete run's /routing [steps, moe_layers, sources, experts], for placement_from."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if not f.attrs.get("complete", False):
                raise ValueError(f"parallel.placement_from: {path} is not a complete run file")
            routing = f["routing"][:]
    except (OSError, KeyError) as e:
        raise ValueError(f"parallel.placement_from: cannot read /routing from {path}: {e}") from None
    if routing.shape[-1] != num_experts:
        raise ValueError(
            f"parallel.placement_from: {path} routed to {routing.shape[-1]} experts, "
            f"model.num_experts is {num_experts}"
        )
    return routing


def rank_loads(routing: np.ndarray, in_force: list, node_of_rank: list[int], tp: int = 1) -> np.ndarray:
    """[steps, moe_layers, places] token slots the experts of each place (a rank, or a group of tp
    ranks) compute, from /routing [steps, moe_layers, sources, experts] and the placement in force
    at each step (in_force: [(first step, table [experts, replicas] of ranks, -1 padded)], ascending),
    split over replicas as the dispatcher splits them. A place that hosts no expert in the table in
    force (an attention rank of ma, a spare) is NaN: it is not a rank that could be loaded. The
    receiver of the payload, not the wire: two_stage's gateways forward, they do not compute."""
    from hpcmoe.parallel.placement import placement_of
    from hpcmoe.parallel.traffic import rank_load_shares

    steps, layers, _, experts = routing.shape
    places, nodes = len(node_of_rank) // tp, list(node_of_rank)[::tp]
    by_node = np.einsum(
        "tlse,sn->tlne", routing.astype(float), np.eye(max(node_of_rank) + 1)[list(node_of_rank)]
    )
    out = np.full((steps, layers, places), np.nan)
    for i, (first, table) in enumerate(in_force):  # every step at once, per placement in force
        last = in_force[i + 1][0] if i + 1 < len(in_force) else steps
        if first >= min(last, steps):
            continue
        placement = placement_of(table, places, tp)
        shares = rank_load_shares(placement, nodes)
        orphans = shares.sum(axis=2) == 0  # [nodes, experts] with no replica
        if (by_node[first:last][..., orphans] > 0).any():
            expert = int(np.flatnonzero(orphans.any(0) & (by_node[first:last].sum((0, 1, 2)) > 0))[0])
            raise ValueError(f"token slots sent to expert {expert}, which has no replica")
        hosting = sorted(set(placement.slot_rank))
        out[first:last][..., hosting] = np.einsum("tlne,ner->tlr", by_node[first:last], shares)[..., hosting]
    return out


def max_over_mean(load: np.ndarray) -> float:
    """max / mean over the places that host experts (NaN entries left out); NaN without load."""
    hosting = load[~np.isnan(load)]
    return float(hosting.max() / hosting.mean()) if len(hosting) and hosting.mean() > 0 else float("nan")


def rank_load_imbalance(loads: np.ndarray) -> float:
    """Whole run: per MoE layer, max / mean over expert-hosting places of the slots each computed
    over all steps, then the mean over layers (loads: rank_loads' [steps, moe_layers, places])."""
    per_layer = [
        max_over_mean(np.where(np.isnan(loads[:, layer]).all(0), np.nan, np.nansum(loads[:, layer], 0)))
        for layer in range(loads.shape[1])
    ]
    return float(np.nanmean(per_layer)) if not np.isnan(per_layer).all() else float("nan")


def step_imbalance(loads: np.ndarray) -> float:
    """Mean over steps and MoE layers of each one's max / mean over expert-hosting places: the
    whole-run figure hides a load that moves from rank to rank, or from layer to layer; this one
    does not (layer 0 all on rank 0 and layer 1 all on rank 1 reads 2 at 2 ranks, not 1)."""
    each = [max_over_mean(loads[s, i]) for s in range(loads.shape[0]) for i in range(loads.shape[1])]
    return float(np.nanmean(each)) if len(each) and not np.isnan(each).all() else float("nan")


def file_loads(f, steps: int | None = None) -> np.ndarray:
    """rank_loads of an open run file (its first `steps` steps, default all): its /routing on
    /placement, then each switch of /placement_history from its step."""
    placement = f["placement"]
    in_force = (
        [(0, placement[0])] + [(int(row["step"]), row["placement"]) for row in f["placement_history"][:]]
        if "placement_history" in f
        else [(0, placement[0])]
    )
    return rank_loads(
        f["routing"][:steps],
        in_force,
        [int(n) for n in f.attrs["node_of_rank"]],
        int(placement.attrs.get("expert_tp", 1)),
    )


def previous_imbalance(path: str) -> float:
    """The rank load max/mean of an earlier run file."""
    import h5py

    with h5py.File(path, "r") as f:
        return rank_load_imbalance(file_loads(f))
