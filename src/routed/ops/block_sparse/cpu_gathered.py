"""Block-sparse attention on the CPU through PyTorch's fused attention kernel.

For every query block the routed key/value blocks are gathered (whole blocks, one ``index_select``
of contiguous rows), and exact softmax attention over them runs in
``aten._scaled_dot_product_flash_attention_for_cpu``: one fused, vectorised pass in the inputs'
dtype (float32 accumulation) that also returns the log-sum-exp, where the reference builds a float32
score tensor, its mask, exponentials and matrix products as separate passes. Query heads that share
a route share the gathered blocks (an expanded view, never a copy).

Masks. With default positions, no segments and, when causal, square aligned blocks (self-attention,
``q_block_size == kv_block_size``), what a query sees depends only on its block, except inside the
causal diagonal block: the off-diagonal blocks run with a per-block mask broadcast over the rows
(dead slots, keys past ``kv_len``), the diagonal block runs as a second causal pass, and the two
merge by their log-sum-exps. Every other route (explicit positions, segments, other block shapes)
takes a per-token mask as large as the scores.

Rows that see no key get zeros and ``lse = -inf``: their first slot is unmasked for the kernel (so
its softmax stays finite) and the result is replaced afterwards. Under autograd the forward keeps no
graph and the backward recomputes (:class:`_CpuGatheredAttention`, once differentiable): the fused
kernel's own backward leaves out the gradient that reaches its log-sum-exp. Memory: the gathered
blocks, one chunk of query blocks at a time in the forward; during the backward's recomputation every
chunk's gathered blocks and its per-token mask (score-sized) live until the gradients are taken.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...route import BlockRoute
from .reference import _route_head_layout, query_block_chunks, token_visibility

_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# Gathered key (and value) elements per chunk of query blocks. Small on purpose: buffers of a few MB
# are reused by the allocator from chunk to chunk, where the reference's 2**25 (128 MB of float32)
# are fresh pages each time, and page faults then cost more than the attention (4k tokens, 8 heads,
# 8 blocks of 64: 135 ms a forward at 2**25, 55 ms at 2**21, 124 ms for dense SDPA).
CHUNK_ELEMENTS = 1 << 21


def why_not_cpu_gathered(q: Tensor, k: Tensor, v: Tensor, route=None) -> Optional[str]:
    """None if :func:`block_sparse_attention_cpu_gathered` can run on these tensors, else the reason."""
    if torch.compiler.is_compiling():
        return "under torch.compile the reference is traced (this path's chunking and backward are eager code)"
    if q.device.type != "cpu":
        return f"tensors are on {q.device.type}; this path is PyTorch's fused CPU attention kernel"
    if _FUSED_CPU is None:
        return f"this torch ({torch.__version__}) has no aten._scaled_dot_product_flash_attention_for_cpu"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {q.dtype} is not supported (use bfloat16, float16, float32 or float64)"
    if v.shape[-1] != q.shape[-1]:
        return f"the fused CPU kernel needs one head dim for q, k and v (got {q.shape[-1]} and {v.shape[-1]})"
    return None


def _wants_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def auto_why_not_cpu_gathered(q: Tensor, k: Tensor, v: Tensor, route=None) -> Optional[str]:
    """Why automatic choice passes this backend over although it can run (it still runs when named)."""
    if _wants_grad(q, k, v):
        return ("under autograd automatic choice keeps the reference: this backend's backward recomputes its "
                "forward, which on 2 CPU cores measured slower than the reference's up to ~2k tokens and 2x faster "
                "at 4k (`routed bench --backward`); name it to use it")
    return None


def _blockwise_masks(route: BlockRoute) -> bool:
    """Whether visibility is a per-block matter but for the causal diagonal (see the module docstring)."""
    plain = not route.has_segments and route.q_positions is None and route.kv_positions is None
    return plain and (not route.causal or (route.q_block_size == route.kv_block_size and route.q_len == route.kv_len))


def block_sparse_attention_cpu_gathered(q: Tensor, k: Tensor, v: Tensor, route: BlockRoute,
                                        scale: float) -> tuple[Tensor, Tensor]:
    """Exact attention of each query over the key blocks its query block routes to, on the CPU.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (one head dim: see :func:`why_not_cpu_gathered`).
        route: a :class:`BlockRoute` for ``Nq`` queries and ``Nk`` keys (checked by
            :func:`routed.routed_attention`).
    Returns:
        ``out [B, Hq, Nq, D]`` in q's dtype and ``lse [B, Hq, Nq]`` (float32, float64 for float64
        inputs; ``-inf`` where a query sees no key, whose output is zero), as the reference; both
        differentiable (see :class:`_CpuGatheredAttention`).
    """
    if _wants_grad(q, k, v):
        return _CpuGatheredAttention.apply(q, k, v, route, scale)
    return _attention(q, k, v, route, scale, blockwise=_blockwise_masks(route))


class _CpuGatheredAttention(torch.autograd.Function):
    """Forward without a graph (the fastest mask path); the backward recomputes and differentiates.

    The fused CPU kernel's autograd covers its output but not its log-sum-exp (that output has no
    gradient), so: when no gradient reaches ``lse``, the backward recomputes the forward on the
    single-pass per-token-mask path (whose output is the kernel's own, no merge by log-sum-exp) and
    differentiates that; when one does (merges by lse, as NSA's branches or a decode split), it
    differentiates the reference, exact and slower. `routed bench --backward` on 2 cores (8 heads, 12%
    of the blocks of 64): 140-147 ms at 4k tokens against the reference's 296-310 ms, slower up to 2k."""

    @staticmethod
    def forward(ctx, q, k, v, route, scale):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v)
        ctx.route, ctx.scale = route, scale
        out, lse = _attention(q, k, v, route, scale, blockwise=_blockwise_masks(route))
        # outputs of their own, not views (a Function's view outputs could not be edited in place)
        return tuple(t.clone() if t._base is not None else t for t in (out, lse))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        from .reference import block_sparse_attention_reference

        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            if dlse is None:
                out, _ = _attention(*inputs, ctx.route, ctx.scale, blockwise=False)
                outs, grads_out = (out,), (dout,)
            else:
                out, lse = block_sparse_attention_reference(*inputs, ctx.route, ctx.scale)
                outs, grads_out = [torch.where(torch.isfinite(lse), lse, 0.0)], [dlse]
                if dout is not None:
                    outs, grads_out = outs + [out], grads_out + [dout]
            grads = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None)


