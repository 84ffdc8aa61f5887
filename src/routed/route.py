"""Routes: the plain data that routers produce and attention kernels consume.

A route says *where* each query's attention goes; it never computes attention. Two kinds:

* :class:`BlockRoute` -- for every (batch, head, query block), a sorted list of key-block ids.
  Covers MoBA, NSA selection, BiFormer regions, k-means clusters in permuted order, sliding
  windows and block estimators for pretrained LLMs.
* :class:`TokenRoute` -- for every (batch, head, group), the ids of the tokens gathered into
  the group (Routing Transformer clusters, MoSA expert-choice heads). Attention runs inside
  each group and results scatter back to the tokens.

A route's head axis may be the query heads, the key/value heads (shared by the query heads of
a GQA group) or 1 (shared by all heads); its batch axis may be the batch or 1. Kernels
broadcast.

Routes validate themselves once, at construction. Routers that build correct routes by
construction may pass ``validate=False`` to skip the value checks (which synchronise a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["BlockRoute", "TokenRoute", "ExpertRoute", "RouteError"]

_INDEX_DTYPES = (torch.int32, torch.int64)


class RouteError(ValueError):
    """A route (or the tensors it is used with) is malformed. The message says how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RouteError(msg)


def _check_positions(name: str, pos: Optional[Tensor], length: int, device: torch.device) -> None:
    if pos is None:
        return
    _check(isinstance(pos, Tensor), f"{name} must be a torch.Tensor, got {type(pos).__name__}.")
    _check(
        pos.dtype in _INDEX_DTYPES,
        f"{name} must be int32 or int64 (token positions), got {pos.dtype}; convert with .to(torch.int32).",
    )
    _check(
        pos.dim() in (1, 2) and pos.shape[-1] == length,
        f"{name} must have shape [{length}] or [batch, {length}], got {list(pos.shape)}.",
    )
    _check(
        pos.device == device,
        f"{name} is on {pos.device} but the route's indices are on {device}; move them to one device.",
    )


