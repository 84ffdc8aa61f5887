"""Host side of the gather-in-kernel token-group kernels: launchers, scatter-back, autograd and the
``torch.library`` custom ops (``torch.compile`` traces them as opaque nodes).

Chain: ``_tg_*_kernel`` (triton_kernels.py) -> ``token_group_fwd`` / ``token_group_bwd`` (launchers)
-> ``routed::token_group_attn_fwd`` / ``_bwd`` custom ops with registered autograd ->
:func:`token_group_attention_triton`.

Memory: the kernels read ``q``, ``k``, ``v`` and ``dout`` rows in place through the token ids (no
gathered input copies). The group outputs (``[B, Hq, groups, group_size, Dv]``, kept for the
backward) and the gradients in group layout (``dq``, ``dk``, ``dv`` per query head, float32) are
materialised before they scatter back, since a token may sit in several groups.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...testing import new_output
from ..block_sparse.triton_ops import _dims
from .triton_kernels import _tg_bwd_delta_kernel, _tg_bwd_dkdv_kernel, _tg_bwd_dq_kernel, _tg_fwd_kernel

LOG2E = 1.4426950408889634


def _layout(q: Tensor, k: Tensor, ids: Tensor) -> tuple[int, int, tuple[int, int, int]]:
    """``(route_head_div, gqa_group, id strides)``: query head ``h`` reads route head
    ``h // route_head_div`` and kv head ``h // gqa_group``; a route batch of 1 broadcasts (stride 0)."""
    hq, hkv, hr = q.shape[1], k.shape[1], ids.shape[1]
    strides = (0 if ids.shape[0] == 1 else ids.stride(0), ids.stride(1), ids.stride(2))
    return hq // hr, hq // hkv, strides


def _tiles(S: int) -> tuple[int, int]:
    t = min(64, max(16, triton.next_power_of_2(S)))
    return t, t


