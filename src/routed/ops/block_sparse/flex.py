"""FlexAttention fed from a BlockRoute: a baseline and a second opinion for the Triton kernels.

The route becomes a ``BlockMask`` whose *full* blocks (no masking needed) and *partial* blocks
(straddling the causal diagonal, or any block when explicit positions are given) are listed
separately, so Flex skips ``mask_mod`` wherever it can: the identical block mask at its best.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ...route import BlockRoute


def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    return torch.compile(_flex().flex_attention, dynamic=False)


def _rows_to_ids(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``[..., nkb]`` bool -> (counts int32 ``[...]``, ids int32 ``[..., nkb]`` listed first)."""
    nkb = mask.shape[-1]
    col = torch.arange(nkb, device=mask.device, dtype=torch.int32).expand_as(mask)
    ids = torch.where(mask, col, col + nkb).sort(dim=-1).values
    return mask.sum(-1, dtype=torch.int32), torch.where(ids >= nkb, 0, ids).to(torch.int32).contiguous()


def route_to_block_mask(route: BlockRoute, batch: int, heads_q: int):
    """The route as a FlexAttention ``BlockMask`` for ``[batch, heads_q]`` queries."""
    fa = _flex()
    routed = route.to_block_mask()  # [Br, Hr, nqb, nkb]
    hr = routed.shape[1]
    if hr not in (1, heads_q):
        routed = routed.repeat_interleave(heads_q // hr, dim=1)
    nq, nk = route.q_len, route.kv_len
    if route.causal and route.has_default_positions and not route.has_segments:
        offset = nk - nq
        qi = torch.arange(route.num_q_blocks, device=route.device)
        kj = torch.arange(route.num_kv_blocks, device=route.device)
        q_first = qi * route.q_block_size + offset
        k_last = torch.clamp((kj + 1) * route.kv_block_size, max=nk) - 1
        clean = k_last[None, :] <= q_first[:, None]  # every key of block j precedes every query of block i
        full, partial = routed & clean, routed & ~clean

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset
    elif route.causal or route.has_segments:  # token-level data: every routed block is partial
        full, partial = torch.zeros_like(routed), routed
        qp = route.resolved_q_positions().expand(batch, nq)
        kp = route.resolved_kv_positions().expand(batch, nk)
        qs = route.q_segments.reshape(-1, nq).expand(batch, nq) if route.has_segments else None
        ks = route.kv_segments.reshape(-1, nk).expand(batch, nk) if route.has_segments else None
        causal = route.causal

        def mask_mod(b, h, q_idx, kv_idx):
            ok = (qs[b, q_idx] == ks[b, kv_idx]) if qs is not None else (kv_idx >= 0)
            return ok & (kp[b, kv_idx] <= qp[b, q_idx]) if causal else ok
    else:
        full, partial = routed, torch.zeros_like(routed)
        mask_mod = None
    n_partial, partial_ids = _rows_to_ids(partial)
    n_full, full_ids = _rows_to_ids(full)
    return fa.BlockMask.from_kv_blocks(n_partial, partial_ids, n_full, full_ids,
                                       BLOCK_SIZE=(route.q_block_size, route.kv_block_size),
                                       mask_mod=mask_mod, seq_lengths=(nq, nk))


def flex_routed_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> tuple[Tensor, Tensor]:
    """Compiled FlexAttention over a prepared ``BlockMask``; returns (out, lse)."""
    fa = _flex()
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if hasattr(fa, "AuxRequest"):
        out, aux = _compiled_flex()(q, k, v, return_aux=fa.AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return _compiled_flex()(q, k, v, return_lse=True, **kwargs)


def block_sparse_attention_flex(q: Tensor, k: Tensor, v: Tensor, route: BlockRoute, scale: float):
    return flex_routed_attention(q, k, v, route_to_block_mask(route, q.shape[0], q.shape[1]), scale)


def why_not_flex(q: Tensor, k: Tensor, v: Tensor, route) -> Optional[str]:
    if not isinstance(route, BlockRoute):
        return f"FlexAttention takes a BlockRoute here, not a {type(route).__name__}"
    try:
        _flex()
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if q.device.type != "cuda":
        return "compiled FlexAttention is used on CUDA GPUs only"
    if q.shape[-1] != v.shape[-1]:
        return "FlexAttention needs equal q/k and v head dims"
    return None
