"""Host launchers, autograd and the ``torch.compile`` custom ops of the k-means router's kernels."""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...testing import new_output
from .reference import EPS, commitment_terms  # EPS: F.normalize's
from .triton_kernels import _centroid_fwd_kernel, _commitment_bwd_kernel

BLOCK_N = 64  # rows per program of the passes that read a given assignment (bandwidth-bound)
STATS_CONFIG = {"BLOCK_N": BLOCK_N, "BLOCK_C": 64, "num_warps": 4, "PRECISION": "ieee"}  # no products there
# The assigning pass's launch (benchmarks/kmeans_kernel.py, results/h200/kmeans_kernel.json): products in
# three TF32 tensor-core passes ran 3.5x faster than FMA ("ieee") at 64k tokens and 256 clusters (0.42 vs
# 1.46 ms with the sums) and kept PyTorch's float32 clusters but for ~4 rows in a million (near-ties).
ASSIGN_CONFIG = {"BLOCK_N": 128, "BLOCK_C": 64, "num_warps": 8, "PRECISION": "tf32x3"}


def _blocks(n_clusters: int, dim: int, block_c: int = 64) -> tuple[int, int]:
    """(centroids per chunk, padded head dim): tensor-core tiles need at least 16 of each."""
    return min(block_c, max(16, triton.next_power_of_2(n_clusters))), max(16, triton.next_power_of_2(dim))


def centroid_stats_launch(x: Tensor, centroids: Tensor, assignment: Optional[Tensor], want_sums: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x [B, H, G, N, D]`` (last axis contiguous), ``centroids [H, C, D]`` float32 contiguous,
    ``assignment [B, H, N]`` int64 or None (then computed, ``G`` must be 1).

    Returns ``(assignment [B, H, N] or empty, norm [B, H, G, N], cos [B, H, G, N], sums [H, C, D] or
    empty)``: the new assignment when none was given; ``|x|`` and ``<x_hat, c_a>`` in float32; the
    per-cluster sums of the unit rows when ``want_sums``."""
    B, H, G, N, D = x.shape
    C = centroids.shape[1]
    dev = x.device
    assign = assignment is None
    a = new_output((B, H, N), dtype=torch.int64, device=dev) if assign else assignment
    norm = new_output((B, H, G, N), dtype=torch.float32, device=dev)
    cos = new_output((B, H, G, N), dtype=torch.float32, device=dev)
    sums = torch.zeros((H, C, D) if want_sums else (0,), dtype=torch.float32, device=dev)
    if x.numel():
        cfg = ASSIGN_CONFIG if assign else STATS_CONFIG
        block_c, block_d = _blocks(C, D, cfg["BLOCK_C"])
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), B * H * G)
        _centroid_fwd_kernel[grid](x, centroids, a, norm, cos, sums, *x.stride()[:4], *a.stride(),
                                   *norm.stride()[:3], H, G, N, C, D, EPS, BLOCK_N=cfg["BLOCK_N"], BLOCK_C=block_c,
                                   BLOCK_D=block_d, ASSIGN=assign, SUMS=want_sums, PRECISION=cfg["PRECISION"],
                                   num_warps=cfg["num_warps"])
    return (a if assign else a.new_empty(0)), norm, cos, sums


def commitment_grad_launch(x: Tensor, centroids: Tensor, assignment: Tensor, norm: Tensor, cos: Tensor,
                           grad: Tensor) -> Tensor:
    """The gradient of ``grad * commitment_sum`` for ``x [B, H, G, N, D]`` (last axis contiguous), in
    ``x``'s dtype and shape (contiguous); the other arguments as :func:`centroid_stats_launch` returns
    them, ``grad`` a float32 scalar tensor."""
    B, H, G, N, D = x.shape
    out = new_output(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        grid = (triton.cdiv(N, BLOCK_N), B * H * G)
        _commitment_bwd_kernel[grid](x, centroids, assignment, norm, cos, grad, out, *x.stride()[:4],
                                     *assignment.stride(), *norm.stride()[:3], *out.stride()[:4], H, G, N,
                                     centroids.shape[1], D, EPS, BLOCK_N=BLOCK_N,
                                     BLOCK_D=_blocks(centroids.shape[1], D)[1], num_warps=4)
    return out


# ------------------------------------------------------------------------------ torch.compile path
@torch.library.custom_op("routed::centroid_stats", mutates_args=())
def centroid_stats_op(x: Tensor, centroids: Tensor, assignment: Optional[Tensor], want_sums: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return centroid_stats_launch(x, centroids, assignment, want_sums)


@centroid_stats_op.register_fake
def _(x, centroids, assignment, want_sums):
    B, H, G, N, D = x.shape
    a = x.new_empty((B, H, N), dtype=torch.int64) if assignment is None else x.new_empty(0, dtype=torch.int64)
    stat = x.new_empty((B, H, G, N), dtype=torch.float32)
    sums = x.new_empty((H, centroids.shape[1], D) if want_sums else (0,), dtype=torch.float32)
    return a, stat, torch.empty_like(stat), sums


@torch.library.custom_op("routed::commitment_grad", mutates_args=())
def commitment_grad_op(x: Tensor, centroids: Tensor, assignment: Tensor, norm: Tensor, cos: Tensor,
                       grad: Tensor) -> Tensor:
    return commitment_grad_launch(x, centroids, assignment, norm, cos, grad)


@commitment_grad_op.register_fake
def _(x, centroids, assignment, norm, cos, grad):
    return x.new_empty(x.shape)


def centroid_stats_triton(x: Tensor, centroids: Tensor, assignment: Optional[Tensor], want_sums: bool):
    """Eager calls launch directly (no custom-op dispatch cost); ``torch.compile`` sees the custom op."""
    if torch.compiler.is_compiling():
        return centroid_stats_op(x, centroids, assignment, want_sums)
    return centroid_stats_launch(x, centroids, assignment, want_sums)


class CommitmentSumKernel(torch.autograd.Function):
    """``sum over rows of |x_hat|^2 - 2 <x_hat, c_a>`` from the rows' ``norm`` and ``cos`` (forward: two
    ``[B, H, G, N]`` passes), differentiable in ``x [B, H, G, N, D]``; the backward kernel gathers each
    row's centroid again from ``centroids [H, C, D]`` (nothing of size ``[B, H, G, N, D]`` is saved
    beyond ``x`` itself)."""

    @staticmethod
    def forward(ctx, x: Tensor, centroids: Tensor, assignment: Tensor, norm: Tensor, cos: Tensor) -> Tensor:
        ctx.save_for_backward(x, centroids, assignment, norm, cos)
        return commitment_terms(norm, cos).sum()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, centroids, assignment, norm, cos = ctx.saved_tensors
        g = g.float().reshape(())
        if torch.compiler.is_compiling():
            grad = commitment_grad_op(x, centroids, assignment, norm, cos, g)
        else:
            grad = commitment_grad_launch(x, centroids, assignment, norm, cos, g)
        return grad, None, None, None, None