def _scatter_rows(x_g: Tensor, ids: Tensor, heads: int, n: int) -> Tensor:
    """Sum group-layout rows ``x_g [B, H, G, S, D]`` into ``[B, H, n, D]`` float32 by token id."""
    B, H, G, S, D = x_g.shape
    idx = ids.long().reshape(ids.shape[0], ids.shape[1], 1, G * S)
    idx = torch.where(idx < 0, n, idx)  # padding slots land on a spare row
    idx = idx.expand(B, ids.shape[1], heads // ids.shape[1], G * S).reshape(B, heads, G * S, 1).expand(-1, -1, -1, D)
    out = torch.zeros(B, H, n + 1, D, dtype=torch.float32, device=x_g.device)
    return out.scatter_add_(2, idx, x_g.reshape(B, H, G * S, D).float())[:, :, :n]


def _slot_weights(ids: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``[Br, Hr, G, S]`` float32: the route's weight where a slot is live, 0 at padding."""
    w = (ids >= 0).to(torch.float32)
    return w if weights is None else w * weights.float()


def _per_query_head(x: Tensor, B: int, hq: int) -> Tensor:
    """``[Br, Hr, ...]`` route data -> ``[B, Hq, ...]`` (route head ``h // (Hq/Hr)``)."""
    return x.expand(B, *x.shape[1:]).repeat_interleave(hq // x.shape[1], dim=1)


def token_group_fwd(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, w: Tensor, causal: bool,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(out [B, Hq, N, Dv], lse_g [B, Hq, G, S], o_g [B, Hq, G, S, Dv])``; ``ids [Br, Hr, G, S]``
    int32 contiguous, ``w`` the slot weights (:func:`_slot_weights`)."""
    B, Hq, N, _ = q.shape
    G, S = ids.shape[2:]
    div, group, (si_b, si_h, si_g) = _layout(q, k, ids)
    o_g = new_output((B, Hq, G, S, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse_g = new_output((B, Hq, G, S), dtype=torch.float32, device=q.device)
    bm, bn = _tiles(S)
    if G * S:
        _tg_fwd_kernel[(triton.cdiv(S, bm), G, B * Hq)](
            q, k, v, ids, o_g, lse_g, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), si_b, si_h, si_g, Hq, div, group, S, scale * LOG2E,
            CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, **_dims(q, v))
    contrib = o_g.float() * _per_query_head(w, B, Hq).unsqueeze(-1)
    out = _scatter_rows(contrib, ids, Hq, N).to(q.dtype)
    return out, lse_g, o_g


def token_group_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, ids: Tensor, w: Tensor, lse_g: Tensor, o_g: Tensor,
                    dlse: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dw)``; ``dw [B, Hq, G, S]`` float32 is the gradient of the slot weights per
    query head (the caller reduces it to the route's weights). ``dlse`` (the gradient reaching the
    group-layout lse, or None) enters as ``dS += P * dlse``, i.e. through the row term."""
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, S = ids.shape[2:]
    do = do.contiguous() if do.stride(-1) != 1 else do
    div, group, (si_b, si_h, si_g) = _layout(q, k, ids)
    bm, bn = _tiles(S)
    dims = _dims(q, v)
    raw = new_output((B, Hq, G, S), dtype=torch.float32, device=q.device)
    dq_g = new_output((B, Hq, G, S, D), dtype=torch.float32, device=q.device)
    dk_g = new_output((B, Hq, G, S, D), dtype=torch.float32, device=q.device)
    dv_g = new_output((B, Hq, G, S, Dv), dtype=torch.float32, device=q.device)
    if G * S:
        grid = (triton.cdiv(S, bm), G, B * Hq)
        _tg_bwd_delta_kernel[grid](do, o_g, ids, raw, do.stride(0), do.stride(1), do.stride(2), si_b, si_h, si_g, Hq,
                                   div, S, BLOCK_M=bm, HEAD_DIM_V=Dv, BLOCK_DV=dims["BLOCK_DV"])
    delta = raw * _per_query_head(w, B, Hq)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse_g), dlse.float(), torch.zeros_like(delta))
    if G * S:
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                  v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2), si_b, si_h, si_g, Hq, div, group,
                  S, scale * LOG2E, scale)
        _tg_bwd_dq_kernel[grid](q, k, v, do, ids, w, lse_g, delta, dq_g, *common, CAUSAL=causal, BLOCK_M=bm,
                                BLOCK_N=bn, **dims)
        _tg_bwd_dkdv_kernel[(triton.cdiv(S, bn), G, B * Hq)](q, k, v, do, ids, w, lse_g, delta, dk_g, dv_g, *common,
                                                             CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, **dims)
    dq = _scatter_rows(dq_g, ids, Hq, N).to(q.dtype)
    # dK, dV: per query head, then summed over each kv head's query heads.
    dk = _scatter_rows(dk_g, ids, Hq, N).view(B, Hkv, Hq // Hkv, N, D).sum(2).to(k.dtype)
    dv = _scatter_rows(dv_g, ids, Hq, N).view(B, Hkv, Hq // Hkv, N, Dv).sum(2).to(v.dtype)
    dw = torch.where(_per_query_head(ids, B, Hq) >= 0, raw, torch.zeros_like(raw))
    return dq, dk, dv, dw


def _reduce_to(dw: Tensor, shape: torch.Size) -> Tensor:
    """``[B, Hq, G, S]`` per-query-head weight gradients -> the route weights' ``[Br, Hr, G, S]``."""
    B, Hq = dw.shape[:2]
    br, hr = shape[0], shape[1]
    dw = dw.view(B, hr, Hq // hr, *dw.shape[2:]).sum(2)
    return dw.sum(0, keepdim=True) if br == 1 and B != 1 else dw


@torch.library.custom_op("routed::token_group_attn_fwd", mutates_args=())
def token_group_attn_fwd(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, w: Tensor, causal: bool,
                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return token_group_fwd(q, k, v, ids, w, causal, scale)


@token_group_attn_fwd.register_fake
def _(q, k, v, ids, w, causal, scale):
    B, Hq, N, _ = q.shape
    G, S = ids.shape[2:]
    return (q.new_empty(B, Hq, N, v.shape[-1]), q.new_empty(B, Hq, G, S, dtype=torch.float32),
            q.new_empty(B, Hq, G, S, v.shape[-1]))


@torch.library.custom_op("routed::token_group_attn_bwd", mutates_args=())
def token_group_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, ids: Tensor, w: Tensor, lse_g: Tensor,
                         o_g: Tensor, dlse: Optional[Tensor], causal: bool,
                         scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return token_group_bwd(do, q, k, v, ids, w, lse_g, o_g, dlse, causal, scale)


@token_group_attn_bwd.register_fake
def _(do, q, k, v, ids, w, lse_g, o_g, dlse, causal, scale):
    B, Hq = q.shape[:2]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(B, Hq, *ids.shape[2:], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, ids, w, causal, scale = inputs
    _, lse_g, o_g = output
    ctx.save_for_backward(q, k, v, ids, w, lse_g, o_g)
    ctx.meta = (causal, scale)


def _backward(ctx, dout, dlse, do_g):
    q, k, v, ids, w, lse_g, o_g = ctx.saved_tensors
    dq, dk, dv, dw = token_group_attn_bwd(dout, q, k, v, ids, w, lse_g, o_g, dlse, *ctx.meta)
    return dq, dk, dv, None, _reduce_to(dw, w.shape), None, None


torch.library.register_autograd("routed::token_group_attn_fwd", _backward, setup_context=_setup_context)


def token_group_attention_triton(q: Tensor, k: Tensor, v: Tensor, route, scale: float) -> tuple[Tensor, Tensor]:
    """A checked :class:`~routed.TokenRoute` through the gather-in-kernel Triton kernels: same
    contract as :func:`~routed.ops.token_group.reference.token_group_attention_reference` (``out``
    and ``lse`` in the group layout); differentiable in ``q``, ``k``, ``v`` and the route's weights."""
    ids = route.token_ids.to(torch.int32).contiguous()
    w = _slot_weights(ids, route.weights).contiguous()
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    q = q if q.stride(-1) == 1 else q.contiguous()
    out, lse_g, _ = token_group_attn_fwd(q, k, v, ids, w, route.causal, scale)
    return out, lse_g
