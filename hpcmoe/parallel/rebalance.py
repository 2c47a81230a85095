"""Online rebalancing's decisions, without MPI: the predicted imbalance of a placement on an
observed load, the placement proposed for it, the moves from one placement to the other, and the
record of a switch.

Separate from runtime/rebalance.py, which moves the weights and switches at a step boundary every
rank agrees on: what to decide is planning, like the placements themselves, and the report reads it
without the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcmoe.parallel.placement import Placement, replicated
from hpcmoe.parallel.traffic import expected_rank_load


@dataclass
class Switch:
    """One row of /placement_history: a placement that took effect during the run."""

    step: int  # the first step run on it
    decided_at_step: int  # its moves started after this step
    placement: Placement  # rank level (with expert_tp: each group's leader)
    bytes_moved: int  # expert weight bytes sent between ranks, all ranks together
    predicted_before: float  # rank load max/mean of the old placement on the window's load
    predicted: float  # ... of the new one
    digest: str = ""  # parallel.rebalance.checksums: this rank's expert weights after the switch


def imbalance(placement: Placement, tokens_from_node: np.ndarray, node_of_place: list[int]) -> float:
    """Predicted max / mean of the load each place (rank or expert group) receives."""
    load = np.array(expected_rank_load(placement, tokens_from_node.tolist(), node_of_place))
    return float(load.max() / load.mean()) if load.mean() > 0 else 1.0


def propose(current: Placement, tokens_from_node: np.ndarray, node_of_place: list[int]) -> Placement:
    """The placement for this load (tokens_from_node: [nodes, experts]), replicated over the current
    one's slots per place (the layout admits only placements with spare slots)."""
    slots = max(len(current.slots_of_rank(p)) for p in range(current.num_ranks))
    return replicated(current.num_experts, current.num_ranks, slots, tokens_from_node.sum(0).tolist())


def plan_moves(old: Placement, new: Placement) -> list[tuple[int, int, int]]:
    """-> [(expert, from place, to place)] for every expert a place gains, taken from one of its old
    holders (chosen by destination + expert, which spreads the senders), in a fixed order."""
    holders = old.expert_ranks()
    moves = []
    for place in range(new.num_ranks):
        had = set(old.experts_of_rank(place))
        for expert in new.experts_of_rank(place):
            if expert not in had:
                sources = holders[expert]
                moves.append((expert, sources[(place + expert) % len(sources)], place))
    return moves


def worth_moving(
    current: Placement,
    new: Placement,
    tokens_from_node: np.ndarray,
    node_of_place: list[int],
    min_gain: float,
) -> tuple[float, float] | None:
    """-> (predicted rank load max/mean of the current placement, of the new one) when the new one is
    worth its moves: it differs, and lowers the figure by at least min_gain of it; else None."""
    before, after = (
        imbalance(current, tokens_from_node, node_of_place),
        imbalance(new, tokens_from_node, node_of_place),
    )
    if (
        (new.slot_expert, new.slot_rank) == (current.slot_expert, current.slot_rank)
        or after >= before
        or before - after < min_gain * before
    ):
        return None
    return before, after
