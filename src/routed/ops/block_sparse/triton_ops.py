"""Host side of the Triton block-sparse kernels: launch configs, the transposed route, the
``torch.library`` custom ops (so ``torch.compile`` traces them without graph breaks) and autograd.

Chain: ``_block_sparse_*_kernel`` (triton_kernels.py) -> ``block_sparse_fwd`` / ``block_sparse_bwd``
(host launchers) -> ``routed::block_sparse_attn_fwd`` custom op with registered autograd ->
``routed_attention(..., backend="triton")``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch import Tensor

from ...testing import new_output
from .triton_kernels import (LOG2E, _block_sparse_bwd_dkdv_kernel, _block_sparse_bwd_dq_kernel,
                             _block_sparse_fwd_kernel, _bwd_preprocess_kernel)

MAX_HEAD_DIM = 256


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is at most ``cap``."""
    return min(n & -n, cap)


def _dims(q: Tensor, v: Tensor) -> dict:
    d, dv = q.shape[-1], v.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                HEAD_DIM_V=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _fwd_config(q_block: int, kv_block: int, d: int) -> dict:
    block_m = _pow2_divisor(q_block, 128)
    block_n = _pow2_divisor(kv_block, 64 if d > 64 else 128)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 128 * 64 and d > 64 else 4,
                num_stages=3)


def _bwd_configs(q_block: int, kv_block: int, d: int) -> tuple[dict, dict]:
    dq = dict(BLOCK_M=_pow2_divisor(q_block, 128), BLOCK_N=_pow2_divisor(kv_block, 32), num_warps=8, num_stages=2)
    dkdv = dict(BLOCK_M=_pow2_divisor(q_block, 32), BLOCK_N=_pow2_divisor(kv_block, 128), num_warps=8, num_stages=2)
    if d <= 64:
        dq["num_warps"] = dkdv["num_warps"] = 4
    return dq, dkdv


def _positions(q_positions: Optional[Tensor], kv_positions: Optional[Tensor], batch: int, q_len: int,
               kv_len: int, device) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Both position tensors as ``[batch, len]`` views, or ``(None, None)`` for the default order."""
    if q_positions is None and kv_positions is None:
        return None, None
    if q_positions is None:
        q_positions = torch.arange(q_len, device=device) + (kv_len - q_len)
    if kv_positions is None:
        kv_positions = torch.arange(kv_len, device=device)
    return (q_positions.reshape(-1, q_len).expand(batch, q_len), kv_positions.reshape(-1, kv_len).expand(batch, kv_len))


def _route_views(ids: Tensor, counts: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """The route's batch axis broadcast to ``batch`` (a stride-0 view when shared)."""
    return ids.expand(batch, *ids.shape[1:]), counts.expand(batch, *counts.shape[1:])


def transpose_route(ids: Tensor, counts: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor]:
    """For every (batch_r, head_r, key block), the sorted query blocks that route to it.

    Returns ``t_ids [Br, Hr, num_kv_blocks, max_q]`` (int32, -1 padded) and
    ``t_counts [Br, Hr, num_kv_blocks]``. Memory is O(routed blocks).
    """
    br, hr, nqb, k = ids.shape
    live = ids >= 0
    row = torch.arange(br * hr, device=ids.device).view(br, hr, 1, 1).expand(br, hr, nqb, k)
    qblk = torch.arange(nqb, device=ids.device).view(1, 1, nqb, 1).expand(br, hr, nqb, k)
    kv_row = (row * num_kv_blocks + ids.long())[live]  # (bh, key block) of each routed pair
    q_of = qblk[live]
    order = torch.argsort(kv_row * nqb + q_of)
    kv_row, q_of = kv_row[order], q_of[order]
    t_counts = torch.bincount(kv_row, minlength=br * hr * num_kv_blocks)
    width = max(int(t_counts.max()) if t_counts.numel() else 0, 1)
    starts = torch.cumsum(t_counts, 0) - t_counts
    rank = torch.arange(kv_row.numel(), device=ids.device) - starts[kv_row]
    t_ids = torch.full((br * hr * num_kv_blocks, width), -1, dtype=torch.int32, device=ids.device)
    t_ids[kv_row, rank] = q_of.to(torch.int32)
    return (t_ids.view(br, hr, num_kv_blocks, width),
            t_counts.to(torch.int32).view(br, hr, num_kv_blocks))


