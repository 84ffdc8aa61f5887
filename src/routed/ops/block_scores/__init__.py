"""Block-importance estimates for training-free routing: how much attention mass each key block
would get, computed without the full attention.

Public functions (``backend`` is ``"reference"``, ``"triton"`` or ``None`` for automatic: Triton on
CUDA, the reference elsewhere; a backend asked for by name that cannot run raises):

* :func:`pooled_block_probs` -- from mean-pooled query and key blocks (cheap: ``O(N^2 / block^2)``).
* :func:`sampled_block_mass` -- the exact attention of sampled queries against every key,
  summed per key block (finer: ``O(samples x N)``).

Both return ``[batch, kv_heads, rows, num_kv_blocks]`` (``head_reduce="none"``: query heads) float32 rows of probabilities (each row
sums to 1 before the reduction over a GQA group's query heads), ready for
:mod:`routed.routers.estimators` to turn into a KV-head :class:`~routed.BlockRoute`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...backends import BackendUnavailable
from ...env import triton_why_not
from ...route import RouteError
from .reference import block_means, pooled_block_probs_reference, sampled_block_mass_reference

__all__ = ["pooled_block_probs", "sampled_block_mass", "block_means", "check_qk_heads", "estimator_backend_why_not"]

_HEAD_REDUCES = ("max", "mean", "none")


def check_qk_heads(q: Tensor, k: Tensor) -> None:
    """``q``/``k`` are 4-D floating-point ``[batch, heads, seq, head_dim]`` tensors that share batch
    and head_dim, with the query heads a multiple of the key heads (GQA); a clear error otherwise."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise RouteError(f"{name} must be a 4-D floating-point tensor [batch, heads, seq, head_dim] (the SDPA "
                             f"layout), got {getattr(t, 'shape', type(t).__name__)}.")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise RouteError(f"q {list(q.shape)} and k {list(k.shape)} must share batch and head_dim.")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise RouteError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of key/value "
                         f"heads ({k.shape[1]}).")


def _check_qk(q: Tensor, k: Tensor, block_size: int, head_reduce: str) -> None:
    check_qk_heads(q, k)
    if k.shape[2] < q.shape[2]:
        raise RouteError(f"k has {k.shape[2]} tokens but q has {q.shape[2]}: the queries must be the last q_len "
                         "positions of the keys (self-attention prefill, or a chunk after a KV cache).")
    if not isinstance(block_size, int) or block_size < 1:
        raise RouteError(f"block_size must be a positive int, got {block_size!r}.")
    if head_reduce not in _HEAD_REDUCES:
        raise RouteError(f"head_reduce must be one of {_HEAD_REDUCES}, got {head_reduce!r}.")


def estimator_backend_why_not(q: Tensor, block_size: int, sampled: bool) -> Optional[str]:
    """None if the Triton estimator kernels can run on ``q`` with ``block_size``, else the reason."""
    why = triton_why_not(q)
    if why is not None:
        return why
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} exceeds 256"
    if sampled and (block_size < 16 or block_size > 256 or block_size & (block_size - 1)):
        return f"block_size={block_size} must be a power of two in [16, 256] for the sampled-query kernel"
    return None


def _pick(backend: Optional[str], q: Tensor, block_size: int, sampled: bool) -> str:
    if backend not in (None, "reference", "triton"):
        raise ValueError(f"estimator backend must be 'reference', 'triton' or None (automatic), got {backend!r}.")
    if backend == "reference":
        return backend
    why = estimator_backend_why_not(q, block_size, sampled)
    if backend == "triton" and why is not None:
        raise BackendUnavailable(f"the triton estimator cannot run this call: {why}.")
    if backend is None:
        return "triton" if why is None and q.device.type == "cuda" else "reference"
    return backend


def pooled_block_probs(q: Tensor, k: Tensor, block_size: int, *, scale: Optional[float] = None,
                       head_reduce: str = "max", backend: Optional[str] = None) -> Tensor:
    """Estimated attention mass per (query block, key block) from mean-pooled blocks.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` (``Nk >= Nq``; queries are the last ``Nq``
            positions); ``Hq`` a multiple of ``Hkv``.
        block_size: tokens per query block and per key block.
        scale: attention scale (default ``D ** -0.5``).
        head_reduce: ``"max"`` or ``"mean"`` over the query heads of a GQA group, or ``"none"``
            (one row per query head: ``Hq`` instead of ``Hkv`` on the head axis).
        backend: ``"reference"``, ``"triton"`` or None (automatic).
    Returns:
        ``[B, Hkv, ceil(Nq / block_size), ceil(Nk / block_size)]`` float32; zero where a key block
        lies wholly after every query of the query block.
    """
    _check_qk(q, k, block_size, head_reduce)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _pick(backend, q, block_size, sampled=False) == "triton":
        from .triton_kernels import pooled_block_probs_triton

        return pooled_block_probs_triton(q, k, block_size, scale, head_reduce)
    return pooled_block_probs_reference(q, k, block_size, scale, head_reduce)


def sampled_block_mass(q: Tensor, k: Tensor, rows: Tensor, rows_per_group: int, block_size: int, *,
                       scale: Optional[float] = None, head_reduce: str = "max",
                       backend: Optional[str] = None) -> Tensor:
    """Exact attention mass per key block of sampled queries, averaged over each group of rows.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` (``Nk >= Nq``; queries are the last ``Nq``
            positions); ``Hq`` a multiple of ``Hkv``.
        rows: ``[num_groups * rows_per_group]`` int query indices in ``[0, Nq)``; consecutive runs
            of ``rows_per_group`` form a group (for example the sampled queries of one block).
        rows_per_group: a power of two (the kernel reduces a group in registers).
        block_size: tokens per key block (a power of two in [16, 256] for the Triton kernel).
        scale, head_reduce, backend: as in :func:`pooled_block_probs`.
    Returns:
        ``[B, Hkv, num_groups, ceil(Nk / block_size)]`` float32.
    """
    _check_qk(q, k, block_size, head_reduce)
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise RouteError("rows must be a 1-D int32/int64 tensor of query indices.")
    if (not isinstance(rows_per_group, int) or rows_per_group < 1 or rows_per_group & (rows_per_group - 1)
            or rows.numel() % rows_per_group or rows.numel() == 0):
        raise RouteError(f"rows_per_group must be a power of two that divides len(rows) = {rows.numel()}, "
                         f"got {rows_per_group!r}.")
    if rows.device != q.device:
        raise RouteError(f"rows is on {rows.device} but q on {q.device}; move it with rows.to(q.device).")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _pick(backend, q, block_size, sampled=True) == "triton":
        from .triton_kernels import sampled_block_mass_triton

        return sampled_block_mass_triton(q, k, rows, rows_per_group, block_size, scale, head_reduce)
    return sampled_block_mass_reference(q, k, rows, rows_per_group, block_size, scale, head_reduce)
