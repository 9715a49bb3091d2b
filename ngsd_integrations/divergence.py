"""Divergences between the base and expert next-token distributions.

Pure functions on probability rows of shape ``(..., vocab)``; each returns shape ``(...)``.
"""

from __future__ import annotations

from typing import Callable

import torch

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LN2 = 0.6931471805599453


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum |p - q|``: the probability mass the two models disagree on, in [0, 1]."""
    return 0.5 * (p - q).abs().sum(dim=-1)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` in nats. Unbounded: tokens the expert rules out weigh heavily."""
    tiny = torch.finfo(q.dtype).tiny
    return torch.special.xlogy(p, p).sum(dim=-1) - (p * q.clamp_min(tiny).log()).sum(dim=-1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits, so it is bounded by 1 like total variation."""
    m = 0.5 * (p + q)
    nats = 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)
    return (nats / _LN2).clamp(0.0, 1.0)


DIVERGENCES: dict[str, Divergence] = {"tv": total_variation, "jsd": jensen_shannon, "kl": kl_divergence}


def get_divergence(name: str) -> Divergence:
    """The divergence function called ``name`` (``tv``, ``jsd`` or ``kl``)."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"divergence={name!r} is not one of {sorted(DIVERGENCES)}") from None
