"""Plain PyTorch references of the k-means router's per-token work (what the kernels must equal)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

EPS = 1e-12  # F.normalize's


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Unit rows and norms in float32 (float64 stays float64: the tests' exact references)."""
    x = x if x.dtype == torch.float64 else x.float()
    norm = torch.linalg.vector_norm(x, dim=-1)
    return x / norm.clamp_min(EPS)[..., None], norm


def gather_centroids(centroids: Tensor, assignment: Tensor) -> Tensor:
    """``[B, H, N, D]``: every row's centroid from ``centroids [H, C, D]`` and ``assignment [B, H, N]``,
    gathered from the centroids broadcast over the batch (no ``[B, H, N]`` head index to build)."""
    B, H, N = assignment.shape
    D = centroids.shape[-1]
    return centroids.unsqueeze(0).expand(B, H, -1, -1).gather(2, assignment.unsqueeze(-1).expand(B, H, N, D))


def _gather_centroids(centroids: Tensor, assignment: Tensor, groups: int) -> Tensor:
    """``[B, H, G, N, D]``: each row's centroid (``assignment [B, H, N]`` shared by the ``G`` rows)."""
    c = gather_centroids(centroids, assignment)
    return c.unsqueeze(2).expand(c.shape[0], c.shape[1], groups, *c.shape[2:])


def commitment_terms(norm: Tensor, cos: Tensor) -> Tensor:
    """Each row's ``|x_hat|^2 - 2 <x_hat, c_a>`` from its ``norm = |x|`` and ``cos = <x_hat, c_a>`` (the
    rows a commitment sum adds; ``|x_hat|^2`` is 1 but for rows shorter than ``EPS``)."""
    return torch.sub((norm / norm.clamp_min(EPS)).square(), cos, alpha=2)


def centroid_stats_reference(x: Tensor, centroids: Tensor, assignment: Optional[Tensor] = None,
                             want_sums: bool = False) -> tuple[Optional[Tensor], Tensor, Tensor, Optional[Tensor]]:
    """``x [B, H, G, N, D]``, ``centroids [H, C, D]``; ``assignment [B, H, N]`` or None (the nearest
    centroid by cosine, first on ties; ``G`` must be 1). Returns ``(assignment or None, norm [B, H, G, N],
    cos [B, H, G, N], sums [H, C, D] or None)`` as the kernel does (float32; float64 for float64 ``x``)."""
    xn, norm = _unit(x.detach())
    c = centroids.to(xn.dtype)
    new = None
    if assignment is None:
        new = assignment = torch.einsum("bhgnd,hcd->bhgnc", xn, c).argmax(-1)[:, :, 0]
    ca = _gather_centroids(c, assignment, x.shape[2])
    cos = (xn * ca).sum(-1)
    sums = None
    if want_sums:
        B, H, G, N, D = x.shape
        C = c.shape[1]
        flat = (torch.arange(H, device=x.device).view(1, H, 1, 1) * C + assignment[:, :, None]).expand(B, H, G, N)
        sums = torch.zeros(H * C, D, dtype=xn.dtype, device=x.device)
        sums = sums.index_add_(0, flat.reshape(-1), xn.reshape(-1, D)).view(H, C, D)
    return new, norm, cos, sums


def commitment_sum_reference(x: Tensor, centroids: Tensor, assignment: Tensor) -> Tensor:
    """``sum over rows of |x_hat|^2 - 2 <x_hat, c_a>`` (``= sum ||x_hat - c_a||^2 - sum ||c_a||^2``),
    ``x_hat = x / max(|x|, eps)`` in float32 (float64 for float64 ``x``), differentiable in
    ``x [B, H, G, N, D]``."""
    xn, _ = _unit(x)
    ca = _gather_centroids(centroids.detach().to(xn.dtype), assignment, x.shape[2])
    return (xn.square().sum(-1) - 2 * (xn * ca).sum(-1)).sum()
