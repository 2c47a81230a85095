"""The routing of a simulated run (hpcmoe.sim.simulate): which experts each rank's tokens go to.

Experts come from the engine's router functions (hpcmoe.model.router) on synthetic scores (the seeded
router's logits are about N(0, 1), plus model.router_skew as Router.forward adds it) or on a recorded
/routing's distribution. Slots, capacity and plans are the engine's own: the exchange that runs in
the simulation (sim.net) is moe_layer's.
"""

from __future__ import annotations

import torch

from hpcmoe.model.router import sigmoid_group_topk, softmax_topk


def expert_ids(sim, rank: int, step: int, layer: int, n: int) -> torch.Tensor:
    """[n, k] experts of a rank's n tokens: the engine's router functions on synthetic scores
    (the seeded router's logits are about N(0, 1), plus model.router_skew as Router.forward adds
    it), or on log p + Gumbel noise for a recorded /routing's distribution p (a draw without
    replacement in proportion to p)."""
    m, r = sim.config.model, sim.config.run
    generator = torch.Generator().manual_seed(hash((m.seed, rank, step, layer, n)) & (2**62 - 1))
    experts = torch.arange(m.num_experts)
    if sim.recorded is not None:
        steps, _, sources, _ = sim.recorded.shape
        at = step if step < steps else 1 + (step - 1) % max(steps - 1, 1)
        load = sim.recorded[min(at, steps - 1), layer - m.dense_layers]
        p = torch.tensor(
            load[rank] if sources == sim.ranks and load[rank].sum() else load.sum(0), dtype=torch.float
        )
        uniform = torch.rand(n, m.num_experts, generator=generator).clamp(min=1e-12)
        return softmax_topk(torch.log(p / p.sum() + 1e-12) - torch.log(-torch.log(uniform)), m.top_k, False)[
            0
        ]
    logits = torch.randn(n, m.num_experts, generator=generator)
    if m.router_skew:
        shift = step // r.skew_drift if r.skew_drift else 0
        logits += m.router_skew * (1 - ((experts - shift) % m.num_experts) / max(m.num_experts - 1, 1))
    if m.router == "softmax":
        return softmax_topk(logits, m.top_k, m.norm_topk_prob)[0]
    return sigmoid_group_topk(
        logits,
        torch.zeros(m.num_experts),
        m.top_k,
        m.n_group,
        m.topk_group,
        m.norm_topk_prob,
        m.routed_scaling_factor,
    )[0]


def experts(sim, rank: int, step: int, layer: int, n: int) -> torch.Tensor:
    """expert_ids, drawn once per (rank, n) where every layer and step follows the same law
    (synthetic routing without drift)."""
    key = (rank, n) if sim.same_law else (rank, n, step, layer)
    if key not in sim.routes:
        sim.routes[key] = expert_ids(sim, rank, 0 if sim.same_law else step, 0 if sim.same_law else layer, n)
    return sim.routes[key]
