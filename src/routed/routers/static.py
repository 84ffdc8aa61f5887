"""Routes that do not look at content: sliding windows, causal dense, random (for benchmarks).

They are the baselines every content router is compared with, and the shapes benchmarks use.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..route import BlockRoute, RouteError


def _block_grid(q_len: int, kv_len: int, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-block and key-block indices aligned so the last query block sits on the last key block
    (queries are the last ``q_len`` positions, as with a KV cache)."""
    nqb, nkb = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    qi = torch.arange(nqb, device=device)
    # Key block holding the last position of query block i (bottom-right aligned).
    last_q_pos = torch.clamp((qi + 1) * block_size - 1, max=q_len - 1) + (kv_len - q_len)
    diag = last_q_pos // block_size
    return diag, torch.arange(nkb, device=device)


def sliding_window_route(q_len: int, kv_len: Optional[int] = None, *, block_size: int = 64,
                         window_blocks: int = 4, causal: bool = True, device=None) -> BlockRoute:
    """Each query block attends to its own key block and the ``window_blocks - 1`` before it
    (and, when not causal, the ``window_blocks - 1`` after it). Shared by all heads.

    Built by arithmetic, ``window_blocks`` (causal) or ``2 * window_blocks - 1`` slots per row, -1
    padded where the window runs off the sequence: no data-dependent shape, so ``torch.compile``
    traces it."""
    kv_len = q_len if kv_len is None else kv_len
    if window_blocks < 1:
        raise RouteError(f"window_blocks must be >= 1, got {window_blocks}.")
    diag, kb = _block_grid(q_len, kv_len, block_size, device)
    nkb = kb.numel()
    lo = torch.clamp(diag - (window_blocks - 1), min=0)
    hi = diag if causal else torch.clamp(diag + (window_blocks - 1), max=nkb - 1)
    count = hi - lo + 1
    j = torch.arange(min(window_blocks if causal else 2 * window_blocks - 1, nkb), device=device)
    ids = torch.where(j[None, :] < count[:, None], lo[:, None] + j[None, :], -1)
    return BlockRoute(ids.to(torch.int32)[None, None].contiguous(), count.to(torch.int32)[None, None].contiguous(),
                      q_len, kv_len, block_size, block_size, causal=causal, validate=False)


def causal_dense_route(q_len: int, kv_len: Optional[int] = None, *, block_size: int = 64, device=None) -> BlockRoute:
    """Every key block at or before each query block: dense causal attention as a route."""
    kv_len = q_len if kv_len is None else kv_len
    diag, kb = _block_grid(q_len, kv_len, block_size, device)
    mask = kb[None, :] <= diag[:, None]
    return BlockRoute.from_block_mask(mask[None, None], q_len=q_len, kv_len=kv_len, q_block_size=block_size,
                                      causal=True)


def random_block_route(q_len: int, kv_len: Optional[int] = None, *, block_size: int = 64, blocks: int = 8,
                       batch: int = 1, heads: int = 1, causal: bool = True, keep_diagonal: bool = True,
                       generator: Optional[torch.Generator] = None, device=None) -> BlockRoute:
    """Up to ``blocks`` random key blocks per (batch, head, query block), always containing the
    diagonal block when ``keep_diagonal``; when causal, only blocks at or before the diagonal.

    The benchmark route of the block-sparse kernel (its shape, not its content, is what matters).
    """
    kv_len = q_len if kv_len is None else kv_len
    if blocks < 1:
        raise RouteError(f"blocks must be >= 1, got {blocks}.")
    diag, kb = _block_grid(q_len, kv_len, block_size, device)
    nqb, nkb = diag.numel(), kb.numel()
    allowed = (kb[None, :] <= diag[:, None]) if causal else torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    noise = torch.rand(batch, heads, nqb, nkb, generator=generator, device="cpu" if generator is not None else device)
    noise = noise.to(device)
    noise = noise.masked_fill(~allowed, -1.0)
    if keep_diagonal:
        noise.scatter_(-1, diag.view(1, 1, nqb, 1).expand(batch, heads, nqb, 1), 2.0)
    top = noise.topk(min(blocks, nkb), dim=-1)
    mask = torch.zeros(batch, heads, nqb, nkb, dtype=torch.bool, device=device)
    mask.scatter_(-1, top.indices, top.values >= 0)
    return BlockRoute.from_block_mask(mask, q_len=q_len, kv_len=kv_len, q_block_size=block_size, causal=causal,
                                      max_blocks=min(blocks, nkb))