def _attention(q: Tensor, k: Tensor, v: Tensor, route: BlockRoute, scale: float, blockwise: bool) -> tuple:
    """The computation of :func:`block_sparse_attention_cpu_gathered`; ``blockwise``: the per-block masks
    with the diagonal pass (:func:`_blockwise_masks` must hold), else the per-token masks."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bq, bk = route.q_block_size, route.kv_block_size
    nqb, nkb, K = route.num_q_blocks, route.num_kv_blocks, route.max_blocks
    hk_r, g_r = _route_head_layout(route.kv_block_ids.shape[1], Hq, Hkv)
    h = G // g_r  # query heads that share one gathered key set
    ids = route.kv_block_ids.reshape(route.kv_block_ids.shape[0], hk_r, g_r, nqb, K)
    ids = ids.expand(B, Hkv, g_r, nqb, K).long()
    if K == 0:  # a route of width 0 routes nothing: one padding slot keeps the shapes non-empty
        K, ids = 1, torch.full((B, Hkv, g_r, nqb, 1), -1, dtype=torch.long, device=q.device)

    kb = F.pad(k, (0, 0, 0, nkb * bk - Nk)).reshape(B, Hkv, nkb, bk, D)
    vb = F.pad(v, (0, 0, 0, nkb * bk - Nk)).reshape(B, Hkv, nkb, bk, D)
    # [B, Hkv, g_r, nqb, h, bq, D]: the h query heads of a route head side by side
    qb = F.pad(q, (0, 0, 0, nqb * bq - Nq)).reshape(B, Hkv, g_r, h, nqb, bq, D).transpose(3, 4)
    key_in_range = (torch.arange(nkb * bk, device=q.device) < Nk).view(nkb, bk)

    attend = _attend_blockwise if blockwise else _attend_masked
    outs, lses = [], []
    for c0, c1, ids_c in query_block_chunks(ids, B * Hkv * g_r * K * bk * D, CHUNK_ELEMENTS):
        o, lse = attend(qb[:, :, :, c0:c1], kb, vb, ids_c, key_in_range, route, c0, scale)
        outs.append(o)
        lses.append(lse)
    o, lse = torch.cat(outs, dim=3), torch.cat(lses, dim=3)  # [B, Hkv, g_r, nqb, h, bq, *]
    out = o.transpose(3, 4).reshape(B, Hq, nqb * bq, D)[:, :, :Nq]
    lse = lse.transpose(3, 4).reshape(B, Hq, nqb * bq)[:, :, :Nq]
    return out, lse


def _gather_blocks(blocks: Tensor, ids: Tensor) -> Tensor:
    """``blocks [B, Hkv, nkb, bk, D]`` at ``ids [B, Hkv, g_r, c, K]`` (in range) -> ``[B*Hkv*g_r*c, 1, K*bk, D]``:
    one ``index_select`` of whole blocks (contiguous rows) of the flattened blocks."""
    B, Hkv, nkb, bk, D = blocks.shape
    base = (torch.arange(B * Hkv, device=ids.device) * nkb).view(B, Hkv, 1, 1, 1)
    rows = torch.index_select(blocks.reshape(B * Hkv * nkb, bk * D), 0, (base + ids).reshape(-1))
    M = ids.numel() // ids.shape[-1]
    return rows.view(M, 1, ids.shape[-1] * bk, D)


def _fused(q4: Tensor, kg: Tensor, vg: Tensor, visible: Tensor, scale: float, causal: bool = False) -> tuple:
    """The fused kernel on ``q4 [M, h, rows, D]`` against ``kg, vg [M, 1, L, D]`` (shared by the h heads)
    with ``visible [M, 1, rows or 1, L]`` (None: everything), causal inside the block with ``causal``.
    Returns ``(o [M, h, rows, D], lse [M, h, rows])``; rows that see no key come out as zeros and ``-inf``."""
    M, h = q4.shape[:2]
    kg, vg = kg.expand(M, h, *kg.shape[2:]), vg.expand(M, h, *vg.shape[2:])
    mask = seen = None
    if visible is not None and not bool(visible.all()):
        seen = visible.any(-1)
        # a row that sees nothing sees its first slot, so the kernel's softmax stays finite
        first = torch.arange(visible.shape[-1], device=q4.device) == 0
        visible = visible | (first & ~seen.unsqueeze(-1))
        mask = torch.zeros(visible.shape, dtype=q4.dtype, device=q4.device).masked_fill_(~visible, float("-inf"))
    o, lse = _FUSED_CPU(q4, kg, vg, 0.0, causal, attn_mask=mask, scale=scale)
    if seen is not None:
        o = torch.where(seen.unsqueeze(-1), o, torch.zeros((), dtype=o.dtype))
        lse = torch.where(seen, lse, torch.full((), float("-inf"), dtype=lse.dtype))
    return o, lse


def _merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over two disjoint key sets, merged from each one's output and log-sum-exp (either
    may be ``-inf``: a set the row does not see). Rows that see neither stay zeros and ``-inf``; the
    arithmetic stays finite there."""
    neither = ~(torch.isfinite(lse1) | torch.isfinite(lse2))
    zero = torch.zeros((), dtype=lse1.dtype)
    a, b = torch.where(neither, zero, lse1), torch.where(neither, zero, lse2)
    lse = torch.logaddexp(a, b)
    w1, w2 = torch.exp(a - lse).unsqueeze(-1), torch.exp(b - lse).unsqueeze(-1)
    o = torch.where(neither.unsqueeze(-1), 0.0, w1 * o1.to(w1.dtype) + w2 * o2.to(w2.dtype)).to(o1.dtype)
    return o, torch.where(neither, torch.full((), float("-inf"), dtype=lse.dtype), lse)


