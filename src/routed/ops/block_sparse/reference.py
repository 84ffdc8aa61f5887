"""Plain-PyTorch block-sparse attention: the ground truth for every block kernel.

Gathers, for every query block, the key/value blocks its route lists, and runs exact softmax
attention over them. Memory grows with the routed blocks
(``batch * heads * num_q_blocks * max_blocks * kv_block_size``), never with ``q_len * kv_len``;
long routes run in chunks of query blocks, each gathering only up to its own widest row.
Differentiable through autograd; accumulates in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...route import BlockRoute


def _route_head_layout(heads_r: int, hq: int, hkv: int) -> tuple[int, int]:
    """How the route's head axis maps onto (kv heads, query heads per kv head)."""
    if heads_r == hq:
        return hkv, hq // hkv
    if heads_r == hkv:
        return hkv, 1
    return 1, 1  # heads_r == 1, shared by all heads


def masked_softmax_attend(s: Tensor, visible: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``softmax(s masked to visible) @ v`` over the last axis, and the log-sum-exp (with a
    trailing axis of 1). Rows that see nothing give zeros and ``lse = -inf``, with finite
    gradients. Shared by the reference ops."""
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    l = torch.exp(s - m).sum(dim=-1, keepdim=True)  # noqa: E741
    # Normalise through lse rather than dividing by l: the gradient then takes the usual softmax
    # form p * (g - sum(p * g)), which cancels exactly where it must (a single visible key).
    # Queries that see nothing (l == 0) use lse 0 for the arithmetic: their p is 0, so o is 0 and
    # the gradient stays finite; they report lse = -inf.
    seen = l > 0
    lse = m + torch.log(torch.where(seen, l, torch.ones_like(l)))
    p = torch.exp(s - torch.where(seen, lse, torch.zeros_like(lse)))
    return p @ v, torch.where(seen, lse, torch.full_like(lse, float("-inf")))


# Gathered key/value elements per chunk of query blocks (per tensor): bounds the reference's peak
# memory on long, wide routes (coverage budgets can keep most blocks of some rows).
CHUNK_ELEMENTS = 1 << 25


def block_sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, route: BlockRoute,
                                     scale: float) -> tuple[Tensor, Tensor]:
    """Exact attention of each query over the key blocks its query block routes to.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]``; v: ``[B, Hkv, Nk, Dv]``.
        route: a :class:`BlockRoute` for ``Nq`` queries and ``Nk`` keys (already checked
            against the tensors by :func:`routed.routed_attention`).
    Returns:
        ``out [B, Hq, Nq, Dv]`` in q's dtype and ``lse [B, Hq, Nq]`` (float32, or float64 for
        float64 inputs; natural log; ``-inf`` for queries with nothing to attend to, whose
        output is zero).

    Query blocks run in chunks of at most :data:`CHUNK_ELEMENTS` gathered key elements, each chunk
    gathering only as many blocks as its widest row holds: without gradients the peak memory is
    one chunk's (under autograd every chunk's gathered blocks are saved for the backward).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    bq, bk = route.q_block_size, route.kv_block_size
    nqb, nkb, K = route.num_q_blocks, route.num_kv_blocks, route.max_blocks
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    hk_r, g_r = _route_head_layout(route.kv_block_ids.shape[1], Hq, Hkv)
    ids = route.kv_block_ids.reshape(route.kv_block_ids.shape[0], hk_r, g_r, nqb, K)
    ids = ids.expand(B, Hkv, g_r, nqb, K).long()
    if K == 0:  # a route of width 0 routes nothing: one padding slot keeps the shapes non-empty
        K, ids = 1, torch.full((B, Hkv, g_r, nqb, 1), -1, dtype=torch.long, device=q.device)

    # Key/value blocks, padded to whole blocks: [B, Hkv, nkb, bk, D].
    kb = F.pad(k.to(acc), (0, 0, 0, nkb * bk - Nk)).view(B, Hkv, nkb, bk, D)
    vb = F.pad(v.to(acc), (0, 0, 0, nkb * bk - Nk)).view(B, Hkv, nkb, bk, Dv)
    qb = F.pad(q.to(acc) * scale, (0, 0, 0, nqb * bq - Nq)).view(B, Hkv, G, nqb, bq, D)
    key_in_range = (torch.arange(nkb * bk, device=q.device) < Nk).view(nkb, bk)

    outs, lses = [], []
    for c0, c1, ids_c in query_block_chunks(ids, B * Hkv * g_r * K * bk * max(D, Dv), CHUNK_ELEMENTS):
        o, lse = _attend_query_blocks(qb[:, :, :, c0:c1], kb, vb, ids_c, key_in_range, route, c0)
        outs.append(o)
        lses.append(lse)
    o, lse = torch.cat(outs, dim=3), torch.cat(lses, dim=3)  # [B, Hkv, G, nqb, bq, *]
    out = o.reshape(B, Hq, nqb * bq, Dv)[:, :, :Nq].to(q.dtype)
    lse = lse.reshape(B, Hq, nqb * bq)[:, :, :Nq]
    return out, lse


