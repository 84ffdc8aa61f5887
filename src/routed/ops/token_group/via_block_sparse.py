"""Token-group attention on the block-sparse kernels: gather, run one block-diagonal route, scatter.

Each (batch, route head) row of groups is gathered into a group-major sequence of
``num_groups * group_size`` slots (batch and route heads folded into the batch axis, so positions
and segments can differ per head). Segment ids keep every query inside its own group (a padding
slot is a segment of its own), positions (the token ids) give the causal test, and a block route
covers, for each query block, the key blocks of the groups it touches. Results scatter back with
the route's weights. Exact; the gathered copies cost ``O(groups * group_size * head_dim)``
memory, never ``seq^2`` (a gather-in-kernel version is future work).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...route import BlockRoute, TokenRoute


def _block_size(slots: int) -> int:
    """Blocks of 64 where the gathered sequence is long enough, else the smallest tile (16)."""
    return 64 if slots >= 256 else 16


def _group_band_route(num_groups: int, group_size: int, block: int, causal: bool, positions: Tensor,
                      segments: Tensor) -> BlockRoute:
    """Per query block, the key blocks spanning the groups its slots belong to."""
    slots = num_groups * group_size
    nb = -(-slots // block)
    first_slot = torch.arange(nb, device=positions.device) * block
    last_slot = torch.clamp(first_slot + block, max=slots) - 1
    lo_block = (first_slot // group_size) * group_size // block
    hi_block = ((last_slot // group_size + 1) * group_size - 1) // block
    kb = torch.arange(nb, device=positions.device)
    mask = (kb[None, :] >= lo_block[:, None]) & (kb[None, :] <= hi_block[:, None])
    return BlockRoute.from_block_mask(mask[None, None], q_len=slots, kv_len=slots, q_block_size=block, causal=causal,
                                      q_positions=positions, kv_positions=positions, q_segments=segments,
                                      kv_segments=segments)


def token_group_attention_block_sparse(q: Tensor, k: Tensor, v: Tensor, route: TokenRoute, scale: float,
                                       block_sparse_fn) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`token_group_attention_reference`; ``block_sparse_fn(q, k, v,
    block_route, scale) -> (out, lse)`` runs the block-sparse attention (the Triton kernels)."""
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    Hr, G, S = route.token_ids.shape[1:]
    L = G * S
    if L == 0:  # no slots at all: nothing attends
        return (torch.zeros(B, Hq, N, Dv, dtype=q.dtype, device=q.device) + 0 * q.sum(),
                torch.full((B, Hq, G, S), float("-inf"), device=q.device))
    ids = route.token_ids.long().expand(B, Hr, G, S)
    live = ids >= 0
    slot_ids = ids.clamp_min(0).reshape(B, Hr, 1, L)

    # Heads that share a route head: Hq/Hr query heads and hk_per kv heads per (b, route head).
    if Hr == Hq and Hq != Hkv:
        k_r, v_r = (t.repeat_interleave(Hq // Hkv, dim=1).unsqueeze(2) for t in (k, v))
    else:
        k_r, v_r = (t.reshape(B, Hr, Hkv // Hr, N, t.shape[-1]) for t in (k, v))
    hq_per, hk_per = Hq // Hr, k_r.shape[2]

    def gather(t: Tensor, heads: int) -> Tensor:
        idx = slot_ids.unsqueeze(-1).expand(B, Hr, heads, L, t.shape[-1])
        return t.gather(3, idx).reshape(B * Hr, heads, L, t.shape[-1])

    q_g = gather(q.reshape(B, Hr, hq_per, N, D), hq_per)
    k_g, v_g = gather(k_r, hk_per), gather(v_r, hk_per)

    slot = torch.arange(L, device=q.device)
    group_of_slot = (slot // S).expand(B, Hr, L)
    segments = torch.where(live.reshape(B, Hr, L), group_of_slot, -1 - slot)  # padding: a segment alone
    positions = ids.clamp_min(0).reshape(B * Hr, L)
    block_route = _group_band_route(G, S, _block_size(L), route.causal, positions.to(torch.int32),
                                    segments.reshape(B * Hr, L).to(torch.int32))
    out_g, lse_g = block_sparse_fn(q_g, k_g, v_g, block_route, scale)

    w = live.to(torch.float32)
    if route.weights is not None:
        w = w * route.weights.expand(B, Hr, G, S).float()
    contrib = out_g.float().view(B, Hr, hq_per, L, Dv) * w.reshape(B, Hr, 1, L, 1)
    out = torch.zeros(B, Hr, hq_per, N, Dv, dtype=torch.float32, device=q.device)
    out = out.scatter_add(3, slot_ids.unsqueeze(-1).expand(B, Hr, hq_per, L, Dv), contrib)
    lse = lse_g.view(B, Hr, hq_per, G, S)
    lse = torch.where(live.unsqueeze(2), lse, torch.full_like(lse, float("-inf")))
    return out.view(B, Hq, N, Dv).to(q.dtype), lse.reshape(B, Hq, G, S)
