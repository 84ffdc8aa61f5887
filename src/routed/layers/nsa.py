"""Native Sparse Attention (Yuan et al., 2025) as a registered LM attention layer (``"nsa"``).

Three branches over the same queries, keys and values, mixed by learned gates:

1. **compressed**: keys and values of overlapping blocks (``nsa_compress_block`` tokens every
   ``nsa_compress_stride``) are compressed to one key and one value each by a learned linear map
   of the whole block (initialised to mean pooling; it sees the order of the tokens inside the
   block). Every query attends to the compressed blocks that end at or before it.
2. **selected**: :class:`~routed.routers.blocks.NSASelectionRouter` turns the compressed branch's
   attention probabilities into the ``nsa_top_n`` key blocks of ``attention_block_size`` tokens each
   query block keeps (shared by the query heads of a KV group; first ``nsa_sink_blocks`` blocks and
   ``nsa_local_blocks`` blocks ending at the diagonal always kept); exact attention runs over them
   on the block-sparse kernel.
3. **sliding window**: the last ``nsa_window_blocks`` key blocks (block granular).

``out = sigmoid(g_cmp) * o_cmp + sigmoid(g_slc) * o_slc + sigmoid(g_win) * o_win`` with the gates
a linear map of the layer's input, per query head (the paper's gated sum of branch outputs; one
fused launch each way, :mod:`routed.ops.gated_sum`).
With ``attention_dense=True`` the module computes full causal attention with its q/k/v/o
projections (the compression, router and gates are unused): the same module, dense, for ablations.

Under a KV cache the layer keeps the compressed keys and values beside the cache (weakly keyed on
the cache object, as :mod:`routed.layers.routing_attention` keeps its clusters), so a decode step or
a prefill chunk compresses only the blocks that became complete in it (a block started before the
call reads its cached tokens; with ``stride < compress_block`` consecutive blocks overlap exactly as
in the full pass): ``O(compress_block + new tokens)`` compression work per call, not ``O(kv_len)``.
What the selection router reads from the compressed branch (the compressed keys and the branch's
log-sum-exp) follows from the cached compressed keys, so nothing else is kept.

The record is checked against the cache layer's key tensor (sync-free identity tests):

* a cache this layer never saw (a dense prefill, another copy of the model) is compressed once
  from its keys, then extended (a cache whose key tensor this module cannot find, neither
  ``cache.layers[i].keys`` nor ``cache.key_cache[i]``, is compressed from its keys every call:
  exact, not incremental);
* cropping (``cache.crop``, assisted decoding) leaves a prefix view of the keys: the record keeps
  the compressed blocks that end inside the kept prefix;
* an operation that replaces the keys otherwise (beam search's ``reorder_cache``,
  ``batch_select_indices``, ``batch_repeat_interleave``, offloading) invalidates the record: the
  next call recompresses the whole cache once (exact, ``O(kv_len)`` that call);
* a cache that does not return its cached keys followed by the new ones (``StaticCache`` writes in
  place into a fixed-length buffer, sliding-window caches drop old keys) raises: this layer, like
  every :class:`~routed.layers.lm_attention.LMAttention`, needs the whole causal prefix.

Writing into the cached key tensor in place (no transformers cache operation does) is not seen.

Like the KV cache itself, the record holds what the weights computed when each block was compressed.
"""

from __future__ import annotations


import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..attention import routed_attention
from ..constants import cached_constants
from ..ops.gated_sum import gated_sum
from ..route import BlockRoute
from ..routers.blocks import NSASelectionRouter, check_block_options, compressed_positions, num_compressed_blocks
from .kv_cache import cache_keys, key_change
from .lm_attention import LMAttention, _opt, block_window_route
from .registry import register_attention

__all__ = ["NSAAttention"]


