"""The k-means router's per-token work in one pass: nearest centroid, norms and cosines, cluster sums,
and the commitment loss's gradient (:class:`routed.routers.kmeans.KMeansRouter` calls these).

    a, norm, cos, sums = centroid_stats(k, centroids, want_sums=True)   # assign the keys, EMA sums
    _, qn, qc, _ = centroid_stats(q, centroids, a)                      # queries to their keys' clusters
    loss = commitment_sum(k, centroids, a, norm, cos)                   # differentiable in k

``x`` is ``[B, H, N, D]`` or ``[B, H, G, N, D]`` (``G`` rows per assignment: a GQA group's query heads
against their key's cluster), any dtype and strides; ``centroids [H, C, D]`` (float32 unit rows).

Backends: ``"triton"`` (:mod:`.triton_kernels`: no ``[B, H, N, C]`` similarities, no float32 copies of
``x``, no gathered ``[B, H, N, D]`` centroids; CUDA GPUs, or the CPU under ``TRITON_INTERPRET=1``) and
``"reference"`` (:mod:`.reference`, PyTorch). None picks the kernel on CUDA unless
``ROUTED_KMEANS_KERNEL=0``; the cluster sums add by atomics, so under
``torch.use_deterministic_algorithms(True)`` None picks the reference and ``"triton"`` with sums raises.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...backends import kernel_or_reference
from ...env import env_switch, triton_why_not
from ...route import RouteError
from .reference import EPS, centroid_stats_reference, commitment_sum_reference, commitment_terms, gather_centroids

__all__ = ["EPS", "centroid_stats", "commitment_sum", "centroid_stats_reference", "commitment_sum_reference",
           "commitment_terms", "gather_centroids", "kernel_why_not", "resolve_backend"]


def _as_rows(x: Tensor, centroids: Tensor, assignment: Optional[Tensor]) -> Tensor:
    """``x`` as ``[B, H, G, N, D]`` after checking every shape."""
    if x.dim() not in (4, 5):
        raise RouteError(f"expected x [B, H, N, D] or [B, H, G, N, D], got shape {list(x.shape)}.")
    x5 = x.unsqueeze(2) if x.dim() == 4 else x
    B, H, G, N, D = x5.shape
    if centroids.dim() != 3 or centroids.shape[0] != H or centroids.shape[2] != D or centroids.shape[1] < 1:
        raise RouteError(f"centroids must be [H, C, D] = [{H}, C >= 1, {D}] for x {list(x.shape)}, got "
                         f"{list(centroids.shape)}.")
    if assignment is None and G != 1:
        raise RouteError(f"assigning needs one row per assignment: x [B, H, N, D], got {list(x.shape)}.")
    if assignment is not None and (tuple(assignment.shape) != (B, H, N) or assignment.dtype != torch.int64):
        raise RouteError(f"assignment must be int64 [B, H, N] = [{B}, {H}, {N}], got {assignment.dtype} "
                         f"{list(assignment.shape)}.")
    return x5


def kernel_why_not(x: Tensor, centroids: Tensor, want_sums: bool = False) -> Optional[str]:
    """None if the Triton kernels can take this call, else why not."""
    why = triton_why_not(x)
    if why is not None:
        return why
    if centroids.device != x.device:
        return f"centroids are on {centroids.device}, x on {x.device}"
    if want_sums and torch.are_deterministic_algorithms_enabled():
        return "the cluster sums add by atomics, which torch.use_deterministic_algorithms(True) forbids"
    if x.shape[-1] > 256:
        return f"head dims up to 256 are supported, got {x.shape[-1]}"
    return None


def resolve_backend(backend: Optional[str], x: Tensor, centroids: Tensor, want_sums: bool = False) -> str:
    """``"triton"`` or ``"reference"``: what ``backend`` (None: automatic, see the module docstring) runs
    for this call; a kernel that was asked for and cannot run raises."""
    return kernel_or_reference("k-means", backend, lambda: kernel_why_not(x, centroids, want_sums),
                               lambda: x.device.type == "cuda" and env_switch("ROUTED_KMEANS_KERNEL", True))


def _prepared(x5: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    return (x5 if x5.stride(-1) == 1 else x5.contiguous()), centroids.detach().float().contiguous()


def centroid_stats(x: Tensor, centroids: Tensor, assignment: Optional[Tensor] = None, *, want_sums: bool = False,
                   backend: Optional[str] = None) -> tuple[Optional[Tensor], Tensor, Tensor, Optional[Tensor]]:
    """Per-row statistics against the centroids (no gradient).

    Args:
        x: ``[B, H, N, D]`` or ``[B, H, G, N, D]``.
        centroids: ``[H, C, D]``.
        assignment: ``[B, H, N]`` int64 cluster of every row (shared by the ``G`` rows), or None to
            assign each row to its nearest centroid by cosine (first on ties; ``x`` must be 4-D).
        want_sums: also return the per-cluster sums of the unit rows (the EMA step's statistics).
    Returns:
        ``(assignment [B, H, N] or None, norm, cos, sums [H, C, D] or None)``: the new assignment when
        none was given; ``norm = |x|`` and ``cos = <x / max(|x|, eps), c_a>``, float32, shaped like
        ``x[..., 0]``.
    """
    x5 = _as_rows(x, centroids, assignment)
    shape = x.shape[:-1]
    if resolve_backend(backend, x, centroids, want_sums) == "reference":
        a, norm, cos, sums = centroid_stats_reference(x5, centroids, assignment, want_sums)
    else:
        from .triton_ops import centroid_stats_triton

        xk, ck = _prepared(x5.detach(), centroids)
        a, norm, cos, sums = centroid_stats_triton(xk, ck, assignment, want_sums)
        a = a if assignment is None else None
        sums = sums if want_sums else None
    return a, norm.view(shape), cos.view(shape), sums


def commitment_sum(x: Tensor, centroids: Tensor, assignment: Tensor, norm: Optional[Tensor] = None,
                   cos: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``sum over rows of |x_hat|^2 - 2 <x_hat, c_a>`` with ``x_hat = x / max(|x|, eps)`` (float32), i.e.
    ``sum ||x_hat - c_a||^2 - sum ||c_a||^2``: a scalar, differentiable in ``x`` (not in the centroids).

    Args:
        x: ``[B, H, N, D]`` or ``[B, H, G, N, D]``; ``centroids [H, C, D]``; ``assignment [B, H, N]``.
        norm, cos: :func:`centroid_stats`' values for these rows, when at hand (else computed).

    The kernel's backward reads ``centroids`` again: changing them in place before the backward (an
    EMA step) makes autograd raise; pass a copy then.
    """
    x5 = _as_rows(x, centroids, assignment)
    if resolve_backend(backend, x, centroids, False) == "reference":
        return commitment_sum_reference(x5, centroids, assignment)
    from .triton_ops import CommitmentSumKernel, centroid_stats_triton

    xk, ck = _prepared(x5, centroids)
    if norm is None or cos is None:
        _, norm, cos, _ = centroid_stats_triton(xk.detach(), ck, assignment, False)
    return CommitmentSumKernel.apply(xk, ck, assignment, norm.reshape(x5.shape[:-1]), cos.reshape(x5.shape[:-1]))