def block_sparse_fwd(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, counts: Tensor,
                     q_positions: Optional[Tensor], kv_positions: Optional[Tensor],
                     q_block_size: int, kv_block_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel. Shapes as in :func:`routed.routed_attention`; returns (out, lse)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = new_output((B, Hq, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = new_output((B, Hq, Nq), dtype=torch.float32, device=q.device)
    ids, counts = _route_views(ids, counts, B)
    qp, kp = _positions(q_positions, kv_positions, B, Nq, Nk, q.device)
    cfg = _fwd_config(q_block_size, kv_block_size, D)
    grid = (triton.cdiv(Nq, cfg["BLOCK_M"]), B * Hq)
    _block_sparse_fwd_kernel[grid](
        q, k, v, out, lse, ids, counts, qp if qp is not None else counts, kp if kp is not None else counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *ids.stride(), *counts.stride(),
        qp.stride(0) if qp is not None else 0, kp.stride(0) if kp is not None else 0,
        Hq, Hq // Hkv, Hq // ids.shape[1], Nq, Nk, Nk - Nq, scale * LOG2E,
        Q_BLOCK=q_block_size, KV_BLOCK=kv_block_size, CAUSAL=causal, HAS_POS=qp is not None,
        **_dims(q, v), **cfg)
    return out, lse


def block_sparse_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     dlse: Optional[Tensor], ids: Tensor, counts: Tensor,
                     q_positions: Optional[Tensor], kv_positions: Optional[Tensor],
                     q_block_size: int, kv_block_size: int, causal: bool,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels; returns (dq, dk, dv). ``dlse`` is the gradient reaching lse."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    nkb = math.ceil(Nk / kv_block_size)
    dims = _dims(q, v)
    delta = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    pre_m = 64
    _bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m), B * Hq)](
        out, do, delta, *out.stride(), *do.stride(), Hq, Nq,
        HEAD_DIM_V=Dv, BLOCK_M=pre_m, BLOCK_DV=dims["BLOCK_DV"])
    if dlse is not None:
        # d lse / d s = P, so lse's gradient folds into delta: dS = P * (dP - (delta - dlse)).
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    t_ids, t_counts = transpose_route(ids, counts, nkb)
    ids, counts = _route_views(ids, counts, B)
    t_ids, t_counts = _route_views(t_ids, t_counts, B)
    qp, kp = _positions(q_positions, kv_positions, B, Nq, Nk, q.device)
    qp_arg, kp_arg = (qp, kp) if qp is not None else (counts, counts)
    pos_strides = (qp.stride(0), kp.stride(0)) if qp is not None else (0, 0)
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    cfg_dq, cfg_dkdv = _bwd_configs(q_block_size, kv_block_size, D)
    common = dict(Q_BLOCK=q_block_size, KV_BLOCK=kv_block_size, CAUSAL=causal, HAS_POS=qp is not None, **dims)

    _block_sparse_bwd_dq_kernel[(triton.cdiv(Nq, cfg_dq["BLOCK_M"]), B * Hq)](
        q, k, v, do, lse, delta, dq, ids, counts, qp_arg, kp_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dq.stride(),
        *ids.stride(), *counts.stride(), *pos_strides,
        Hq, Hq // Hkv, Hq // ids.shape[1], Nq, Nk, Nk - Nq, scale, scale * LOG2E, **common, **cfg_dq)
    _block_sparse_bwd_dkdv_kernel[(triton.cdiv(Nk, cfg_dkdv["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, t_ids, t_counts, qp_arg, kp_arg,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dk.stride(), *dv.stride(),
        *t_ids.stride(), *t_counts.stride(), *pos_strides,
        Hq, Hkv, Hq // Hkv, Hq // ids.shape[1], Nq, Nk, Nk - Nq, scale, scale * LOG2E, **common, **cfg_dkdv)
    return dq, dk, dv


# ------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("routed::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(q: Tensor, k: Tensor, v: Tensor, kv_block_ids: Tensor, kv_block_counts: Tensor,
                          q_positions: Optional[Tensor], kv_positions: Optional[Tensor], q_block_size: int,
                          kv_block_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    return block_sparse_fwd(q, k, v, kv_block_ids, kv_block_counts, q_positions, kv_positions,
                            q_block_size, kv_block_size, causal, scale)


@block_sparse_attn_fwd.register_fake
def _(q, k, v, kv_block_ids, kv_block_counts, q_positions, kv_positions, q_block_size, kv_block_size, causal, scale):
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=torch.float32)


@torch.library.custom_op("routed::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dlse: Optional[Tensor], kv_block_ids: Tensor, kv_block_counts: Tensor,
                          q_positions: Optional[Tensor], kv_positions: Optional[Tensor], q_block_size: int,
                          kv_block_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return block_sparse_bwd(do, q, k, v, out, lse, dlse, kv_block_ids, kv_block_counts, q_positions,
                            kv_positions, q_block_size, kv_block_size, causal, scale)


@block_sparse_attn_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, kv_block_ids, kv_block_counts, q_positions, kv_positions, q_block_size,
      kv_block_size, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ids, counts, qp, kp, q_block_size, kv_block_size, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, ids, counts, qp, kp)
    ctx.meta = (q_block_size, kv_block_size, causal, scale)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, ids, counts, qp, kp = ctx.saved_tensors
    dq, dk, dv = block_sparse_attn_bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse,
                                       dlse, ids, counts, qp, kp, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("routed::block_sparse_attn_fwd", _backward, setup_context=_setup_context)


def block_sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, route, scale: float) -> tuple[Tensor, Tensor]:
    """Run a checked BlockRoute through the Triton kernels (forward and backward)."""
    return block_sparse_attn_fwd(q, k, v, route.kv_block_ids, route.kv_block_counts, route.q_positions,
                                 route.kv_positions, route.q_block_size, route.kv_block_size, route.causal, scale)


def why_not_triton(q: Tensor, k: Tensor, v: Tensor, route) -> Optional[str]:
    """None if the Triton kernels can run this call, else the reason."""
    from ...route import BlockRoute

    if not isinstance(route, BlockRoute):
        return f"the Triton kernels take a BlockRoute, not a {type(route).__name__}"
    import os

    if q.device.type != "cuda" and not (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return (f"tensors are on {q.device.type}; Triton kernels need a CUDA GPU "
                "(or TRITON_INTERPRET=1, set before importing routed, to run them on the CPU for testing)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (use bfloat16, float16 or float32)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} exceeds {MAX_HEAD_DIM}"
    for name, bs in (("q_block_size", route.q_block_size), ("kv_block_size", route.kv_block_size)):
        if bs % 16:
            return f"{name}={bs} is not a multiple of 16 (the smallest tensor-core tile)"
    return None
