"""Block routers for trained block-sparse attention: MoBA and NSA's selection branch.

Both return a causal :class:`~routed.BlockRoute` whose head axis is the key/value heads by default
(one route shared by the query heads of a GQA group, so the kernel loads each K/V tile once per
group), and both always keep, besides their top scorers, the first ``sink_blocks`` key blocks and a
local window of ``local_blocks`` key blocks ending at the query block's own (diagonal) block.

* :class:`MoBARouter` (Mixture of Block Attention, Lu et al. 2025): key block ``j`` scores
  ``q . mean(k_j)``. A query block uses the mean of its queries' scores, which is
  ``mean(q_i) . mean(k_j)`` (the score is linear in ``q``): pooled-block scores (the Triton kernel
  of :mod:`routed.ops.block_scores` or plain PyTorch). Only key blocks wholly before the query
  block compete (its own blocks are always kept), so no routing decision reads a future key.
  ``q_block_size=1`` routes every query on its own (the paper's token-level gating; a
  token-by-token decode then routes exactly as the prefill did; slower kernels).
* :class:`NSASelectionRouter` (Native Sparse Attention, Yuan et al. 2025): the compressed
  branch's attention probabilities, summed over the query heads of a KV group, spread over the
  selection blocks they overlap, averaged over the queries of a query block.

Queries are the last ``q_len`` positions of the keys (a prefill, or new tokens after a KV cache);
query block ``i`` holds queries ``i * q_block_size ..`` of ``q`` (blocks start at the first query).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backends import BackendUnavailable
from ..constants import cached_constants
from ..env import triton_why_not
from ..ops.block_scores import block_means, check_qk_heads, estimator_backend_why_not, pooled_block_probs
from ..route import BlockRoute, RouteError

__all__ = ["block_topk_route", "MoBARouter", "NSASelectionRouter", "compressed_positions", "num_compressed_blocks",
           "check_block_options", "spread_to_selection_blocks"]


def _pos_int(name: str, v, minimum: int = 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise RouteError(f"{name} must be an int >= {minimum}, got {v!r}.")
    return v


def check_block_options(*, block_size: int, top_k: int, sink_blocks: int, local_blocks: int,
                        max_len: Optional[int] = None, what: str = "top_k") -> None:
    """Raise :class:`RouteError` for a block budget that cannot work (``max_len``: the longest
    sequence the model is configured for; ``top_k`` may not exceed its number of key blocks)."""
    _pos_int("block_size", block_size)
    _pos_int(what, top_k)
    _pos_int("sink_blocks", sink_blocks, 0)
    _pos_int("local_blocks", local_blocks, 1)
    if max_len is not None:
        nkb = math.ceil(max_len / block_size)
        if top_k > nkb:
            raise RouteError(f"{what}={top_k} exceeds the {nkb} key blocks of {block_size} tokens that the longest "
                             f"sequence ({max_len} tokens) has; lower {what} or raise the maximum length.")
        if sink_blocks + local_blocks > nkb:
            raise RouteError(f"sink_blocks + local_blocks = {sink_blocks + local_blocks} exceeds the {nkb} key blocks "
                             f"of the longest sequence ({max_len} tokens).")


@cached_constants()
def _query_block_extent(q_len: int, kv_len: int, q_block_size: int, kv_block_size: int, device) -> tuple[Tensor, Tensor]:
    """For every query block: the first key block it overlaps and the key block of its last query
    (``[nqb]`` each; queries are the last ``q_len`` positions). Cached: a router calls this every
    layer and step with the same geometry, and each call costs several small launches."""
    nqb = math.ceil(q_len / q_block_size)
    qi = torch.arange(nqb, device=device)
    off = kv_len - q_len
    first = (qi * q_block_size + off) // kv_block_size
    last = (torch.clamp((qi + 1) * q_block_size, max=q_len) - 1 + off) // kv_block_size
    return first, last


def block_topk_route(scores: Tensor, *, top_k: int, q_len: int, kv_len: int, q_block_size: int,
                     kv_block_size: int, sink_blocks: int = 0, local_blocks: int = 1,
                     backend: Optional[str] = None) -> BlockRoute:
    """The ``top_k`` best-scoring visible key blocks of every query block, as a causal route.

    Args:
        scores: ``[B, H, nqb, nkb]`` float, higher is better (only visible entries are read).
        top_k: key blocks per query block, sinks and local window included (more when those
            alone exceed it; fewer near the start, where fewer blocks are visible).
        q_len, kv_len, q_block_size, kv_block_size: the route's geometry.
        sink_blocks: first key blocks, always kept.
        local_blocks: key blocks ending at the diagonal, always kept (>= 1). Every key block the
            query block overlaps counts as its own block and is kept too.
        backend: ``"triton"`` (one fused launch, :func:`~routed.ops.block_topk.triton_kernels.block_topk_triton`),
            ``"reference"`` (plain PyTorch: two sorts), or None (Triton on CUDA where it applies).
    Returns:
        A causal :class:`BlockRoute` with ``H`` heads. Ties go to the lower block id (a stable
        sort), so a prefill and a step-by-step decode choose alike.
    """
    return _topk_route(scores, top_k, q_len, kv_len, q_block_size, kv_block_size, sink_blocks, local_blocks,
                       backend)


def _topk_route(scores: Tensor, top_k: int, q_len: int, kv_len: int, q_block_size: int, kv_block_size: int,
                sink_blocks: int, local_blocks: int, backend: Optional[str], group: int = 1,
                reduce: str = "none", renormalize: bool = False,
                spread: Optional[tuple[int, int]] = None) -> BlockRoute:
    """:func:`block_topk_route` of ``scores [B, H * group, nqb, nkb]`` reduced over each head's
    ``group`` rows (``reduce``), each row first renormalised over the blocks before its query block
    when ``renormalize`` (MoBA); the Triton kernel does all of it in one launch. With ``spread =
    (compress_block, compress_stride)`` the scores are NSA's ``[B, H, nqb, Nc]`` mass per compressed
    block, spread over the key blocks first (:func:`spread_to_selection_blocks`; in the kernel when the
    stride divides both blocks)."""
    nqb, nkb = math.ceil(q_len / q_block_size), math.ceil(kv_len / kv_block_size)
    use_kernel = _topk_use_triton(scores, nkb, backend)
    if spread is not None and not (use_kernel and spread[0] % spread[1] == 0 and kv_block_size % spread[1] == 0):
        scores, spread = spread_to_selection_blocks(scores, *spread, kv_block_size, nkb), None
    if (scores.dim() != 4 or scores.shape[2] != nqb or (spread is None and scores.shape[3] != nkb)
            or scores.shape[1] % group):
        raise RouteError(f"scores must be [batch, heads, {nqb}, {nkb}] for q_len={q_len}, kv_len={kv_len}, "
                         f"q_block_size={q_block_size}, kv_block_size={kv_block_size}; got {list(scores.shape)}.")
    _pos_int("top_k", top_k)
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None (automatic), got {backend!r}.")
    # Most key blocks one query block overlaps, from the geometry alone (no GPU sync).
    own = (q_block_size + kv_block_size - 2) // kv_block_size + 1
    width = min(max(top_k, sink_blocks + max(local_blocks, own)), nkb)
    if use_kernel:
        from ..ops.block_topk.triton_kernels import block_topk_triton

        ids, counts = block_topk_triton(scores, width=width, q_len=q_len, kv_len=kv_len, q_block_size=q_block_size,
                                        kv_block_size=kv_block_size, sink_blocks=sink_blocks,
                                        local_blocks=local_blocks, group=group, reduce=reduce,
                                        renormalize=renormalize, spread=spread)
        return BlockRoute(ids, counts, q_len, kv_len, q_block_size, kv_block_size, causal=True, validate=False)
    first, diag = _query_block_extent(q_len, kv_len, q_block_size, kv_block_size, scores.device)
    kb = torch.arange(nkb, device=scores.device)[None, :]
    if renormalize:
        scores = _renormalise_over_earlier(scores, first)
    scores = _reduce_group(scores, group, reduce)
    visible = kb <= diag[:, None]
    forced = visible & ((kb < sink_blocks) | (kb >= torch.minimum(first, diag - local_blocks + 1)[:, None]))
    key = torch.where(forced, float("inf"), scores.float()).masked_fill(~visible, float("-inf"))
    order = key.sort(dim=-1, descending=True, stable=True)
    ids, vals = order.indices[..., :width], order.values[..., :width]
    ids = torch.where(vals > float("-inf"), ids, nkb).sort(dim=-1).values
    counts = (ids < nkb).sum(-1, dtype=torch.int32)
    ids = torch.where(ids < nkb, ids, -1).to(torch.int32)
    return BlockRoute(ids.contiguous(), counts.contiguous(), q_len, kv_len, q_block_size, kv_block_size,
                      causal=True, validate=False)


def _topk_max_blocks() -> int:
    from ..ops.block_topk.triton_kernels import TOPK_MAX_BLOCKS

    return TOPK_MAX_BLOCKS


def _topk_use_triton(scores: Tensor, nkb: int, backend: Optional[str]) -> bool:
    if backend == "reference":
        return False
    why = triton_why_not(scores)  # (the estimators' check would read nkb as a head dim, limited to 256)
    if why is None and nkb > _topk_max_blocks():
        why = f"{nkb} key blocks exceed the {_topk_max_blocks()} the kernel holds per row"
    if backend == "triton":
        if why is not None:
            raise BackendUnavailable(f"the Triton top-k route kernel cannot run this call: {why}.")
        return True
    return why is None and scores.device.type == "cuda"


class MoBARouter:
    """MoBA block router: top-k key blocks by ``mean(query block) . mean(key block)``.

    Args:
        block_size: tokens per key block.
        top_k: key blocks per query block (sinks and local window included).
        q_block_size: queries per routing decision (default ``block_size``); ``1`` is the paper's
            per-token gating.
        sink_blocks, local_blocks: always-kept first blocks and window ending at the diagonal
            (MoBA itself: 0 and 1, the query's own block).
        heads: ``"kv"`` (one route per KV head, scores reduced over the group with ``head_reduce``;
            the kernel then loads each K/V tile once per group) or ``"query"`` (one route per query
            head, as in the paper).
        head_reduce: ``"max"`` or ``"mean"`` (``heads="kv"`` only).
        backend: scoring and top-k: ``"triton"`` (two launches: the pooled-score kernel of
            :mod:`routed.ops.block_scores`, per query head with the GQA group packed per tile, then
            :mod:`routed.ops.block_topk`'s top-k kernel, which also renormalises and reduces the group;
            needs ``q_block_size == block_size``), ``"reference"`` (plain PyTorch, any options), or None
            (Triton where it applies on CUDA, else PyTorch). The scoring is small next to the attention:
            block means (one read of q and k) and a ``num_blocks x num_blocks`` product per head; as
            separate PyTorch ops its ~80 launches, not its arithmetic, bounded its time on the GPU.
    Call ``router(q, k, scale=None)``: ``q [B, Hq, Nq, D]``, ``k [B, Hkv, Nk, D]`` (``Nk >= Nq``)
    -> a causal :class:`BlockRoute`. Routing is not differentiable (MoBA's gate is a top-k).
    """

    def __init__(self, block_size: int = 64, top_k: int = 8, *, q_block_size: Optional[int] = None,
                 sink_blocks: int = 0, local_blocks: int = 1, heads: str = "kv", head_reduce: str = "max",
                 backend: Optional[str] = None) -> None:
        check_block_options(block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
        self.q_block_size = block_size if q_block_size is None else _pos_int("q_block_size", q_block_size)
        if heads not in ("kv", "query"):
            raise RouteError(f"heads must be 'kv' (one route per key/value head) or 'query', got {heads!r}.")
        if head_reduce not in ("max", "mean"):
            raise RouteError(f"head_reduce must be 'max' or 'mean', got {head_reduce!r}.")
        if backend not in (None, "triton", "reference"):
            raise ValueError(f"backend must be 'triton', 'reference' or None (automatic), got {backend!r}.")
        self.block_size, self.top_k = block_size, top_k
        self.sink_blocks, self.local_blocks = sink_blocks, local_blocks
        self.heads, self.head_reduce, self.backend = heads, head_reduce, backend

    def scores(self, q: Tensor, k: Tensor, *, scale: Optional[float] = None) -> Tensor:
        """``[B, H, nqb, nkb]`` float32 routing scores (H = KV or query heads, per ``heads``).

        Per query head: the softmax, over the key blocks wholly before the query block (the
        candidates; the query block's own blocks are always kept and score 0 here), of
        ``scale * mean(query block) . mean(key block)``; then the max or mean over the GQA group for
        ``heads="kv"``. Per head the ranking is MoBA's raw score; the softmax makes heads comparable
        before the group reduction. Nothing here depends on keys at or after the query block, so
        a prefill and a token-by-token decode (``q_block_size=1``) route alike.
        """
        check_qk_heads(q, k)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        nq, nk = q.shape[2], k.shape[2]
        if nk < nq:
            raise RouteError(f"k has {nk} tokens but q has {nq}: queries are the last q_len positions of the keys.")
        first, _ = _query_block_extent(nq, nk, self.q_block_size, self.block_size, q.device)
        nkb = math.ceil(nk / self.block_size)
        if self._use_triton(q, nq):
            # The pooled-score kernel's softmax also covers the own (partial) blocks; per query head
            # renormalising over the earlier blocks (all full) gives exactly the definition above,
            # then the group reduction (the kernel reads each KV head's pooled keys for its group).
            p = _renormalise_over_earlier(self._pooled_probs_triton(q, k, scale), first)
            return _reduce_group(p, self._group(q, k), self.head_reduce)
        earlier = torch.arange(nkb, device=q.device)[None, :] < first[:, None]  # [nqb, nkb] candidates
        return _moba_scores_torch(q, k, self.q_block_size, self.block_size, scale, earlier, self._group(q, k),
                                  self.head_reduce)

    def _group(self, q: Tensor, k: Tensor) -> int:
        """Rows of query heads reduced into one route head: the GQA group (``heads="kv"``) or 1."""
        return q.shape[1] // k.shape[1] if self.heads == "kv" else 1

    def _pooled_probs_triton(self, q: Tensor, k: Tensor, scale: Optional[float]) -> Tensor:
        """``[B, Hq, nqb, nkb]``: the pooled-score kernel's per-query-head probabilities."""
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return pooled_block_probs(q, k, self.block_size, scale=scale, head_reduce="none", backend="triton")

    def _use_triton(self, q: Tensor, nq: int) -> bool:
        # One query block holding every query pools alike with either block size.
        same_blocks = self.q_block_size == self.block_size or nq <= min(self.q_block_size, self.block_size)
        if self.backend == "triton":
            if not same_blocks:
                raise BackendUnavailable(
                    "the Triton pooled-score kernel scores query blocks as large as key blocks; this router has "
                    f"q_block_size={self.q_block_size}, block_size={self.block_size}. Use backend='reference' (or "
                    "None) or q_block_size=block_size.")
            why = estimator_backend_why_not(q, self.block_size, False)
            if why is not None:
                raise BackendUnavailable(f"the Triton pooled-score kernel cannot run this call: {why}.")
            return True
        return (self.backend is None and same_blocks and q.device.type == "cuda"
                and estimator_backend_why_not(q, self.block_size, False) is None)

    def __call__(self, q: Tensor, k: Tensor, *, scale: Optional[float] = None) -> BlockRoute:
        geometry = dict(top_k=self.top_k, q_len=q.shape[2], kv_len=k.shape[2], q_block_size=self.q_block_size,
                        kv_block_size=self.block_size, sink_blocks=self.sink_blocks, local_blocks=self.local_blocks)
        with torch.no_grad():
            q, k = q.detach(), k.detach()
            check_qk_heads(q, k)
            if k.shape[2] >= q.shape[2] and self._use_triton(q, q.shape[2]):
                # The per-query-head pooled probabilities, then one kernel that renormalises them
                # over the candidates, reduces the GQA group and picks the top-k (as scores() + top-k).
                group = self._group(q, k)
                return _topk_route(self._pooled_probs_triton(q, k, scale), backend="triton", group=group,
                                   reduce=self.head_reduce if group > 1 else "none", renormalize=True, **geometry)
            return block_topk_route(self.scores(q, k, scale=scale), **geometry, backend=self.backend)

    def __repr__(self) -> str:
        return (f"MoBARouter(block_size={self.block_size}, top_k={self.top_k}, q_block_size={self.q_block_size}, "
                f"sink_blocks={self.sink_blocks}, local_blocks={self.local_blocks}, heads={self.heads!r}, "
                f"head_reduce={self.head_reduce!r}, backend={self.backend!r})")


def _moba_scores_torch(q: Tensor, k: Tensor, q_block_size: int, kv_block_size: int, scale: float,
                       candidates: Tensor, group: int, head_reduce: str) -> Tensor:
    """:meth:`MoBARouter.scores` in plain PyTorch, any block sizes: block means (one read of ``q``
    and ``k``), a ``nqb x nkb`` product per head, a softmax over ``candidates [nqb, nkb]``, the
    reduction over each ``group`` of query heads (1: keep the query heads)."""
    B, hq, nq, _ = q.shape
    hkv = k.shape[1]
    pq, pk = block_means(q, q_block_size), block_means(k, kv_block_size)
    nqb, nkb = pq.shape[2], pk.shape[2]
    logits = (pq.view(B, hkv, hq // hkv * nqb, -1) @ pk.transpose(-1, -2)).view(B, hq, nqb, nkb) * scale
    logits = logits.masked_fill(~candidates, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a row without candidates: all zero
    return _reduce_group(p, group, head_reduce)


def _renormalise_over_earlier(p: Tensor, first: Tensor) -> Tensor:
    """``p [..., nqb, nkb]`` (float32) divided, per row, by its sum over the key blocks before the query
    block's first key block ``first [nqb]`` (MoBA's candidates); zero elsewhere."""
    p = p.float() * (torch.arange(p.shape[-1], device=p.device) < first[:, None])
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _reduce_group(p: Tensor, group: int, reduce: str) -> Tensor:
    """``[B, H * group, ...]`` -> ``[B, H, ...]``: the ``"max"`` or ``"mean"`` over each head's ``group``
    rows (the GQA group of a KV-head route); ``group == 1``: ``p`` itself."""
    if group == 1:
        return p
    p = p.unflatten(1, (-1, group))
    return p.amax(2) if reduce == "max" else p.mean(2)


def _nsa_lse_torch(q: Tensor, k_cmp: Tensor, kv_len: int, compress_block: int, compress_stride: int, scale: float,
                   chunk: int) -> Tensor:
    """``[B, Hq, Nq]`` log-sum-exp of every query over the compressed blocks that ended (``-inf``
    where none has)."""
    B, hq, nq, d = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    ends = compressed_positions(kv_len, compress_block, compress_stride, q.device)
    out = []
    for s0 in range(0, nq, chunk):
        s1 = min(nq, s0 + chunk)
        logits = (q[:, :, s0:s1].float().reshape(B, hkv, -1, d) @ k_cmp.float().transpose(-1, -2))
        logits = logits.view(B, hq, s1 - s0, nc) * scale
        vis = ends[None, :] <= (torch.arange(s0, s1, device=q.device) + kv_len - nq)[:, None]
        out.append(torch.logsumexp(logits.masked_fill(~vis, float("-inf")), dim=-1))
    return torch.cat(out, dim=2)


def _nsa_mass_torch(q: Tensor, k_cmp: Tensor, lse: Tensor, kv_len: int, q_block_size: int, compress_block: int,
                    compress_stride: int, scale: float, chunk: int) -> Tensor:
    """``[B, Hkv, nqb, Nc]``: per query block, the compressed-attention probability of every
    compressed block summed over the block's queries and the group's query heads (PyTorch twin of
    :func:`~routed.ops.block_topk.triton_kernels.nsa_compressed_mass_triton`)."""
    B, hq, nq, d = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    qbs, g = q_block_size, hq // hkv
    nqb = math.ceil(nq / qbs)
    ends = compressed_positions(kv_len, compress_block, compress_stride, q.device)
    kc = k_cmp.float()
    out = torch.zeros(B, hkv, nqb, nc, dtype=torch.float32, device=q.device)
    step = max(qbs, (chunk // qbs) * qbs)  # whole query blocks per chunk
    for s0 in range(0, nq, step):
        s1 = min(nq, s0 + step)
        rows = s1 - s0
        logits = (q[:, :, s0:s1].float().reshape(B, hkv, g * rows, d) @ kc.transpose(-1, -2)).view(B, hq, rows, nc)
        vis = ends[None, :] <= (torch.arange(s0, s1, device=q.device) + kv_len - nq)[:, None]
        l = lse[:, :, s0:s1].float()
        l = torch.where(torch.isfinite(l), l, torch.full_like(l, float("inf")))  # sees nothing -> p = 0
        p = torch.exp(logits * scale - l[..., None]).masked_fill(~vis, 0.0)
        p = p.view(B, hkv, g, rows, nc).sum(2)
        # Whole query blocks, then the partial last one (padding it to a whole block would make a decode
        # step of one query pay for q_block_size rows).
        b0, full = s0 // qbs, rows // qbs
        if full:
            out[:, :, b0:b0 + full] = p[:, :, :full * qbs].view(B, hkv, full, qbs, nc).sum(3)
        if rows > full * qbs:
            out[:, :, b0 + full] = p[:, :, full * qbs:].sum(2)
    return out


@cached_constants()
def _queries_per_block(q_len: int, q_block_size: int, device) -> Tensor:
    """``[nqb]`` float32 number of queries in each query block (the last may be partial)."""
    return torch.clamp(q_len - torch.arange(math.ceil(q_len / q_block_size), device=device) * q_block_size,
                       max=q_block_size).float()


def num_compressed_blocks(kv_len: int, compress_block: int, compress_stride: int) -> int:
    """How many compressed blocks have ended among ``kv_len`` tokens (see :func:`compressed_positions`)."""
    return max(0, (kv_len - compress_block) // compress_stride + 1)


def compressed_positions(kv_len: int, compress_block: int, compress_stride: int, device=None) -> Tensor:
    """``[num_compressed]`` int64 position of the last token of every compressed block (block ``i``
    covers tokens ``i * stride .. i * stride + compress_block - 1``; only whole blocks exist)."""
    n = num_compressed_blocks(kv_len, compress_block, compress_stride)
    return torch.arange(n, device=device) * compress_stride + (compress_block - 1)


def spread_to_selection_blocks(mass: Tensor, compress_block: int, compress_stride: int, sel_block: int,
                               num_sel_blocks: int) -> Tensor:
    """Spread compressed-block scores over the selection blocks by token overlap, in linear time.

    Compressed block ``i`` covers tokens ``i * compress_stride .. + compress_block - 1``; selection
    block ``j`` gets the share of ``mass[..., i]`` equal to the fraction of those tokens that lie in
    it. This equals ``mass @ W`` with ``W[i, j] = overlap(i, j) / compress_block`` (rows sum to 1),
    without building the ``[Nc, num_sel_blocks]`` matrix: tokens are cut into chunks of
    ``g = gcd(stride, compress_block, sel_block)`` (``g = stride`` under NSA's condition), each of
    which lies in exactly one selection block and is covered by whole compressed blocks only. A
    compressed block spreads over its ``compress_block / g`` chunks (a sliding-window sum), the
    chunks sum per selection block. Per row: ``O(kv_len / g)`` memory and ``compress_block / g``
    times that work (NSA's defaults: about ``2 * Nc``).

    Args:
        mass: ``[..., Nc]`` float scores per compressed block (NSA: probabilities, >= 0).
        compress_block, compress_stride: the compressed blocks' length and stride (any positive ints).
        sel_block: tokens per selection block.
        num_sel_blocks: selection blocks of the output; they must hold every compressed block.
    Returns:
        ``[..., num_sel_blocks]`` in ``mass``'s dtype. For ``mass >= 0`` every output is a sum of
        non-negative terms (no cancellation), so float32 is as accurate as the float32 matrix
        product: both are within a few ulps, relative, of the exact value.
    """
    nc = mass.shape[-1]
    g = math.gcd(compress_stride, compress_block, sel_block)
    up, width, per_sel = compress_stride // g, compress_block // g, sel_block // g  # in chunks
    nch = num_sel_blocks * per_sel
    if nc and (nc - 1) * compress_stride + compress_block > num_sel_blocks * sel_block:
        raise RouteError(f"{nc} compressed blocks (length {compress_block}, stride {compress_stride}) reach past the "
                         f"{num_sel_blocks} selection blocks of {sel_block} tokens.")
    # Compressed block i starts at chunk i * up: place its mass there (zeros between when up > 1),
    # then chunk c sums the blocks that start in the ``width`` chunks ending at c.
    start = torch.nn.functional.pad(mass[..., None], (0, up - 1)).flatten(-2) if up > 1 else mass
    start = torch.nn.functional.pad(start, (width - 1, max(0, nch - start.shape[-1])))[..., :nch + width - 1]
    chunks = start.unfold(-1, width, 1).sum(-1) if width > 1 else start  # [..., nch], a strided view reduced
    return chunks.reshape(*mass.shape[:-1], num_sel_blocks, per_sel).sum(-1) * (g / compress_block)


class NSASelectionRouter:
    """NSA selection: top-n key blocks by the compressed branch's attention probabilities.

    Args:
        block_size: tokens per selection block (``l'`` in the paper).
        top_n: selection blocks per query block (sinks and local window included).
        compress_block, compress_stride: the compressed branch's block length ``l`` and stride
            ``d``; ``d`` must divide both ``l`` and ``block_size`` (the paper's condition).
        q_block_size: queries per routing decision (default ``block_size``; ``1`` selects per query,
            exact under incremental decoding).
        sink_blocks, local_blocks: always-kept blocks (the paper keeps 1 initial and 2 local).
        chunk: queries scored at once by the PyTorch path (bounds its ``chunk x num_compressed``
            temporary).
        backend: scoring and top-k: ``"triton"`` (the fused kernels of :mod:`routed.ops.block_topk`;
            nothing of size ``q_len x num_compressed`` is written), ``"reference"`` (plain PyTorch,
            chunked), or None (Triton on CUDA, PyTorch elsewhere).
    Call ``router(q, k_cmp, lse_cmp, kv_len, scale=None)``: ``q [B, Hq, Nq, D]``, the compressed
    keys ``k_cmp [B, Hkv, Nc, D]`` and the compressed branch's log-sum-exp ``lse_cmp [B, Hq, Nq]``
    (``-inf`` where a query sees no compressed block; recomputed when None) -> a causal KV-head
    :class:`BlockRoute` over the ``kv_len`` real keys.
    """

    def __init__(self, block_size: int = 64, top_n: int = 16, *, compress_block: int = 32, compress_stride: int = 16,
                 q_block_size: Optional[int] = None, sink_blocks: int = 1, local_blocks: int = 2, chunk: int = 4096,
                 backend: Optional[str] = None) -> None:
        check_block_options(block_size=block_size, top_k=top_n, sink_blocks=sink_blocks, local_blocks=local_blocks,
                            what="top_n")
        _pos_int("compress_block", compress_block)
        _pos_int("compress_stride", compress_stride)
        if compress_block % compress_stride or block_size % compress_stride:
            raise RouteError(f"compress_stride={compress_stride} must divide both compress_block={compress_block} and "
                             f"the selection block_size={block_size} (NSA's condition: compressed blocks then tile the "
                             "selection blocks exactly); e.g. compress_block=32, compress_stride=16, block_size=64.")
        if backend not in (None, "reference", "triton"):
            raise ValueError(f"backend must be 'triton', 'reference' or None (automatic), got {backend!r}.")
        self.block_size, self.top_n = block_size, top_n
        self.compress_block, self.compress_stride = compress_block, compress_stride
        self.q_block_size = block_size if q_block_size is None else _pos_int("q_block_size", q_block_size)
        self.sink_blocks, self.local_blocks = sink_blocks, local_blocks
        self.chunk = _pos_int("chunk", chunk)
        self.backend = backend

    def scores(self, q: Tensor, k_cmp: Tensor, lse_cmp: Optional[Tensor], kv_len: int, *,
               scale: Optional[float] = None) -> Tensor:
        """``[B, Hkv, nqb, num_sel_blocks]`` float32: for every query block, the mean over its
        queries of the compressed attention mass each selection block holds (summed over the
        group's query heads)."""
        mass = self._compressed_mass(q, k_cmp, lse_cmp, kv_len, scale)
        # Spread each compressed block's mass over the selection blocks it overlaps (linear in Nc, no
        # Nc x num_sel_blocks matrix); mean per query.
        sel = spread_to_selection_blocks(mass, self.compress_block, self.compress_stride, self.block_size,
                                         math.ceil(kv_len / self.block_size))
        return sel / _queries_per_block(q.shape[2], self.q_block_size, q.device)[:, None]

    def _compressed_mass(self, q: Tensor, k_cmp: Tensor, lse_cmp: Optional[Tensor], kv_len: int,
                         scale: Optional[float]) -> Tensor:
        """``[B, Hkv, nqb, Nc]`` float32: per query block, the compressed-attention probability of every
        compressed block, summed over the block's queries and the group's query heads."""
        check_qk_heads(q, k_cmp)
        B, hq, nq, d = q.shape
        hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
        if kv_len < nq:
            raise RouteError(f"kv_len={kv_len} is smaller than the {nq} queries; queries are the last positions.")
        expect = num_compressed_blocks(kv_len, self.compress_block, self.compress_stride)
        if nc != expect:
            raise RouteError(f"k_cmp has {nc} compressed keys but kv_len={kv_len} with compress_block="
                             f"{self.compress_block}, compress_stride={self.compress_stride} gives {expect}.")
        scale = d ** -0.5 if scale is None else float(scale)
        qbs = self.q_block_size
        if nc == 0:
            return torch.zeros(B, hkv, math.ceil(nq / qbs), 0, dtype=torch.float32, device=q.device)
        if lse_cmp is None:
            lse_cmp = _nsa_lse_torch(q, k_cmp, kv_len, self.compress_block, self.compress_stride, scale, self.chunk)
        if self._use_triton(q):
            from ..ops.block_topk.triton_kernels import nsa_compressed_mass_triton

            mass = nsa_compressed_mass_triton(q, k_cmp, lse_cmp, kv_len, qbs, self.compress_block,
                                              self.compress_stride, scale)
        else:
            mass = _nsa_mass_torch(q, k_cmp, lse_cmp, kv_len, qbs, self.compress_block, self.compress_stride, scale,
                                   self.chunk)
        return mass

    def _use_triton(self, q: Tensor) -> bool:
        why = estimator_backend_why_not(q, 16, False)  # the same conditions as the estimator kernels
        if self.backend == "triton":
            if why is not None:
                raise BackendUnavailable(f"the Triton NSA scoring kernel cannot run this call: {why}.")
            return True
        return self.backend is None and why is None and q.device.type == "cuda"

    def __call__(self, q: Tensor, k_cmp: Tensor, lse_cmp: Optional[Tensor], kv_len: int, *,
                 scale: Optional[float] = None) -> BlockRoute:
        with torch.no_grad():
            mass = self._compressed_mass(q.detach(), k_cmp.detach(), None if lse_cmp is None else lse_cmp.detach(),
                                         kv_len, scale)
            # The top-k of the spread mass: the ranking of :meth:`scores` without its division by the
            # queries per block (a positive constant per row); the Triton kernel spreads as it reads.
            return _topk_route(mass, self.top_n, q.shape[2], kv_len, self.q_block_size, self.block_size,
                               self.sink_blocks, self.local_blocks, self.backend,
                               spread=(self.compress_block, self.compress_stride))

    def __repr__(self) -> str:
        return (f"NSASelectionRouter(block_size={self.block_size}, top_n={self.top_n}, compress_block="
                f"{self.compress_block}, compress_stride={self.compress_stride}, q_block_size={self.q_block_size}, "
                f"sink_blocks={self.sink_blocks}, local_blocks={self.local_blocks}, backend={self.backend!r})")
