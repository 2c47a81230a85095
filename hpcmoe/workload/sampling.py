"""How the next token is chosen: greedy, or seeded sampling (temperature, top-k, top-p, a
Gumbel-max draw) that gives the same tokens at any rank count, layout or micro-batch count. Pure
numpy on the host.
"""

from __future__ import annotations

import hashlib

import numpy as np


def choose(logits: np.ndarray, request_ids: list[str], positions: list[int], sampling) -> np.ndarray:
    """logits: [b, vocab] float32 on the host -> [b] token ids. Greedy (the largest logit, ties to the
    lower index) without `sampling` or at temperature 0; otherwise top-k, then top-p (the smallest set
    of most likely tokens whose probability reaches p), then a draw by the Gumbel-max rule with noise
    from a generator seeded by (seed, request id, position: the index of the token in its request):
    a request's draw never depends on which rank, micro-batch or step it ran in, or on the others."""
    if sampling is None or sampling.temperature == 0 or len(logits) == 0:
        return logits.argmax(axis=-1)
    chosen = np.empty(len(logits), dtype=np.int64)
    for row, (scores, request_id, position) in enumerate(
        zip(logits.astype(np.float64), request_ids, positions)
    ):
        scores = scores / sampling.temperature
        keep = np.ones(len(scores), dtype=bool)
        if sampling.top_k:
            kth = np.sort(scores)[-min(sampling.top_k, len(scores))]
            keep &= scores >= kth
        if sampling.top_p is not None and sampling.top_p < 1:
            order = np.argsort(-np.where(keep, scores, -np.inf), kind="stable")
            probs = np.exp(scores[order] - scores[order[0]]) * keep[order]
            probs /= probs.sum()
            before = np.cumsum(probs) - probs  # probability of the more likely tokens
            keep[order[before >= sampling.top_p]] = False  # the most likely token always stays
        noise = gumbel(sampling.seed, request_id, position, len(scores))
        chosen[row] = int(np.argmax(np.where(keep, scores + noise, -np.inf)))
    return chosen


def gumbel(seed: int, request_id: str, position: int, size: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed}/{request_id}/{position}".encode()).digest()
    uniform = np.random.default_rng(int.from_bytes(digest[:8], "little")).random(size)
    return -np.log(-np.log(np.clip(uniform, 1e-300, 1.0)))