@dataclass(frozen=True, eq=False)
class BlockRoute:
    """Block-sparse route: which key blocks each query block attends to.

    Attributes:
        kv_block_ids: ``[batch_r, heads_r, num_q_blocks, max_blocks]`` int32. Row ``(b, h, i)``
            lists, in strictly increasing order, the key blocks query block ``i`` attends to;
            entries past ``kv_block_counts[b, h, i]`` are ``-1``.
        kv_block_counts: ``[batch_r, heads_r, num_q_blocks]`` int32, how many ids are valid.
        q_len, kv_len: token lengths the route was built for (need not be block multiples:
            the last block of each is partial).
        q_block_size, kv_block_size: tokens per query block and per key block.
        causal: if True, inside the routed blocks a key is visible to a query only when
            ``kv_position <= q_position``.
        q_positions: optional ``[q_len]`` or ``[batch, q_len]`` int positions of the query tokens
            for the causal test, when the token order was permuted (k-means clusters sorted by
            cluster, images sorted region-major). Default ``arange(q_len) + kv_len - q_len``
            (queries are the last ``q_len`` positions, as in prefill with a KV cache).
        kv_positions: likewise for keys, default ``arange(kv_len)``.
        q_segments, kv_segments: optional ``[len]`` or ``[batch, len]`` int segment ids (given
            together): a key is visible to a query only inside the same segment. Packed
            variable-length batches (see :func:`segment_ids_from_cu_seqlens`) and padding (give
            pad tokens a segment of their own) use them.

    ``batch_r`` is the batch size or 1; ``heads_r`` is the number of query heads, of key/value
    heads, or 1.
    """

    kv_block_ids: Tensor
    kv_block_counts: Tensor
    q_len: int
    kv_len: int
    q_block_size: int
    kv_block_size: int
    causal: bool = False
    q_positions: Optional[Tensor] = None
    kv_positions: Optional[Tensor] = None
    q_segments: Optional[Tensor] = None
    kv_segments: Optional[Tensor] = None
    validate: bool = field(default=True, repr=False)
    # Derived data computed once per route: the transposed route, and the kernels' mask splits
    # (filled by routed.ops.block_sparse.triton_ops.route_plan).
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids, counts = self.kv_block_ids, self.kv_block_counts
        _check(isinstance(ids, Tensor) and isinstance(counts, Tensor),
               "kv_block_ids and kv_block_counts must be torch.Tensors.")
        _check(ids.dim() == 4,
               f"kv_block_ids must be 4-D [batch, heads, num_q_blocks, max_blocks], got shape {list(ids.shape)}.")
        _check(ids.dtype == torch.int32,
               f"kv_block_ids must be int32, got {ids.dtype}; convert with .to(torch.int32).")
        _check(counts.dtype == torch.int32,
               f"kv_block_counts must be int32, got {counts.dtype}; convert with .to(torch.int32).")
        _check(counts.shape == ids.shape[:3],
               f"kv_block_counts must have shape {list(ids.shape[:3])} (kv_block_ids without its last axis), "
               f"got {list(counts.shape)}.")
        _check(ids.device == counts.device,
               f"kv_block_ids is on {ids.device} but kv_block_counts on {counts.device}; move them to one device.")
        for name in ("q_len", "kv_len", "q_block_size", "kv_block_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an int, got {v!r}.")
        _check(self.q_len >= 1 and self.kv_len >= 1, f"q_len and kv_len must be >= 1, got {self.q_len}, {self.kv_len}.")
        _check(self.q_block_size >= 1 and self.kv_block_size >= 1,
               f"block sizes must be >= 1, got q_block_size={self.q_block_size}, kv_block_size={self.kv_block_size}.")
        _check(ids.shape[2] == self.num_q_blocks,
               f"kv_block_ids has {ids.shape[2]} query blocks but q_len={self.q_len} with q_block_size="
               f"{self.q_block_size} needs ceil({self.q_len}/{self.q_block_size}) = {self.num_q_blocks}.")
        _check_positions("q_positions", self.q_positions, self.q_len, ids.device)
        _check_positions("kv_positions", self.kv_positions, self.kv_len, ids.device)
        _check((self.q_segments is None) == (self.kv_segments is None),
               "give q_segments and kv_segments together (for self-attention, the same tensor twice).")
        _check_positions("q_segments", self.q_segments, self.q_len, ids.device)
        _check_positions("kv_segments", self.kv_segments, self.kv_len, ids.device)
        if self.validate:
            self._validate_values()

    def _validate_values(self) -> None:
        ids, counts = self.kv_block_ids, self.kv_block_counts
        k = ids.shape[-1]
        nkb = self.num_kv_blocks
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > k):
            raise RouteError(f"kv_block_counts must lie in [0, {k}] (the last axis of kv_block_ids), "
                             f"got values in [{int(counts.min())}, {int(counts.max())}].")
        if ids.numel() == 0:
            return
        slot = torch.arange(k, device=ids.device)
        live = slot < counts.unsqueeze(-1)
        bad_pad = (~live) & (ids != -1)
        if bool(bad_pad.any()):
            where = tuple(int(i) for i in bad_pad.nonzero()[0])
            raise RouteError(f"kv_block_ids{list(where)} = {int(ids[where])} lies past kv_block_counts but is not -1; "
                             "pad unused slots with -1.")
        out_of_range = live & ((ids < 0) | (ids >= nkb))
        if bool(out_of_range.any()):
            where = tuple(int(i) for i in out_of_range.nonzero()[0])
            raise RouteError(f"kv_block_ids{list(where)} = {int(ids[where])} is out of range: kv_len={self.kv_len} "
                             f"with kv_block_size={self.kv_block_size} has key blocks 0..{nkb - 1}.")
        if k > 1:
            both_live = live[..., 1:]
            unsorted = both_live & (ids[..., 1:] <= ids[..., :-1])
            if bool(unsorted.any()):
                where = tuple(int(i) for i in unsorted.nonzero()[0])
                row = where[:3]
                raise RouteError(f"kv_block_ids{list(row)} = {ids[row].tolist()} is not strictly increasing; "
                                 "sort each row (torch.sort) and remove duplicate block ids.")

    # ----------------------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.q_block_size)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.kv_block_size)

    @property
    def max_blocks(self) -> int:
        return self.kv_block_ids.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_block_ids.device

    def to(self, device) -> "BlockRoute":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockRoute(mv(self.kv_block_ids), mv(self.kv_block_counts), self.q_len, self.kv_len,
                          self.q_block_size, self.kv_block_size, self.causal, mv(self.q_positions),
                          mv(self.kv_positions), mv(self.q_segments), mv(self.kv_segments), validate=False)

    def transposed(self) -> tuple[Tensor, Tensor]:
        """For every (batch_r, head_r, key block), the sorted query blocks that route to it.

        Returns ``q_block_ids [batch_r, heads_r, num_kv_blocks, max_q_blocks]`` (int32, -1 padded)
        and ``q_block_counts [batch_r, heads_r, num_kv_blocks]``: what a key-side backward pass walks.
        Computed once per route and cached. The padding makes it ``O((seq / block)^2)`` when one key
        block is routed to by every query block (sinks, causal early blocks): the kernels take
        :func:`transpose_block_ids_compact` (``O(routed blocks)``) for all but small routes.
        """
        if "transposed" not in self._cache:
            self._cache["transposed"] = transpose_block_ids(self.kv_block_ids, self.num_kv_blocks)
        return self._cache["transposed"]

    def resolved_q_positions(self) -> Tensor:
        """``[batch_p, q_len]`` int64 query positions (defaults filled in)."""
        if self.q_positions is not None:
            return self.q_positions.long().reshape(-1, self.q_len)
        return (torch.arange(self.q_len, device=self.device) + (self.kv_len - self.q_len)).unsqueeze(0)

    def resolved_kv_positions(self) -> Tensor:
        """``[batch_p, kv_len]`` int64 key positions (defaults filled in)."""
        if self.kv_positions is not None:
            return self.kv_positions.long().reshape(-1, self.kv_len)
        return torch.arange(self.kv_len, device=self.device).unsqueeze(0)

    @property
    def has_default_positions(self) -> bool:
        return self.q_positions is None and self.kv_positions is None

    @property
    def has_segments(self) -> bool:
        return self.q_segments is not None

    def with_segments(self, q_segments: Tensor, kv_segments: Optional[Tensor] = None) -> "BlockRoute":
        """This route with segment ids (``kv_segments`` defaults to ``q_segments``)."""
        kv_segments = q_segments if kv_segments is None else kv_segments
        return BlockRoute(self.kv_block_ids, self.kv_block_counts, self.q_len, self.kv_len, self.q_block_size,
                          self.kv_block_size, self.causal, self.q_positions, self.kv_positions, q_segments,
                          kv_segments, validate=False)

    # ----------------------------------------------------------------------------------------------
    def to_block_mask(self) -> Tensor:
        """Dense boolean ``[batch_r, heads_r, num_q_blocks, num_kv_blocks]`` view of the route."""
        b, h, nqb, k = self.kv_block_ids.shape
        mask = torch.zeros(b, h, nqb, self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        # -1 padding goes to the spare last column, which is dropped.
        idx = torch.where(self.kv_block_ids < 0, self.num_kv_blocks, self.kv_block_ids).long()
        mask.scatter_(-1, idx, True)
        return mask[..., : self.num_kv_blocks]

    def to_token_mask(self) -> Tensor:
        """Dense boolean ``[batch_r', heads_r, q_len, kv_len]`` mask (causal test included).

        Builds a ``q_len x kv_len`` tensor: for tests, plots and small inputs only.
        """
        bm = self.to_block_mask()
        qb = torch.arange(self.q_len, device=self.device) // self.q_block_size
        kb = torch.arange(self.kv_len, device=self.device) // self.kv_block_size
        tok = bm[:, :, qb][:, :, :, kb]
        if self.causal:
            qp = self.resolved_q_positions()[:, None, :, None]
            kp = self.resolved_kv_positions()[:, None, None, :]
            tok = tok & (kp <= qp)
        if self.has_segments:
            qs = self.q_segments.reshape(-1, 1, self.q_len, 1)
            ks = self.kv_segments.reshape(-1, 1, 1, self.kv_len)
            tok = tok & (qs == ks)
        return tok

    def visitable_block_mask(self) -> Tensor:
        """``[batch_p, num_q_blocks, num_kv_blocks]``: the block pairs a dense pass would visit.

        All pairs when not causal; when causal, the pairs holding at least one visible (query, key)
        pair given the token positions (a key block whose first position lies after the query
        block's last position is skipped by a causal dense kernel).
        """
        nqb, nkb = self.num_q_blocks, self.num_kv_blocks
        if not self.causal:
            return torch.ones(1, nqb, nkb, dtype=torch.bool, device=self.device)
        qp, kp = self.resolved_q_positions(), self.resolved_kv_positions()
        qmax = _block_reduce(qp, self.q_block_size, "amax")
        kmin = _block_reduce(kp, self.kv_block_size, "amin")
        return kmin[:, None, :] <= qmax[:, :, None]

    def density(self) -> float:
        """Routed key blocks over the key blocks a dense pass (causal or full) would visit."""
        visitable = self.visitable_block_mask()  # [bp, nqb, nkb]
        routed = self.to_block_mask()  # [br, hr, nqb, nkb]
        b = max(visitable.shape[0], routed.shape[0])
        routed = (routed & visitable[:, None]).expand(b, -1, -1, -1)
        denom = visitable.expand(b, -1, -1).sum() * routed.shape[1]
        return float(routed.sum()) / max(float(denom), 1.0)

    def describe(self) -> str:
        """One line: shape, block sizes, blocks per query block and density."""
        c = self.kv_block_counts.float()
        mean_blocks = float(c.mean()) if c.numel() else 0.0
        return (f"BlockRoute(batch={self.kv_block_ids.shape[0]}, heads={self.kv_block_ids.shape[1]}, "
                f"q_len={self.q_len}, kv_len={self.kv_len}, blocks={self.q_block_size}x{self.kv_block_size}, "
                f"causal={self.causal}, blocks/query block: mean {mean_blocks:.1f} max {self.max_blocks}, "
                f"density {self.density():.3f})")

    __str__ = describe

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, block_mask: Tensor, *, q_len: int, kv_len: int, q_block_size: int,
                        kv_block_size: Optional[int] = None, causal: bool = False,
                        q_positions: Optional[Tensor] = None, kv_positions: Optional[Tensor] = None,
                        q_segments: Optional[Tensor] = None, kv_segments: Optional[Tensor] = None,
                        max_blocks: Optional[int] = None) -> "BlockRoute":
        """Build a route from a dense boolean ``[batch, heads, num_q_blocks, num_kv_blocks]`` mask.

        ``max_blocks`` pads the id axis to a fixed width (default: the largest row count).
        With ``causal=True`` the mask is used as given; blocks wholly in the future simply
        contribute nothing.
        """
        kv_block_size = q_block_size if kv_block_size is None else kv_block_size
        _check(isinstance(block_mask, Tensor) and block_mask.dtype == torch.bool,
               "block_mask must be a bool tensor [batch, heads, num_q_blocks, num_kv_blocks].")
        _check(block_mask.dim() == 4,
               f"block_mask must be 4-D [batch, heads, num_q_blocks, num_kv_blocks], got {list(block_mask.shape)}.")
        nkb = math.ceil(kv_len / kv_block_size)
        _check(block_mask.shape[-1] == nkb,
               f"block_mask has {block_mask.shape[-1]} key blocks but kv_len={kv_len} with kv_block_size="
               f"{kv_block_size} has {nkb}.")
        counts = block_mask.sum(-1, dtype=torch.int32)
        width = int(counts.max()) if counts.numel() else 0
        if max_blocks is not None:
            _check(max_blocks >= width, f"max_blocks={max_blocks} is smaller than the densest row ({width} blocks).")
            width = max_blocks
        # Stable sort puts the selected block ids first, in increasing order.
        col = torch.arange(nkb, device=block_mask.device, dtype=torch.int32).expand_as(block_mask)
        key = torch.where(block_mask, col, col + nkb)
        ids = key.sort(dim=-1).values[..., :width]
        ids = torch.where(ids >= nkb, torch.full_like(ids, -1), ids)
        if width > nkb:
            pad = ids.new_full((*ids.shape[:-1], width - nkb), -1)
            ids = torch.cat([ids, pad], dim=-1)
        return cls(ids.contiguous(), counts.contiguous(), q_len, kv_len, q_block_size, kv_block_size,
                   causal, q_positions, kv_positions, q_segments, kv_segments, validate=False)


