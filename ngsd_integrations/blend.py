"""Union-top-k interpolation of the base and expert distributions (applied on a spike)."""

from __future__ import annotations

import torch


def union_top_k_blend(
    p_base: torch.Tensor, p_expert: torch.Tensor, alpha: torch.Tensor | float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend scores and the candidate mask for rows of probabilities ``(batch, vocab)``.

    Candidates are the union of each model's top-``k`` tokens. On candidates the score is
    ``p_base + alpha * (p_expert - p_base)``; elsewhere it stays ``p_base``, so a token neither
    model ranks highly can never be promoted by the expert. ``alpha`` is a float or one value
    per row. Inputs are not modified.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    k = min(k, p_base.shape[-1])
    candidates = torch.zeros_like(p_base, dtype=torch.bool)
    candidates.scatter_(-1, p_base.topk(k, dim=-1).indices, True)
    candidates.scatter_(-1, p_expert.topk(k, dim=-1).indices, True)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(p_base.dtype).reshape(-1, *([1] * (p_base.dim() - 1)))
    scores = torch.where(candidates, p_base + alpha * (p_expert - p_base), p_base)
    return scores, candidates