def query_block_chunks(ids: Tensor, per_block: int, budget: int):
    """``(c0, c1, ids[:, :, :, c0:c1])`` over chunks of the query blocks of ``ids [B, Hkv, g_r, nqb, K]``
    that gather at most ``budget`` elements (``per_block`` a query block), each chunk's ids cut to its
    widest row (live ids lead every row)."""
    nqb = ids.shape[3]
    chunk = nqb if per_block * nqb <= budget else max(1, budget // per_block)
    for c0 in range(0, nqb, chunk):
        c1 = min(nqb, c0 + chunk)
        ids_c = ids[:, :, :, c0:c1]
        if chunk < nqb:
            ids_c = ids_c[..., :max(1, int((ids_c >= 0).sum(-1).max()))]
        yield c0, c1, ids_c


def _attend_query_blocks(qb: Tensor, kb: Tensor, vb: Tensor, ids: Tensor, key_in_range: Tensor, route: BlockRoute,
                         first_block: int) -> tuple[Tensor, Tensor]:
    """Query blocks ``first_block ..`` (``qb [B, Hkv, G, c, bq, D]``, scaled) over their routed
    blocks (``ids [B, Hkv, g_r, c, K]``, -1 padded): ``(o [B, Hkv, G, c, bq, Dv], lse [.., 1])``."""
    B, Hkv, g_r, c, K = ids.shape
    bk = key_in_range.shape[1]
    bq = qb.shape[4]
    safe_ids = ids.clamp_min(0)
    bi = torch.arange(B, device=qb.device).view(B, 1, 1, 1, 1)
    hi = torch.arange(Hkv, device=qb.device).view(1, Hkv, 1, 1, 1)
    kg = kb[bi, hi, safe_ids].reshape(B, Hkv, g_r, c, K * bk, kb.shape[-1])
    vg = vb[bi, hi, safe_ids].reshape(B, Hkv, g_r, c, K * bk, vb.shape[-1])
    s = qb @ kg.transpose(-1, -2)  # [B, Hkv, G, c, bq, K*bk]

    visible = token_visibility(ids, key_in_range, route, first_block, bq)
    return masked_softmax_attend(s, visible, vg)


def token_visibility(ids: Tensor, key_in_range: Tensor, route: BlockRoute, first_block: int, bq: int) -> Tensor:
    """Which gathered key each query of query blocks ``first_block ..`` sees: ``[B, Hkv, g_r, c, 1 or
    bq, K * bk]`` bool for ``ids [B, Hkv, g_r, c, K]`` (-1 padded) and ``key_in_range [nkb, bk]``: a
    live slot, inside ``kv_len``, (causal) not in the query's future, (segments) in its segment."""
    B, Hkv, g_r, c, K = ids.shape
    nkb, bk = key_in_range.shape
    Nq, Nk = route.q_len, route.kv_len
    live = ids >= 0
    safe_ids = ids.clamp_min(0)
    visible = (key_in_range[safe_ids] & live.unsqueeze(-1)).reshape(B, Hkv, g_r, c, 1, K * bk)
    rows = slice(first_block * bq, (first_block + c) * bq)
    bi = torch.arange(B, device=ids.device).view(B, 1, 1, 1, 1)

    def per_key(values: Tensor) -> Tensor:
        """``[batch_p, Nk]`` per-token data of the keys -> ``[B, Hkv, g_r, c, 1, K*bk]`` gathered."""
        blocks = F.pad(values.long().reshape(-1, Nk), (0, nkb * bk - Nk)).view(-1, nkb, bk)
        b_idx = bi if blocks.shape[0] > 1 else torch.zeros_like(bi)
        return blocks[b_idx, safe_ids].reshape(B, Hkv, g_r, c, 1, K * bk)

    def per_query(values: Tensor) -> Tensor:
        """``[batch_p, Nq]`` per-token data of the queries -> ``[batch_p, 1, 1, c, bq, 1]``."""
        padded = F.pad(values.long().reshape(-1, Nq), (0, route.num_q_blocks * bq - Nq))
        return padded[:, rows].reshape(-1, 1, 1, c, bq, 1)

    if route.causal:
        visible = visible & (per_key(route.resolved_kv_positions()) <= per_query(route.resolved_q_positions()))
    if route.has_segments:  # packed sequences / padding: only keys of the query's own segment
        visible = visible & (per_key(route.kv_segments) == per_query(route.q_segments))
    return visible
