"""Plain-PyTorch attention inside gathered token groups (Routing Transformer clusters, MoSA).

Each group's queries, keys and values are gathered, attention runs among them (causal by
original position when asked), and results scatter back, weighted, to their tokens. Memory
grows with ``groups * group_size^2``, never with ``seq^2``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...route import TokenRoute
from ..block_sparse.reference import _route_head_layout, masked_softmax_attend


def token_group_attention_reference(q: Tensor, k: Tensor, v: Tensor, route: TokenRoute,
                                    scale: float) -> tuple[Tensor, Tensor]:
    """Attention within each token group, scattered back.

    Args:
        q: ``[B, Hq, N, D]``; k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]``.
        route: a :class:`TokenRoute` over ``N`` tokens.
    Returns:
        ``out [B, Hq, N, Dv]`` (sum over each token's occurrences of weight * group output;
        zeros for tokens in no group) and ``lse [B, Hq, num_groups, group_size]`` in the
        gathered layout (``-inf`` for padding and for queries that see nothing).
    """
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    ng, gs = route.num_groups, route.group_size
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    hk_r, g_r = _route_head_layout(route.token_ids.shape[1], Hq, Hkv)
    ids = route.token_ids.reshape(route.token_ids.shape[0], hk_r, g_r, ng, gs).expand(B, Hkv, g_r, ng, gs).long()
    live = ids >= 0
    safe = ids.clamp_min(0)
    bi = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
    hi = torch.arange(Hkv, device=q.device).view(1, Hkv, 1, 1, 1)

    # Queries are gathered for every query head of the group: index [B, Hkv, G, ng, gs].
    gi = torch.arange(G, device=q.device).view(1, 1, G, 1, 1)
    q_ids = safe.expand(B, Hkv, G, ng, gs)
    qg = q.to(acc).view(B, Hkv, G, N, D)[bi, hi, gi, q_ids]
    kg = k.to(acc)[bi, hi, safe]  # [B, Hkv, g_r, ng, gs, D]
    vg = v.to(acc)[bi, hi, safe]

    s = (qg * scale) @ kg.transpose(-1, -2)  # [B, Hkv, G, ng, gs, gs]
    visible = live.unsqueeze(-2) & live.unsqueeze(-1)
    if route.causal:
        visible = visible & (ids.unsqueeze(-2) <= ids.unsqueeze(-1))
    o, lse = masked_softmax_attend(s, visible, vg)  # o: [B, Hkv, G, ng, gs, Dv]
    lse = lse.squeeze(-1)

    w = live.to(acc)
    if route.weights is not None:
        rw = route.weights.reshape(route.weights.shape[0], hk_r, g_r, ng, gs).to(acc)
        w = w * rw
    o = o * w.unsqueeze(-1)

    out = torch.zeros(B, Hkv, G, N, Dv, dtype=acc, device=q.device)
    out = out.index_put((bi, hi, gi, q_ids), o, accumulate=True)
    return out.view(B, Hq, N, Dv).to(q.dtype), lse.reshape(B, Hq, ng, gs)
