"""Training-free block routers for pretrained LLMs: estimate which key blocks matter, keep those.

A router here looks at a layer's own queries and keys (no trained parameters), estimates the
attention mass each key block would receive from each query block, and returns a KV-head
:class:`~routed.BlockRoute` (one route shared by the query heads of a GQA group, so the kernel
loads each K/V tile once per group). Two estimators, in the spirit of the published
training-free prefill methods (MInference, FlexPrefill, XAttention):

* :class:`PooledBlockEstimator` -- mean-pooled query block against mean-pooled key block
  (cheapest: a ``num_blocks x num_blocks`` problem).
* :class:`SampledQueryEstimator` -- the exact attention of a few sampled queries per query block
  (``mode="strided"``: every s-th query, the block's last one included) or of the prompt's last
  queries shared by every block (``mode="last"``), summed per key block.

A :class:`BlockBudget` turns the estimate into a route: a fixed number of key blocks per query
block (``top_k``), or the smallest set holding a fraction ``coverage`` of the estimated mass
(adaptive: a focused head keeps few blocks, a diffuse one many), plus always-kept sink blocks
(the first ones) and a local window ending at the diagonal.

Queries are the last ``q_len`` positions of the keys (a prefill, or a chunk after a KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..constants import cached_constants
from ..ops.block_scores import pooled_block_probs, sampled_block_mass
from ..route import BlockRoute, RouteError
from .blocks import _query_block_extent

__all__ = ["BlockBudget", "PooledBlockEstimator", "SampledQueryEstimator", "select_blocks", "make_estimator",
           "ESTIMATORS"]


@dataclass(frozen=True)
class BlockBudget:
    """How many key blocks each query block keeps.

    Give exactly one of:
        top_k: key blocks per query block (sinks and local window included; more when those
            alone exceed it; fewer near the start, where fewer blocks are visible).
        coverage: in (0, 1]: keep the highest-scoring blocks until their estimated share of the
            attention mass reaches ``coverage`` (sinks and local window counted first). ``1.0``
            keeps every visible block (dense, as a route).
    And:
        sink_blocks: the first key blocks, always kept (attention sinks).
        local_blocks: key blocks ending at the diagonal block, always kept (>= 1: the diagonal).
        dense_last_blocks: the last query blocks keep every visible key block: the prompt's final
            positions (the question, the position whose logits give the first generated token)
            attend exactly, for at most ``dense_last_blocks / num_query_blocks`` more density.
    """

    top_k: Optional[int] = None
    coverage: Optional[float] = None
    sink_blocks: int = 1
    local_blocks: int = 1
    dense_last_blocks: int = 0

    def __post_init__(self) -> None:
        if (self.top_k is None) == (self.coverage is None):
            raise RouteError("give exactly one budget: top_k=<key blocks per query block> or "
                             f"coverage=<fraction of estimated attention mass in (0, 1]>; got top_k={self.top_k!r}, "
                             f"coverage={self.coverage!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise RouteError(f"top_k must be an int >= 1 (key blocks per query block), got {self.top_k!r}.")
        if self.coverage is not None and (not isinstance(self.coverage, (int, float)) or isinstance(self.coverage, bool)
                                          or not 0.0 < float(self.coverage) <= 1.0):
            raise RouteError(f"coverage must be a fraction in (0, 1] of the estimated attention mass, got "
                             f"{self.coverage!r}; use top_k for a fixed number of blocks.")
        if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise RouteError(f"sink_blocks must be an int >= 0, got {self.sink_blocks!r}.")
        if not isinstance(self.local_blocks, int) or self.local_blocks < 1:
            raise RouteError(f"local_blocks must be an int >= 1 (the diagonal block is always kept), got "
                             f"{self.local_blocks!r}.")
        if not isinstance(self.dense_last_blocks, int) or isinstance(self.dense_last_blocks, bool) \
                or self.dense_last_blocks < 0:
            raise RouteError(f"dense_last_blocks must be an int >= 0 (final query blocks that attend to every "
                             f"block), got {self.dense_last_blocks!r}.")

    @property
    def keeps_everything(self) -> bool:
        return self.coverage is not None and float(self.coverage) >= 1.0


@cached_constants()
def _visibility(q_len: int, kv_len: int, block_size: int, device) -> tuple[Tensor, Tensor]:
    """``visible [nqb, nkb]`` (the key block starts at or before the query block's last position)
    and ``diag [nqb]`` (the key block holding that position). Cached, as the block routers' extent:
    an estimator runs in every layer of every prefill with the same geometry."""
    _, diag = _query_block_extent(q_len, kv_len, block_size, block_size, device)
    visible = torch.arange(math.ceil(kv_len / block_size), device=device)[None, :] <= diag[:, None]
    return visible, diag


def select_blocks(probs: Tensor, budget: BlockBudget, *, q_len: int, kv_len: int, block_size: int) -> BlockRoute:
    """Turn estimated block masses into a causal route.

    Args:
        probs: ``[B, H, nqb | 1, nkb]`` non-negative estimated attention mass per (query block,
            key block); a single row is shared by every query block (restricted to what each may
            see). Rows need not be normalised.
        budget: the :class:`BlockBudget`.
        q_len, kv_len, block_size: the token lengths and the block size (queries and keys).
    Returns:
        A causal :class:`BlockRoute` with ``H`` heads (KV heads when ``probs`` came from an
        estimator here) and blocks of ``block_size``.
    """
    nqb, nkb = math.ceil(q_len / block_size), math.ceil(kv_len / block_size)
    if probs.dim() != 4 or probs.shape[-1] != nkb or probs.shape[2] not in (1, nqb):
        raise RouteError(f"probs must be [batch, heads, {nqb} or 1, {nkb}] for q_len={q_len}, kv_len={kv_len} and "
                         f"block_size={block_size}, got {list(probs.shape)}.")
    visible, diag = _visibility(q_len, kv_len, block_size, probs.device)
    B, H = probs.shape[:2]
    if budget.keeps_everything:  # one route shared by every batch row and head
        mask = visible[None, None]
    else:
        kb = torch.arange(nkb, device=probs.device)[None, :]
        last = torch.arange(nqb, device=probs.device)[:, None] >= nqb - budget.dense_last_blocks
        forced = visible & ((kb < budget.sink_blocks) | (kb > diag[:, None] - budget.local_blocks) | last)
        p = probs.float().expand(B, H, nqb, nkb).masked_fill(~visible, 0.0)
        # Forced blocks rank first (probabilities are <= 1), invisible ones last.
        key = torch.where(forced, p + 2.0, p).masked_fill(~visible, -1.0)
        if budget.top_k is not None:
            # Forced blocks hold the largest keys, so a top-k of at least their number keeps them
            # all; the ids come straight from the top-k (sorted), no pass over whole rows.
            keep = min(max(budget.top_k, budget.sink_blocks + budget.local_blocks), nkb)
            width = nkb if budget.dense_last_blocks else keep  # the dense last rows keep every visible block
            top = key.topk(width, dim=-1)
            kept = (top.values >= 0) & ((torch.arange(width, device=probs.device) < keep) | last)
            ids = torch.where(kept, top.indices, nkb).sort(dim=-1).values
            counts = (ids < nkb).sum(-1, dtype=torch.int32)
            ids = torch.where(ids < nkb, ids, -1).to(torch.int32)
            return BlockRoute(ids.contiguous(), counts, q_len, kv_len, block_size, block_size, causal=True,
                              validate=False)
        else:
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            order = key.argsort(dim=-1, descending=True)
            ps = p.gather(-1, order)
            before = ps.cumsum(-1) - ps  # mass of the blocks ranked above
            mask = torch.zeros(B, H, nqb, nkb, dtype=torch.bool, device=probs.device)
            mask.scatter_(-1, order, before < float(budget.coverage))
        mask = (mask & visible) | forced
    return BlockRoute.from_block_mask(mask, q_len=q_len, kv_len=kv_len, q_block_size=block_size, causal=True)


def _check_budget(budget) -> BlockBudget:
    if not isinstance(budget, BlockBudget):
        raise RouteError(f"budget must be a BlockBudget (top_k=... or coverage=...), got {type(budget).__name__}.")
    return budget


class PooledBlockEstimator:
    """Route from mean-pooled block scores: ``softmax_j(scale * mean(q_i) . mean(k_j) + log n_j)``
    per query head, reduced over each GQA group (``head_reduce``), then :func:`select_blocks`.

    Args:
        block_size: tokens per block (queries and keys; the route's block size).
        budget: a :class:`BlockBudget`.
        head_reduce: ``"max"`` (a block any head of the group needs is kept) or ``"mean"``: one
            route per KV head (K/V tiles loaded once per group); ``"none"``: one route per query
            head (each head keeps only its own blocks: lower density, K/V read per query head).
        backend: estimator kernel, ``"triton"``, ``"reference"`` or None (Triton on CUDA).
    Call ``est(q, k, scale=None)`` with ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` -> a causal
    :class:`BlockRoute` with ``Hkv`` heads (``Hq`` with ``head_reduce="none"``).
    """

    name = "pooled"

    def __init__(self, block_size: int = 64, budget: BlockBudget = BlockBudget(coverage=0.9), *,
                 head_reduce: str = "max", backend: Optional[str] = None) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise RouteError(f"block_size must be a positive int, got {block_size!r}.")
        if head_reduce not in ("max", "mean", "none"):
            raise RouteError(f"head_reduce must be 'max', 'mean' or 'none', got {head_reduce!r}.")
        self.block_size, self.budget = block_size, _check_budget(budget)
        self.head_reduce, self.backend = head_reduce, backend

    def probs(self, q: Tensor, k: Tensor, *, scale: Optional[float] = None) -> Tensor:
        """``[B, Hkv, nqb, nkb]`` estimated attention mass per (query block, key block)."""
        return pooled_block_probs(q, k, self.block_size, scale=scale, head_reduce=self.head_reduce,
                                  backend=self.backend)

    def __call__(self, q: Tensor, k: Tensor, *, scale: Optional[float] = None) -> BlockRoute:
        if self.budget.keeps_everything:  # nothing to estimate
            probs = q.new_zeros(q.shape[0], k.shape[1], 1, math.ceil(k.shape[2] / self.block_size))
        else:
            probs = self.probs(q, k, scale=scale)
        return select_blocks(probs, self.budget, q_len=q.shape[2], kv_len=k.shape[2], block_size=self.block_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size}, budget={self.budget}, " \
               f"head_reduce={self.head_reduce!r}, backend={self.backend!r})"


class SampledQueryEstimator(PooledBlockEstimator):
    """Route from the exact attention of sampled queries, summed per key block.

    Args:
        block_size, budget, head_reduce, backend: as :class:`PooledBlockEstimator` (the Triton
            kernel needs a power-of-two ``block_size`` in [16, 256]).
        samples: queries sampled per group, a power of two. ``mode="strided"``: per query block,
            every ``block_size // samples``-th query ending at the block's last one;
            ``mode="last"``: the prompt's last ``samples`` queries, one estimate shared by every
            query block (cheapest; good when the end of the prompt holds the question).
        mode: ``"strided"`` or ``"last"``.
    """

    name = "sampled"

    def __init__(self, block_size: int = 64, budget: BlockBudget = BlockBudget(coverage=0.9), *, samples: int = 8,
                 mode: str = "strided", head_reduce: str = "max", backend: Optional[str] = None) -> None:
        super().__init__(block_size, budget, head_reduce=head_reduce, backend=backend)
        if mode not in ("strided", "last"):
            raise RouteError(f"mode must be 'strided' or 'last', got {mode!r}.")
        if not isinstance(samples, int) or samples < 1 or samples & (samples - 1):
            raise RouteError(f"samples must be a power of two >= 1, got {samples!r}.")
        if mode == "strided" and samples > block_size:
            raise RouteError(f"samples={samples} exceeds block_size={block_size}: a block has only {block_size} "
                             "queries to sample.")
        self.samples, self.mode = samples, mode

    def sample_rows(self, q_len: int, device) -> Tensor:
        """``[groups * samples]`` int32 query indices (see the class docstring)."""
        if self.mode == "last":
            return torch.clamp(torch.arange(q_len - self.samples, q_len, device=device), min=0).to(torch.int32)
        nqb = math.ceil(q_len / self.block_size)
        stride = self.block_size // self.samples
        offs = (torch.arange(self.samples, device=device) + 1) * stride - 1
        rows = torch.arange(nqb, device=device)[:, None] * self.block_size + offs[None, :]
        # The partial last block samples what it has (its last query included).
        return torch.clamp(rows, max=q_len - 1).flatten().to(torch.int32)

    def probs(self, q: Tensor, k: Tensor, *, scale: Optional[float] = None) -> Tensor:
        """``[B, Hkv, nqb | 1, nkb]`` estimated attention mass (one shared row for ``mode="last"``)."""
        rows = self.sample_rows(q.shape[2], q.device)
        return sampled_block_mass(q, k, rows, self.samples, self.block_size, scale=scale,
                                  head_reduce=self.head_reduce, backend=self.backend)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size}, budget={self.budget}, samples={self.samples}, " \
               f"mode={self.mode!r}, head_reduce={self.head_reduce!r}, backend={self.backend!r})"


ESTIMATORS = ("pooled", "strided", "last")


def make_estimator(name: str, block_size: int, budget: BlockBudget, *, samples: int = 8, head_reduce: str = "max",
                   backend: Optional[str] = None) -> PooledBlockEstimator:
    """An estimator by name: ``"pooled"``, ``"strided"`` or ``"last"`` (sampled queries)."""
    if name == "pooled":
        return PooledBlockEstimator(block_size, budget, head_reduce=head_reduce, backend=backend)
    if name in ("strided", "last"):
        return SampledQueryEstimator(block_size, budget, samples=samples, mode=name, head_reduce=head_reduce,
                                     backend=backend)
    raise RouteError(f"unknown estimator {name!r}; choose one of {ESTIMATORS}.")
