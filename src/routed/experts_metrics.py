"""Routing metrics for mixture-of-experts layers: load per expert, routing fluctuation between
checkpoints, router entropy."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .route import ExpertRoute, RouteError

__all__ = ["expert_load", "load_imbalance", "top1_experts", "routing_fluctuation", "router_entropy"]


def expert_load(route: ExpertRoute) -> Tensor:
    """``[E]`` float: fraction of the live (token, expert) slots each expert received (sums to 1)."""
    return route.counts.float() / max(route.num_assignments, 1)


def load_imbalance(route: ExpertRoute) -> float:
    """Largest expert load over the mean load (1.0 = perfectly balanced)."""
    c = route.counts.float()
    return float(c.max() / c.mean().clamp_min(1e-12)) if c.numel() else 1.0


def top1_experts(route: ExpertRoute) -> Tensor:
    """``[T]`` int64: each token's highest-weight live expert, ``-1`` for a token with none."""
    w = torch.where(route.expert_ids >= 0, route.weights.detach().float(),
                    torch.full_like(route.weights, float("-inf"), dtype=torch.float32))
    best = w.argmax(-1, keepdim=True)
    ids = route.expert_ids.gather(-1, best).squeeze(-1).long()
    return torch.where(torch.isinf(w.gather(-1, best).squeeze(-1)), torch.full_like(ids, -1), ids)


def routing_fluctuation(before: Union[ExpertRoute, Tensor], after: Union[ExpertRoute, Tensor]) -> float:
    """Fraction of tokens whose top-1 expert differs between two routings of the same tokens (two
    checkpoints of one router, or a clean and a perturbed input).

    Each argument is an :class:`ExpertRoute` (its :func:`top1_experts` is used) or a ``[T]``
    integer tensor of top-1 expert ids.
    """
    a = top1_experts(before) if isinstance(before, ExpertRoute) else before
    b = top1_experts(after) if isinstance(after, ExpertRoute) else after
    if a.shape != b.shape or a.dim() != 1:
        raise RouteError(f"the two routings must cover the same tokens: got top-1 ids of shapes {list(a.shape)} "
                         f"and {list(b.shape)}.")
    return float((a != b).float().mean()) if a.numel() else 0.0


def router_entropy(probs: Tensor) -> float:
    """Mean entropy (nats) of the per-token gate distributions ``probs [..., E]`` (rows sum to 1);
    ``log(E)`` is uniform, 0 is one-hot."""
    p = probs.detach().float()
    return float(-(p * p.clamp_min(1e-20).log()).sum(-1).mean())
