"""Gating: router scores -> top-k experts and weights per token (pure torch, no MPI)."""

from __future__ import annotations

import torch


def topk_lower_index_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores: [tokens, experts] -> [tokens, k] indices of the k largest; ties go to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [tokens, experts] -> (expert_ids [tokens, k] int64, weights [tokens, k] float32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    expert_ids = topk_lower_index_first(probs, k)
    weights = probs.gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return expert_ids, weights


def sigmoid_group_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing. logits: [tokens, experts] float32; bias: [experts] correction bias.

    The bias steers the choice only; weights come from the unbiased sigmoid scores. Groups are
    ranked by the sum of their two best biased scores and only the best `topk_group` groups compete.
    -> (expert_ids [tokens, k] int64, weights [tokens, k] float32)
    """
    scores = logits.sigmoid()
    choice = scores + bias.float()
    tokens, experts = choice.shape
    grouped = choice.view(tokens, n_group, experts // n_group)
    group_scores = grouped.topk(min(2, experts // n_group), dim=-1).values.sum(-1)  # [tokens, n_group]
    best_groups = topk_lower_index_first(group_scores, topk_group)
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    choice = choice.masked_fill(~allowed.repeat_interleave(experts // n_group, dim=1), float("-inf"))
    expert_ids = topk_lower_index_first(choice, k)
    weights = scores.gather(1, expert_ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return expert_ids, weights * scaling


def tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """expert_ids: [tokens, k] -> [experts] int64, how many token slots chose each expert."""
    return torch.bincount(expert_ids.flatten(), minlength=num_experts)


def score_gap(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores: [tokens, experts] -> [tokens], the margin between the k-th and (k+1)-th best score."""
    top = torch.sort(scores, dim=-1, descending=True).values
    return top[:, k - 1] - top[:, k] if scores.shape[1] > k else torch.full(scores.shape[:1], float("inf"))