def _attend_blockwise(qb: Tensor, kb: Tensor, vb: Tensor, ids: Tensor, key_in_range: Tensor, route: BlockRoute,
                      first_block: int, scale: float) -> tuple[Tensor, Tensor]:
    """Query blocks ``first_block ..`` (``qb [B, Hkv, g_r, c, h, bq, D]``) over their routed blocks
    (``ids [B, Hkv, g_r, c, K]``, -1 padded), visibility per block (:func:`_blockwise_masks`):
    ``(o [B, Hkv, g_r, c, h, bq, D], lse [.., h, bq])``."""
    B, Hkv, g_r, c, K = ids.shape
    h, bq, D = qb.shape[4:]
    bk = kb.shape[3]
    M = B * Hkv * g_r * c
    q4 = qb.reshape(M, h, bq, D)
    live = ids >= 0
    safe_ids = ids.clamp_min(0)
    slot = live
    if route.causal:  # the diagonal runs apart; later blocks (which a causal route holds none of) see nothing
        qi = (first_block + torch.arange(c, device=ids.device)).view(1, 1, 1, c, 1)
        slot = live & (safe_ids < qi)
    visible = (slot.unsqueeze(-1) & key_in_range[safe_ids]).reshape(M, 1, 1, K * bk)
    o, lse = _fused(q4, _gather_blocks(kb, safe_ids), _gather_blocks(vb, safe_ids), visible, scale)
    if route.causal:
        has_diagonal = (live & (safe_ids == qi)).any(-1).reshape(M, 1, 1)
        # each query block's own key block, for every g_r route head: [B, Hkv, 1, c] -> [M]
        own = torch.arange(first_block, first_block + c, device=ids.device).view(1, 1, 1, c, 1)
        own = own.expand(B, Hkv, g_r, c, 1)
        o_d, lse_d = _fused(q4, _gather_blocks(kb, own), _gather_blocks(vb, own), None, scale, causal=True)
        lse_d = torch.where(has_diagonal, lse_d, torch.full((), float("-inf"), dtype=lse_d.dtype))
        o, lse = _merge(o, lse, o_d, lse_d)
    return o.view(B, Hkv, g_r, c, h, bq, D), lse.view(B, Hkv, g_r, c, h, bq)


def _attend_masked(qb: Tensor, kb: Tensor, vb: Tensor, ids: Tensor, key_in_range: Tensor, route: BlockRoute,
                   first_block: int, scale: float) -> tuple[Tensor, Tensor]:
    """As :func:`_attend_blockwise` for any route: the reference's per-token visibility as the mask."""
    B, Hkv, g_r, c, K = ids.shape
    h, bq, D = qb.shape[4:]
    M = B * Hkv * g_r * c
    safe_ids = ids.clamp_min(0)
    visible = token_visibility(ids, key_in_range, route, first_block, bq)
    visible = visible.reshape(M, 1, visible.shape[-2], visible.shape[-1])
    o, lse = _fused(qb.reshape(M, h, bq, D), _gather_blocks(kb, safe_ids), _gather_blocks(vb, safe_ids), visible,
                    scale)
    return o.view(B, Hkv, g_r, c, h, bq, D), lse.view(B, Hkv, g_r, c, h, bq)
