"""Plain-PyTorch block-importance estimates: the ground truth of the estimator kernels.

Both functions estimate, for every (batch, key/value head, query row) the share of the attention
mass each *key block* receives, aggregated over the query heads of the GQA group, so that a
router can turn it into a KV-head :class:`~routed.BlockRoute`:

* :func:`pooled_block_probs_reference` -- rows are query *blocks*: the softmax over key blocks of
  ``scale * mean(q block) . mean(k block) + log(tokens in the key block)`` (a block of ``n`` keys
  that all score ``s`` holds ``n * exp(s)`` of the mass).
* :func:`sampled_block_mass_reference` -- rows are *groups of sampled queries* (every s-th query
  of a block, or the last queries of the prompt): the exact softmax of each sampled query over all
  the keys it may see, summed per key block and averaged over the group's queries.

Queries are the last ``q_len`` positions of the keys (prefill, or a chunk after a KV cache), so
query ``i`` sits at position ``i + kv_len - q_len`` and sees keys at positions ``<=`` its own.
Memory stays ``O(rows x kv_len)``, never ``q_len x kv_len``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def block_means(x: Tensor, block_size: int) -> Tensor:
    """``[B, H, N, D]`` -> ``[B, H, ceil(N / block_size), D]`` float32 means (partial last block:
    the mean of the tokens it has). Reads ``x`` once through a view (no float copy of ``x``)."""
    n = x.shape[2]
    full = n // block_size
    parts = []
    if full:
        parts.append(x[:, :, : full * block_size].unflatten(2, (full, block_size)).sum(3, dtype=torch.float32)
                     / block_size)
    if n > full * block_size:
        parts.append(x[:, :, full * block_size:].sum(2, keepdim=True, dtype=torch.float32) / (n - full * block_size))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _aggregate(p: Tensor, hkv: int, head_reduce: str) -> Tensor:
    """``[B, Hq, R, C]`` per-query-head probabilities -> ``[B, Hkv, R, C]`` over each GQA group
    (``"none"``: kept per query head)."""
    if head_reduce == "none":
        return p
    B, hq, r, c = p.shape
    p = p.view(B, hkv, hq // hkv, r, c)
    return p.amax(2) if head_reduce == "max" else p.mean(2)


def pooled_block_probs_reference(q: Tensor, k: Tensor, block_size: int, scale: float,
                                 head_reduce: str = "max") -> Tensor:
    """Estimated attention mass per (query block, key block) from mean-pooled queries and keys.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` with ``Nk >= Nq``; blocks of ``block_size``
            tokens on both (query blocks start at query 0, key blocks at key 0).
        scale: softmax scale of the attention.
        head_reduce: ``"max"`` or ``"mean"`` over the query heads of a GQA group, ``"none"``
            to keep one row per query head.
    Returns:
        ``[B, Hkv (Hq for "none"), nqb, nkb]`` float32; per query head each row is a softmax over the key blocks
        the query block may see (the others are 0), then reduced over the group's heads.
    """
    B, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    pq, pk = block_means(q, block_size), block_means(k, block_size)  # [B, Hq, nqb, D], [B, Hkv, nkb, D]
    nqb, nkb = pq.shape[2], pk.shape[2]
    logits = (pq.view(B, hkv, hq // hkv * nqb, -1) @ pk.transpose(-1, -2)).view(B, hq, nqb, nkb) * scale
    kcount = torch.clamp(nk - torch.arange(nkb, device=q.device) * block_size, max=block_size).float()
    logits = logits + kcount.log()
    qmax = torch.clamp((torch.arange(nqb, device=q.device) + 1) * block_size, max=nq) - 1 + (nk - nq)
    visible = torch.arange(nkb, device=q.device)[None, :] * block_size <= qmax[:, None]
    p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return _aggregate(p, hkv, head_reduce)


def sampled_block_mass_reference(q: Tensor, k: Tensor, rows: Tensor, rows_per_group: int, block_size: int,
                                 scale: float, head_reduce: str = "max") -> Tensor:
    """Exact attention mass per key block of sampled queries, averaged per group of rows.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` with ``Nk >= Nq``.
        rows: ``[num_groups * rows_per_group]`` int query indices (into ``q``'s sequence axis);
            consecutive runs of ``rows_per_group`` form a group (repeats allowed).
        block_size: tokens per key block.
        head_reduce: ``"max"``, ``"mean"`` or ``"none"``, as above.
    Returns:
        ``[B, Hkv (Hq for "none"), num_groups, nkb]`` float32: for every group, the mean over its rows of the
        softmax mass that each key block receives (each row's masses sum to 1 over the blocks it
        may see), reduced over the group's query heads.
    """
    B, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nkb = math.ceil(nk / block_size)
    rows = rows.long()
    qs = q[:, :, rows].float()  # [B, Hq, R, D]
    s = (qs.view(B, hkv, -1, qs.shape[-1]) @ k.float().transpose(-1, -2)).view(B, hq, rows.numel(), nk) * scale
    visible = torch.arange(nk, device=q.device)[None, :] <= (rows + nk - nq)[:, None]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    p = F.pad(p, (0, nkb * block_size - nk)).view(B, hq, rows.numel(), nkb, block_size).sum(-1)
    p = p.view(B, hq, -1, rows_per_group, nkb).mean(3)
    return _aggregate(p, hkv, head_reduce)