@torch.no_grad()
def _mean_pool_init(lin: nn.Linear) -> None:
    """``[D, block * D]`` weight that averages the block's tokens: compression starts as mean pooling."""
    d = lin.out_features
    eye = torch.eye(d, dtype=lin.weight.dtype, device=lin.weight.device)
    lin.weight.copy_(eye.repeat(1, lin.in_features // d) * (d / lin.in_features))


@torch.no_grad()
def _zero_bias_init(lin: nn.Linear) -> None:
    """Small weights, zero bias: every gate starts near sigmoid(0) = 1/2."""
    lin.weight.normal_(0.0, 0.02)
    lin.bias.zero_()


class _CompressedKV(NamedTuple):
    """The compressed record one layer keeps beside one KV cache."""

    k_cmp: Tensor  # [B, Hkv, Nc, D]: compress_k of every compressed block that ended in the cache
    v_cmp: Tensor  # [B, Hkv, Nc, D]
    kv_len: int  # cached tokens the record covers (Nc = compressed_positions(kv_len, ...).numel())
    keys: Optional[weakref.ref]  # the cache layer's key tensor then (None: the layout is unknown)


@cached_constants()
def _compressed_route(nq: int, nc: int, kv_len: int, block_size: int, compress_block: int, compress_stride: int,
                      device) -> BlockRoute:
    """The compressed branch's route: each query block of ``block_size`` queries (the last ``nq`` of
    ``kv_len`` positions) sees the blocks of ``block_size`` compressed keys whose first key has ended
    by its last query; the causal test is on the compressed keys' end positions. Leaving out the
    blocks wholly in the future halves the branch's work in a prefill. Cached per geometry (no
    content in it), so its derived data is computed once for every layer and step."""
    qpos = torch.arange(nq, device=device) + (kv_len - nq)
    kpos = compressed_positions(kv_len, compress_block, compress_stride, device)
    nqb, nkb = -(-nq // block_size), -(-nc // block_size)
    q_last = torch.clamp((torch.arange(nqb, device=device) + 1) * block_size, max=nq) - 1 + (kv_len - nq)
    seen = torch.clamp((q_last - (compress_block - 1)).div(compress_stride, rounding_mode="floor") + 1, 0, nc)
    counts = (seen + block_size - 1).div(block_size, rounding_mode="floor").to(torch.int32)  # blocks with a key seen
    j = torch.arange(nkb, device=device, dtype=torch.int32)
    ids = torch.where(j[None, :] < counts[:, None], j[None, :], -1)
    return BlockRoute(ids[None, None].contiguous(), counts[None, None].contiguous(), nq, nc, block_size, block_size,
                      causal=True, q_positions=qpos, kv_positions=kpos, validate=False)


@register_attention("nsa")
class NSAAttention(LMAttention):
    """NSA layer (see the module docstring). ``forward`` follows :mod:`routed.layers.registry`; under a KV
    cache the compressed blocks are cached too (:meth:`project`)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.block_size = _opt(config, "attention_block_size", 64)
        self.compress_block = _opt(config, "nsa_compress_block", 32)
        self.compress_stride = _opt(config, "nsa_compress_stride", 16)
        self.top_n = _opt(config, "nsa_top_n", 8)
        self.window_blocks = _opt(config, "nsa_window_blocks", _opt(config, "window_blocks", 4))
        sink, local = _opt(config, "nsa_sink_blocks", 1), _opt(config, "nsa_local_blocks", 2)
        check_block_options(block_size=self.block_size, top_k=self.top_n, sink_blocks=sink, local_blocks=local,
                            max_len=self.max_len, what="nsa_top_n")
        check_block_options(block_size=self.block_size, top_k=self.window_blocks, sink_blocks=0, local_blocks=1,
                            max_len=self.max_len, what="nsa_window_blocks")
        # The router checks that the stride divides the compressed and the selection blocks.
        self.router = NSASelectionRouter(self.block_size, self.top_n, compress_block=self.compress_block,
                                         compress_stride=self.compress_stride,
                                         q_block_size=getattr(config, "route_q_block_size", None),
                                         sink_blocks=sink, local_blocks=local, backend=self.router_backend)
        d, lb = self.head_dim, self.compress_block
        self.compress_k = nn.Linear(lb * d, d, bias=False)
        self.compress_v = nn.Linear(lb * d, d, bias=False)
        self.gate = nn.Linear(self.hidden_size, 3 * self.num_heads, bias=True)
        # A model's weight initialisation calls a module's ``routed_init`` instead of its default.
        self.compress_k.routed_init = self.compress_v.routed_init = _mean_pool_init
        self.gate.routed_init = _zero_bias_init
        for m in (self.compress_k, self.compress_v, self.gate):
            m.routed_init(m)
        # The compressed record of every live KV cache this layer decodes with (see the module docstring).
        self._compressed_caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        # This call's (k_cmp, v_cmp) from the record, handed from ``project`` to ``attend``.
        self._call_compressed: Optional[tuple[Tensor, Tensor]] = None

    def compress(self, x: Tensor) -> Tensor:
        """``[B, Hkv, N, D]`` keys or values -> ``[B, Hkv, Nc, D]`` compressed blocks (Nc may be 0)."""
        B, h, n, d = x.shape
        nc = self.num_compressed(n)
        if nc == 0:
            return x.new_zeros(B, h, 0, self.compress_block * d)
        # unfold: [B, h, Nc, D, lb] (a view) -> token-major blocks [B, h, Nc, lb * D]
        blocks = x.unfold(2, self.compress_block, self.compress_stride).transpose(-1, -2)
        return blocks.reshape(B, h, nc, self.compress_block * d)

    def num_compressed(self, kv_len: int) -> int:
        """Compressed blocks that have ended among ``kv_len`` tokens."""
        return num_compressed_blocks(kv_len, self.compress_block, self.compress_stride)

    def project(self, hidden_states: Tensor, position_embeddings, past_key_values=None,
                cache_position: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`LMAttention.project`, and under a KV cache the compressed keys and values of the whole
        cache from the layer's record, extended by the blocks that became complete in this call."""
        self._call_compressed = None
        if past_key_values is None or self.dense_mode:
            return super().project(hidden_states, position_embeddings, past_key_values, cache_position)
        before = past_key_values.get_seq_length(self.layer_idx)
        # Check the record against the cache before the update replaces its key tensor (and hold no
        # reference to the old one past this point, so the cache's concatenation can free it).
        record = self._followable_record(past_key_values, before)
        q, k, v = super().project(hidden_states, position_embeddings, past_key_values, cache_position)  # checks it
        self._call_compressed = self._extend_record(past_key_values, record, k, v)
        return q, k, v

    def _followable_record(self, cache, cached_len: int) -> Optional[_CompressedKV]:
        """The layer's record for ``cache`` if it still describes the ``cached_len`` cached keys (cut back
        to the kept prefix after a crop), else None: the cache gets compressed from its keys."""
        record = self._compressed_caches.get(cache)
        keys = cache_keys(cache, self.layer_idx)
        if record is None or keys is None:
            return None
        change = key_change(keys, record.keys)
        if change == "replaced":
            return None
        if change == "cropped":  # blocks ending in the kept prefix are unchanged
            nc = self.num_compressed(keys.shape[2])
            record = _CompressedKV(record.k_cmp[:, :, :nc], record.v_cmp[:, :, :nc], keys.shape[2], weakref.ref(keys))
        if record.kv_len != cached_len or keys.shape[2] != cached_len:
            return None
        return record

    def _extend_record(self, cache, record: Optional[_CompressedKV], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Compressed ``(k_cmp, v_cmp) [B, Hkv, Nc, D]`` of all of ``k, v [B, Hkv, T, D]`` (the updated cache):
        the record's blocks plus the new ones (all of them when ``record`` is None); stores the new record."""
        total = self.num_compressed(k.shape[2])
        if record is None:
            k_cmp, v_cmp = self.compress_k(self.compress(k)), self.compress_v(self.compress(v))
        elif total > record.k_cmp.shape[2]:
            # The first new block starts at done * stride, possibly before this call's tokens (overlap).
            start = record.k_cmp.shape[2] * self.compress_stride
            k_cmp = torch.cat([record.k_cmp, self.compress_k(self.compress(k[:, :, start:]))], 2)
            v_cmp = torch.cat([record.v_cmp, self.compress_v(self.compress(v[:, :, start:]))], 2)
        else:  # no block completed in this call
            k_cmp, v_cmp = record.k_cmp, record.v_cmp
        keys = cache_keys(cache, self.layer_idx)
        self._compressed_caches[cache] = _CompressedKV(k_cmp, v_cmp, k.shape[2],
                                                       None if keys is None else weakref.ref(keys))
        return k_cmp, v_cmp

    def compressed_attention(self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Every query against the compressed blocks that end at or before it: ``(out [B, Hq, Nq, D],
        lse [B, Hq, Nq])`` (zeros and ``-inf`` where none has ended yet)."""
        nq, nc = q.shape[2], k_cmp.shape[2]
        if nc == 0:
            return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        route = _compressed_route(nq, nc, kv_len, self.block_size, self.compress_block, self.compress_stride,
                                  q.device)
        return routed_attention(q, k_cmp, v_cmp, route, scale=self.scale, backend=self.backend, return_lse=True)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hidden: Tensor) -> Tensor:
        B, hq, nq, d = q.shape
        nk = k.shape[2]
        cached, self._call_compressed = self._call_compressed, None
        if cached is None:  # no KV cache: compress the whole sequence
            k_cmp, v_cmp = self.compress_k(self.compress(k)), self.compress_v(self.compress(v))
        else:
            k_cmp, v_cmp = cached
        o_cmp, lse_cmp = self.compressed_attention(q, k_cmp, v_cmp, nk)
        route = self.router(q, k_cmp, lse_cmp, nk, scale=self.scale)
        o_slc = routed_attention(q, k, v, route, scale=self.scale, backend=self.backend)
        window = block_window_route(nq, nk, self.block_size, self.window_blocks, q.device)
        o_win = routed_attention(q, k, v, window, scale=self.scale, backend=self.backend)
        # One fused launch each way (the autograd ops of the gated sum were ~25 launches per step).
        gate_backend = self.backend if self.backend in ("triton", "reference") else None
        return gated_sum(self.gate(hidden).view(B, nq, 3, hq), [o_cmp, o_slc, o_win], backend=gate_backend)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", compress={self.compress_block}/{self.compress_stride}, "
                f"window_blocks={self.window_blocks}, router={self.router!r}")