def segment_ids_from_cu_seqlens(cu_seqlens: Tensor, total: Optional[int] = None) -> Tensor:
    """``cu_seqlens`` ``[num_seqs + 1]`` (0, end of sequence 0, ..., total), as in FlashAttention's
    varlen API -> int32 ``[total]`` segment id of every packed token."""
    _check(isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
           and cu_seqlens.dtype in _INDEX_DTYPES,
           "cu_seqlens must be a 1-D int tensor [num_seqs + 1] starting at 0 and ending at the total length.")
    cu = cu_seqlens.long()
    total = int(cu[-1]) if total is None else total
    _check(int(cu[0]) == 0 and int(cu[-1]) == total, f"cu_seqlens must start at 0 and end at {total}, got "
           f"{int(cu[0])} .. {int(cu[-1])}.")
    _check(bool((cu[1:] >= cu[:-1]).all()), "cu_seqlens must be non-decreasing.")
    tokens = torch.arange(total, device=cu.device)
    return (torch.bucketize(tokens, cu[1:], right=True)).to(torch.int32)


# Below this many elements the transposed route is allocated at its widest (every query block),
# which spares the GPU sync that measuring the exact width costs (routes rebuilt every step, as
# BiFormer's, pay it on every call).
_SYNC_FREE_TRANSPOSE_ELEMENTS = 1 << 24


