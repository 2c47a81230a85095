"""The routing of a simulated run and the engine's plans for it (hpcmoe.simulate).

Experts come from the engine's router functions (hpcmoe.router) on synthetic scores (the seeded
router's logits are about N(0, 1), plus model.router_skew as Router.forward adds it) or on a recorded
/routing's distribution; each rank's plan from the engine's own dispatch code: compile_placement's
tables, choose_slots, apply_capacity, plan_from_slots, node_groups. Looked up as `dispatch.NAME` at
each call, so that a change there changes the simulation (tests/test_simulate.py does one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hpcmoe import dispatch
from hpcmoe.router import sigmoid_group_topk, softmax_topk


@dataclass
class PlanInfo:
    """One source's dispatch plan for one exchange, as the engine computes it (numpy on the host)."""
    expert_counts: np.ndarray     # [E] token slots per expert (the /routing row)
    rank_counts: np.ndarray       # [R] rows to each rank
    send_counts: np.ndarray       # [R, S] rows to each rank's slots
    dropped: int = 0              # token slots over capacity (parallel.capacity_factor), as the engine drops them
    node_counts: list = field(default_factory=list)   # two_stage: rows to each node's gateway
    node_slots: list = field(default_factory=list)    # two_stage: [t, k] slots of those rows, per node


def expert_ids(sim, rank: int, step: int, layer: int, n: int) -> torch.Tensor:
    """[n, k] experts of a rank's n tokens: the engine's router functions on synthetic scores
    (the seeded router's logits are about N(0, 1), plus model.router_skew as Router.forward adds
    it), or on log p + Gumbel noise for a recorded /routing's distribution p (a draw without
    replacement in proportion to p)."""
    m, r = sim.config.model, sim.config.run
    generator = torch.Generator().manual_seed(hash((m.seed, rank, step, layer, n)) & (2 ** 62 - 1))
    experts = torch.arange(m.num_experts)
    if sim.recorded is not None:
        steps, _, sources, _ = sim.recorded.shape
        at = step if step < steps else 1 + (step - 1) % max(steps - 1, 1)
        load = sim.recorded[min(at, steps - 1), layer - m.dense_layers]
        p = torch.tensor(load[rank] if sources == sim.ranks and load[rank].sum() else load.sum(0), dtype=torch.float)
        uniform = torch.rand(n, m.num_experts, generator=generator).clamp(min=1e-12)
        return softmax_topk(torch.log(p / p.sum() + 1e-12) - torch.log(-torch.log(uniform)), m.top_k, False)[0]
    logits = torch.randn(n, m.num_experts, generator=generator)
    if m.router_skew:
        shift = step // r.skew_drift if r.skew_drift else 0
        logits += m.router_skew * (1 - ((experts - shift) % m.num_experts) / max(m.num_experts - 1, 1))
    if m.router == "softmax":
        return softmax_topk(logits, m.top_k, m.norm_topk_prob)[0]
    return sigmoid_group_topk(logits, torch.zeros(m.num_experts), m.top_k, m.n_group, m.topk_group,
                              m.norm_topk_prob, m.routed_scaling_factor)[0]


def plan(sim, rank: int, step: int, layer: int, n: int) -> PlanInfo:
    """The engine's plan for this rank's n tokens (compile_placement, choose_slots, capacity,
    plan_from_slots, node_groups). Synthetic routing without drift is the same law in every
    layer and step, so its plans are made once per (rank, n)."""
    same_law = sim.same_law
    key = (rank, n) if same_law else (rank, n, step, layer)
    if key not in sim.plans:
        tables = sim.tables[rank]
        ids = expert_ids(sim, rank, 0 if same_law else step, 0 if same_law else layer, n)
        slots = dispatch.choose_slots(ids, tables)
        if sim.config.parallel.capacity_factor is not None:
            slots = dispatch.apply_capacity(slots, sim.config.parallel.capacity_factor, tables.num_slots)
        plan = dispatch.plan_from_slots(slots, tables)
        info = PlanInfo(dispatch.count(ids.reshape(-1), sim.config.model.num_experts).numpy(), plan.rank_counts.numpy(),
                        plan.send_counts.numpy(), int((slots < 0).sum()))
        if sim.config.parallel.dispatch == "two_stage":
            groups = dispatch.node_groups(slots, torch.zeros(slots.shape), tables)
            info.node_counts = groups.node_counts
            info.node_slots = list(groups.slots.split(groups.node_counts))
        sim.plans[key] = info
    return sim.plans[key]


def gateway_plan(sim, gateway: int, slots: torch.Tensor, key) -> PlanInfo:
    """Stage 2 of two_stage: the gateway's plan of the rows it received (their slots [t, k]);
    `key` names rows that are the same whenever it repeats (made once)."""
    if (gateway, key) not in sim.plans:
        plan = dispatch.plan_from_slots(slots, sim.tables[gateway])
        sim.plans[gateway, key] = PlanInfo(np.zeros(0), plan.rank_counts.numpy(), plan.send_counts.numpy())
    return sim.plans[gateway, key]