def _sorted_pairs(ids: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """The routed (key block, query block) pairs of every (batch_r, head_r) row of ``ids [Br, Hr, nqb, K]``,
    sorted by key block then query block: ``q_sorted`` and ``kv_sorted`` ``[Br * Hr, nqb * K]`` (int64;
    padding slots last, with key block ``num_kv_blocks``) and the pairs per key block ``counts
    [Br * Hr, num_kv_blocks]`` (int32, contiguous)."""
    br, hr, nqb, k = ids.shape
    rows, slots = br * hr, nqb * k
    bh = torch.arange(rows, device=ids.device).view(br, hr, 1, 1)
    kv_of = torch.where(ids >= 0, ids.long(), num_kv_blocks)  # padding sorts after every key block
    q_of = torch.arange(nqb, device=ids.device).view(1, 1, nqb, 1).expand(br, hr, nqb, k)
    order = torch.argsort(((bh * (num_kv_blocks + 1) + kv_of) * nqb + q_of).flatten())  # rows stay contiguous
    q_sorted = q_of.flatten()[order].view(rows, slots)
    kv_sorted = kv_of.flatten()[order].view(rows, slots)
    counts = torch.zeros(rows, num_kv_blocks + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, kv_sorted, torch.ones(rows, slots, dtype=torch.int32, device=ids.device))
    return q_sorted, kv_sorted, counts[:, :num_kv_blocks].contiguous()  # the kernels index counts and offsets alike


def transpose_block_ids(ids: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor]:
    """``[Br, Hr, nqb, K]`` key-block ids (-1 padded) -> the query blocks of every key block:
    ``t_ids [Br, Hr, num_kv_blocks, max_q]`` (int32, -1 padded, sorted) and ``t_counts``.
    ``max_q`` is the largest count, or ``nqb`` when that tensor is small: then nothing here waits
    for the GPU (no boolean indexing, no data-dependent size)."""
    br, hr, nqb, _ = ids.shape
    rows = br * hr
    q_sorted, kv_sorted, counts = _sorted_pairs(ids, num_kv_blocks)
    if rows * num_kv_blocks * nqb <= _SYNC_FREE_TRANSPOSE_ELEMENTS:
        width = max(nqb, 1)  # the widest a row can be: no device-to-host sync for the exact width
    else:
        width = max(int(counts.max()) if counts.numel() else 0, 1)
    starts = torch.cumsum(counts, 1) - counts  # [rows, nkb]
    live = kv_sorted < num_kv_blocks
    slot = torch.arange(kv_sorted.shape[1], device=ids.device)
    rank = torch.where(live, slot - starts.gather(1, kv_sorted.clamp_max(num_kv_blocks - 1)), 0)
    # padding slots land in one spare key block per row, dropped at the end
    t_ids = torch.full((rows, num_kv_blocks + 1, width), -1, dtype=torch.int32, device=ids.device)
    row = torch.arange(rows, device=ids.device)[:, None].expand_as(kv_sorted)
    t_ids[row, kv_sorted, rank] = q_sorted.to(torch.int32)
    return t_ids[:, :num_kv_blocks].reshape(br, hr, num_kv_blocks, width), counts.view(br, hr, num_kv_blocks)


def transpose_block_ids_compact(ids: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`transpose_block_ids` in compressed-row form, ``O(routed blocks)`` memory at any length.

    The padded form is ``[.., num_kv_blocks, width]`` with ``width`` up to every query block, so
    ``O((seq / block)^2)`` when some key block (a sink, an early block under causality) is routed
    to by every query block. Here every (batch_r, head_r) row holds its routed pairs in one list,
    grouped by key block, query blocks sorted inside a group.

    Returns ``t_ids [Br, Hr, nqb * K]`` int32 (query block ids, ``-1`` past the row's pairs),
    ``t_offsets [Br, Hr, num_kv_blocks]`` int32 (where each key block's group starts in its row) and
    ``t_counts [Br, Hr, num_kv_blocks]`` int32. No device-to-host sync.
    """
    br, hr, nqb, k = ids.shape
    q_sorted, kv_sorted, counts = _sorted_pairs(ids, num_kv_blocks)
    t_ids = torch.where(kv_sorted < num_kv_blocks, q_sorted, -1).to(torch.int32)
    offsets = torch.cumsum(counts, 1, dtype=torch.int32) - counts
    return (t_ids.view(br, hr, nqb * k), offsets.view(br, hr, num_kv_blocks), counts.view(br, hr, num_kv_blocks))


def _block_reduce(pos: Tensor, block: int, op: str) -> Tensor:
    """Reduce ``[b, n]`` positions per block of ``block`` tokens (partial last block allowed)."""
    b, n = pos.shape
    nb = math.ceil(n / block)
    pad_val = torch.iinfo(torch.int64).min if op == "amax" else torch.iinfo(torch.int64).max
    padded = pos.new_full((b, nb * block), pad_val)
    padded[:, :n] = pos
    return getattr(padded.view(b, nb, block), op)(-1)


@dataclass(frozen=True, eq=False)
class TokenRoute:
    """Token-group route: attention runs among the tokens gathered into each group.

    Attributes:
        token_ids: ``[batch_r, heads_r, num_groups, group_size]`` int32/int64 token indices
            (original positions), padded with ``-1``. A token appears at most once per group and
            may appear in several groups or none.
        seq_len: length of the (self-attention) sequence.
        weights: optional ``[batch_r, heads_r, num_groups, group_size]`` float weights (MoSA's
            router scores). Output of token ``t`` is the sum over its occurrences of
            ``weight * attention output`` (weight 1 when omitted); tokens in no group get zeros.
        causal: if True, a key is visible to a query in its group only when
            ``key position <= query position`` (positions are the token ids).
    """

    token_ids: Tensor
    seq_len: int
    weights: Optional[Tensor] = None
    causal: bool = False
    validate: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        ids = self.token_ids
        _check(isinstance(ids, Tensor), "token_ids must be a torch.Tensor.")
        _check(ids.dim() == 4, f"token_ids must be 4-D [batch, heads, num_groups, group_size], got {list(ids.shape)}.")
        _check(ids.dtype in _INDEX_DTYPES,
               f"token_ids must be int32 or int64, got {ids.dtype}; convert with .to(torch.int32).")
        _check(isinstance(self.seq_len, int) and self.seq_len >= 1, f"seq_len must be an int >= 1, got {self.seq_len!r}.")
        if self.weights is not None:
            w = self.weights
            _check(isinstance(w, Tensor) and w.is_floating_point(),
                   "weights must be a floating-point tensor shaped like token_ids.")
            _check(w.shape == ids.shape, f"weights must have the shape of token_ids {list(ids.shape)}, got {list(w.shape)}.")
            _check(w.device == ids.device,
                   f"weights are on {w.device} but token_ids on {ids.device}; move them to one device.")
        if self.validate and ids.numel():
            bad = (ids < -1) | (ids >= self.seq_len)
            if bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise RouteError(f"token_ids{list(where)} = {int(ids[where])} is out of range: seq_len={self.seq_len} "
                                 f"has tokens 0..{self.seq_len - 1}; use -1 for padding.")
            s = ids.sort(dim=-1).values
            dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
            if bool(dup.any()):
                where = tuple(int(i) for i in dup.nonzero()[0])
                raise RouteError(f"token_ids{list(where[:3])} holds token {int(s[where[:3]][where[3] + 1])} twice; "
                                 "a token may appear at most once per group.")

    @property
    def device(self) -> torch.device:
        return self.token_ids.device

    @property
    def num_groups(self) -> int:
        return self.token_ids.shape[2]

    @property
    def group_size(self) -> int:
        return self.token_ids.shape[3]

    def to(self, device) -> "TokenRoute":
        w = None if self.weights is None else self.weights.to(device)
        return TokenRoute(self.token_ids.to(device), self.seq_len, w, self.causal, validate=False)

    def to_token_mask(self) -> Tensor:
        """Dense boolean ``[batch_r, heads_r, seq_len, seq_len]``: query ``t`` sees key ``s`` when
        both share a group (and ``s <= t`` if causal). Builds ``seq x seq``: tests and plots only."""
        b, h, g, s = self.token_ids.shape
        n = self.seq_len
        onehot = torch.zeros(b, h, g, n + 1, dtype=torch.float32, device=self.device)
        idx = torch.where(self.token_ids < 0, n, self.token_ids).long()
        onehot.scatter_(-1, idx, 1.0)
        onehot = onehot[..., :n]
        mask = torch.einsum("bhgi,bhgj->bhij", onehot, onehot) > 0
        if self.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        return mask

    def density(self) -> float:
        """Attended (query, key) pairs over those of a dense (causal or full) pass."""
        b, h, g, s = self.token_ids.shape
        live = (self.token_ids >= 0).sum(-1).double()
        pairs = live * (live + 1) / 2 if self.causal else live * live
        n = self.seq_len
        dense = n * (n + 1) / 2 if self.causal else n * n
        return float(pairs.sum()) / (b * h * dense)

    def describe(self) -> str:
        return (f"TokenRoute(batch={self.token_ids.shape[0]}, heads={self.token_ids.shape[1]}, "
                f"groups={self.num_groups}x{self.group_size}, seq_len={self.seq_len}, causal={self.causal}, "
                f"weighted={self.weights is not None}, density {self.density():.3f})")

    __str__ = describe


@dataclass(frozen=True, eq=False)
class ExpertRoute:
    """Expert route: which experts each token goes to, with what weight, and the sorted order that
    dispatch walks.

    Attributes:
        expert_ids: ``[tokens, k]`` int32. Slot ``(t, j)`` sends token ``t`` to expert
            ``expert_ids[t, j]``; ``-1`` marks an empty slot (dropped by a capacity, or unused by an
            expert-choice route, where tokens get different numbers of experts).
        weights: ``[tokens, k]`` float combine weights (``0`` in empty slots). May carry autograd
            history back to the router.
        num_experts: number of experts ``E``.
        order: ``[A]`` int64, the flat slot indices ``t * k + j`` of the ``A`` live slots, sorted by
            expert (stable: within an expert, by token). Dispatch gathers ``x[order // k]``.
        counts: ``[E]`` int32, live slots per expert (``counts.sum() == A``).
        offsets: ``[E + 1]`` int32, ``0`` then the cumulative counts: expert ``e`` owns rows
            ``offsets[e]:offsets[e + 1]`` of the sorted order (``offsets[1:]`` is what
            ``torch._grouped_mm`` takes).
        capacity: the per-expert capacity the route was built with, or None (no token dropped).
        slot_rows: optional ``[tokens, k]`` int64, the inverse of ``order``: the sorted row of every
            slot (``-1`` for an empty slot). Dispatch derives it when absent; the fused router
            kernel writes it beside ``order``.

    Build one with :meth:`from_expert_ids`, which derives ``order``, ``counts`` and ``offsets``.
    """

    expert_ids: Tensor
    weights: Tensor
    num_experts: int
    order: Tensor
    counts: Tensor
    offsets: Tensor
    capacity: Optional[int] = None
    validate: bool = field(default=True, repr=False)
    slot_rows: Optional[Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # One combined test first: a router builds a route per layer call, and formatting every
        # check's message costs more host time than the checks (the messages are for the failure).
        ids, w, E, inv = self.expert_ids, self.weights, self.num_experts, self.slot_rows
        if not (isinstance(ids, Tensor) and isinstance(w, Tensor) and isinstance(self.order, Tensor)
                and isinstance(self.counts, Tensor) and isinstance(self.offsets, Tensor)
                and ids.dim() == 2 and ids.dtype == torch.int32 and w.is_floating_point() and w.shape == ids.shape
                and isinstance(E, int) and not isinstance(E, bool) and E >= 1
                and self.order.dim() == 1 and self.order.dtype == torch.int64
                and self.counts.shape == (E,) and self.counts.dtype == torch.int32
                and self.offsets.shape == (E + 1,) and self.offsets.dtype == torch.int32
                and ids.device == w.device == self.order.device == self.counts.device == self.offsets.device
                and (self.capacity is None or (isinstance(self.capacity, int) and self.capacity >= 0))
                and (inv is None or (isinstance(inv, Tensor) and inv.shape == ids.shape and inv.dtype == torch.int64
                                     and inv.device == ids.device))):
            self._explain_fields()
        if self.validate:
            self._validate_values()

    def _explain_fields(self) -> None:
        """Raise the :class:`RouteError` that says which field is wrong."""
        ids, w = self.expert_ids, self.weights
        _check(isinstance(ids, Tensor) and isinstance(w, Tensor), "expert_ids and weights must be torch.Tensors.")
        _check(all(isinstance(t, Tensor) for t in (self.order, self.counts, self.offsets)),
               "order, counts and offsets must be torch.Tensors; build the route with ExpertRoute.from_expert_ids.")
        _check(ids.dim() == 2, f"expert_ids must be 2-D [tokens, k], got shape {list(ids.shape)}; flatten batch and "
               "sequence first (x.reshape(-1, hidden)).")
        _check(ids.dtype == torch.int32, f"expert_ids must be int32, got {ids.dtype}; convert with .to(torch.int32).")
        _check(w.is_floating_point(), f"weights must be floating point, got {w.dtype}.")
        _check(w.shape == ids.shape, f"weights must have the shape of expert_ids {list(ids.shape)}, got {list(w.shape)}.")
        _check(isinstance(self.num_experts, int) and not isinstance(self.num_experts, bool) and self.num_experts >= 1,
               f"num_experts must be an int >= 1, got {self.num_experts!r}.")
        _check(self.order.dim() == 1 and self.order.dtype == torch.int64,
               f"order must be 1-D int64, got {self.order.dtype} of shape {list(self.order.shape)}.")
        _check(self.counts.shape == (self.num_experts,) and self.counts.dtype == torch.int32,
               f"counts must be int32 of shape [{self.num_experts}], got {self.counts.dtype} {list(self.counts.shape)}.")
        _check(self.offsets.shape == (self.num_experts + 1,) and self.offsets.dtype == torch.int32,
               f"offsets must be int32 of shape [{self.num_experts + 1}], got {self.offsets.dtype} "
               f"{list(self.offsets.shape)}.")
        for name in ("weights", "order", "counts", "offsets"):
            t = getattr(self, name)
            _check(t.device == ids.device, f"{name} is on {t.device} but expert_ids on {ids.device}; move them to one device.")
        _check(self.capacity is None or (isinstance(self.capacity, int) and self.capacity >= 0),
               f"capacity must be None or an int >= 0, got {self.capacity!r}.")
        inv = self.slot_rows
        _check(inv is None or (isinstance(inv, Tensor) and inv.shape == ids.shape and inv.dtype == torch.int64
                               and inv.device == ids.device),
               f"slot_rows must be None or an int64 tensor of expert_ids' shape {list(ids.shape)} on {ids.device}, "
               f"got {getattr(inv, 'dtype', type(inv).__name__)} {list(getattr(inv, 'shape', []))}.")
        raise RouteError("the route's fields do not fit together; build it with ExpertRoute.from_expert_ids.")

    def _validate_values(self) -> None:
        ids, E = self.expert_ids, self.num_experts
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= E):
            bad = ((ids < -1) | (ids >= E)).nonzero()[0]
            where = tuple(int(i) for i in bad)
            raise RouteError(f"expert_ids{list(where)} = {int(ids[where])} is out of range: num_experts={E} has "
                             f"experts 0..{E - 1}; use -1 for an empty slot.")
        if ids.shape[1] > 1:
            s = ids.sort(dim=-1).values
            dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
            if bool(dup.any()):
                t = int(dup.nonzero()[0, 0])
                raise RouteError(f"token {t} is sent to expert {int(s[t][dup[t].nonzero()[0, 0] + 1])} twice "
                                 f"(expert_ids[{t}] = {ids[t].tolist()}); a token may use each expert once.")
        counts = torch.bincount(ids[ids >= 0].long(), minlength=E)
        if not torch.equal(counts, self.counts.long()):
            raise RouteError(f"counts {self.counts.tolist()} do not match expert_ids (which give {counts.tolist()}); "
                             "build the route with ExpertRoute.from_expert_ids.")
        if int(self.offsets[0]) != 0 or not torch.equal(self.offsets[1:].long(), counts.cumsum(0)):
            raise RouteError("offsets must be 0 followed by the cumulative counts; build the route with "
                             "ExpertRoute.from_expert_ids.")
        _check(self.order.numel() == int(counts.sum()),
               f"order has {self.order.numel()} entries but there are {int(counts.sum())} live slots.")
        if self.order.numel():
            _check(int(self.order.min()) >= 0 and int(self.order.max()) < ids.numel(),
                   f"order holds slot indices outside [0, {ids.numel()}).")
            e_sorted = ids.reshape(-1)[self.order].long()
            _check(bool((e_sorted >= 0).all()), "order lists an empty slot (expert id -1).")
            _check(bool((e_sorted[1:] >= e_sorted[:-1]).all()), "order is not sorted by expert.")
            _check(self.order.unique().numel() == self.order.numel(), "order lists a slot twice.")
        if self.slot_rows is not None:
            want = torch.full((ids.numel(),), -1, dtype=torch.int64, device=ids.device)
            want[self.order] = torch.arange(self.order.numel(), device=ids.device)
            _check(torch.equal(self.slot_rows.reshape(-1), want),
                   "slot_rows is not the inverse of order (the sorted row of every slot, -1 for an empty one).")

    @classmethod
    def from_expert_ids(cls, expert_ids: Tensor, weights: Tensor, num_experts: int, *,
                        capacity: Optional[int] = None, all_live: bool = False,
                        validate: bool = True) -> "ExpertRoute":
        """Build a route from per-token expert ids ``[tokens, k]`` (``-1`` = empty slot) and weights.

        ``all_live=True`` promises there is no ``-1`` (plain token-choice without capacity), which
        skips the one device-to-host copy that counting the live slots needs.
        """
        _check(isinstance(expert_ids, Tensor) and expert_ids.dim() == 2,
               "expert_ids must be a 2-D tensor [tokens, k].")
        ids = expert_ids.to(torch.int32)
        flat = ids.reshape(-1).long()
        # Empty slots sort after every expert (key num_experts) and are cut off the end.
        key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
        order = torch.sort(key, stable=True).indices
        # scatter_add, not bincount: bincount on CUDA reads the maximum back to the host.
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
        counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]
        live = flat.numel() if all_live else int(counts.sum())
        order = order[:live]
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
        offsets[1:] = counts.cumsum(0)
        return cls(ids, weights, num_experts, order, counts.to(torch.int32), offsets, capacity, validate=validate)

    # ----------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def k(self) -> int:
        """Slots per token."""
        return self.expert_ids.shape[1]

    @property
    def num_assignments(self) -> int:
        """Live (token, expert) pairs ``A``."""
        return self.order.numel()

    @property
    def device(self) -> torch.device:
        return self.expert_ids.device

    def sorted_token_ids(self) -> Tensor:
        """``[A]`` int64: the token of every live slot, in expert-sorted order."""
        return torch.div(self.order, self.k, rounding_mode="floor")

    def sorted_expert_ids(self) -> Tensor:
        """``[A]`` int64: the expert of every live slot, in sorted order (non-decreasing)."""
        return self.expert_ids.reshape(-1)[self.order].long()

    def dropped_fraction(self) -> float:
        """Fraction of the ``tokens * k`` slots left empty."""
        n = self.expert_ids.numel()
        return 1.0 - self.num_assignments / n if n else 0.0

    def with_weights(self, weights: Tensor) -> "ExpertRoute":
        """The same assignment with other combine weights (same shape)."""
        return ExpertRoute(self.expert_ids, weights, self.num_experts, self.order, self.counts, self.offsets,
                           self.capacity, validate=False, slot_rows=self.slot_rows)

    def to(self, device) -> "ExpertRoute":
        inv = None if self.slot_rows is None else self.slot_rows.to(device)
        return ExpertRoute(self.expert_ids.to(device), self.weights.to(device), self.num_experts,
                           self.order.to(device), self.counts.to(device), self.offsets.to(device), self.capacity,
                           validate=False, slot_rows=inv)

    def describe(self) -> str:
        c = self.counts.float()
        mean = float(c.mean()) if c.numel() else 0.0
        return (f"ExpertRoute(tokens={self.num_tokens}, k={self.k}, experts={self.num_experts}, "
                f"capacity={self.capacity}, tokens/expert: mean {mean:.1f} min {int(self.counts.min())} "
                f"max {int(self.counts.max())}, dropped {self.dropped_fraction():.3f})")

    __str__ = describe
