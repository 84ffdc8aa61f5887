"""Attention layers of the routed language model: dense, sliding window and MoBA.

Every layer here follows :mod:`routed.layers.registry` (``cls(config, layer_idx)``, then
``out, aux_loss = layer(hidden_states, position_embeddings, past_key_values=None,
cache_position=None)``) and shares :class:`LMAttention`'s parts: SDPA-like ``q/k/v/o``
projections, rotary position embeddings, grouped-query attention (``num_key_value_heads``
divides ``num_attention_heads``) and a transformers KV cache (``past_key_values.update``).

Config options read here (with defaults, so any config with the usual HF fields works):

* ``attention_block_size`` (64): key block of the routed layers (and their query block unless
  ``route_q_block_size`` is set).
* ``route_q_block_size`` (None): queries per routing decision; ``1`` routes each query on its own
  (exact under token-by-token decoding; the block-pooled default decides per query block, so a
  decode step, which is its own query block, may route differently than the prefill did).
* ``window_blocks`` (4): key blocks of the sliding window, the diagonal one included.
* ``moba_top_k`` (8), ``moba_sink_blocks`` (0), ``moba_local_blocks`` (1), ``moba_heads`` ("kv").
* ``attention_dense`` (False): dense mode, for ablations: every routed layer computes full causal
  attention with its own projections (no routing).
* ``attention_backend`` (None): the :func:`~routed.routed_attention` backend; ``router_backend``
  (None): the routers' scoring backend.
"""

from __future__ import annotations


from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import routed_attention
from ..constants import cached_constants
from ..ops.rotary import apply_rotary
from ..route import BlockRoute, RouteError
from ..routers.blocks import MoBARouter, check_block_options
from ..routers.static import sliding_window_route
from .registry import register_attention

__all__ = ["LMAttention", "DenseAttention", "SlidingWindowAttention", "MoBAAttention", "apply_rotary",
           "causal_sdpa", "block_window_route"]


def causal_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Dense causal SDPA, queries being the last ``q_len`` positions of the keys (bottom-right
    aligned, as after a KV cache); ``k, v`` may have fewer heads (GQA). ``[B, Hq, Nq, Dv]``."""
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if nq == 1:  # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    qpos = torch.arange(nq, device=q.device) + (nk - nq)
    mask = torch.arange(nk, device=q.device)[None, :] <= qpos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@cached_constants()
def block_window_route(q_len: int, kv_len: int, block_size: int, window_blocks: int, device=None) -> BlockRoute:
    """Causal sliding window of ``window_blocks`` key blocks ending at each query's own block.

    Cached per geometry: every window layer of a model, at every step, gets the same route object,
    so the kernels' derived data (transposed route, mask splits) is computed once, and building it
    (one host sync, in ``BlockRoute.from_block_mask``) happens once.

    When the queries start on a block boundary (a prefill, a block-aligned chunk) or there is one
    query (a decode step), this is :func:`~routed.routers.static.sliding_window_route`; otherwise
    (a chunk that starts mid-block) every query is its own query block, so each sees exactly the
    window it saw in the full pass. Both are built by arithmetic, with no data-dependent shape, so
    ``torch.compile`` traces them (they then run inside the graph instead of being cached).
    """
    off = kv_len - q_len
    if off % block_size == 0 or q_len == 1:
        return sliding_window_route(q_len, kv_len, block_size=block_size, window_blocks=window_blocks, device=device)
    diag = (torch.arange(q_len, device=device) + off) // block_size
    count = torch.clamp(diag + 1, max=window_blocks)
    j = torch.arange(window_blocks, device=device)
    ids = torch.where(j[None, :] < count[:, None], diag[:, None] - count[:, None] + 1 + j[None, :], -1)
    return BlockRoute(ids.to(torch.int32)[None, None].contiguous(), count.to(torch.int32)[None, None].contiguous(),
                      q_len, kv_len, 1, block_size, causal=True, validate=False)


def _opt(config, name: str, default):
    v = getattr(config, name, None)
    return default if v is None else v


class LMAttention(nn.Module):
    """Shared parts: projections, rotary, GQA, KV cache, dense mode. Subclasses implement
    :meth:`attend` (``q [B, Hq, Nq, D]`` with rotary applied, ``k, v [B, Hkv, Nk, D]`` holding the
    cache and the new tokens, ``hidden [B, Nq, hidden]``) -> ``[B, Hq, Nq, D]``."""

    routed = True  # False for layers that are dense by definition
    # Set by a following attention-aware expert router: forward then leaves its ``(q, k)`` in
    # ``last_qk`` for the router to read (and clear), so the router needs no attention matrix.
    keep_qk = False

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = _opt(config, "num_key_value_heads", self.num_heads)
        self.head_dim = _opt(config, "head_dim", self.hidden_size // self.num_heads)
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise RouteError(f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads="
                             f"{self.num_kv_heads} (grouped-query attention).")
        if self.head_dim % 2:
            raise RouteError(f"head_dim={self.head_dim} must be even (rotary embeddings rotate pairs).")
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=bias)
        self.scale = self.head_dim ** -0.5
        self.dense_mode = bool(getattr(config, "attention_dense", False))
        self.backend = getattr(config, "attention_backend", None)
        self.router_backend = getattr(config, "router_backend", None)
        self.max_len = getattr(config, "max_position_embeddings", None)
        self.last_qk: Optional[tuple[Tensor, Tensor]] = None

    def project(self, hidden_states: Tensor, position_embeddings, past_key_values=None,
                cache_position: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B, Hq, N, D]`` and the full ``k, v [B, Hkv, cached + N, D]`` (rotary applied; the new
        keys and values appended to ``past_key_values`` when given)."""
        B, N, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            cached = past_key_values.get_seq_length(self.layer_idx)
            k, v = past_key_values.update(k, v, self.layer_idx)
            if k.shape[2] != cached + N:  # the layers attend causally over the whole returned prefix
                raise RouteError(
                    f"{type(self).__name__} (layer {self.layer_idx}) needs a KV cache that returns its {cached} "
                    f"cached keys followed by the {N} new ones, but {type(past_key_values).__name__} returned "
                    f"{k.shape[2]} keys (a static cache's fixed-length buffer, or a sliding-window cache that drops "
                    "old keys). Use transformers' DynamicCache (generate()'s default).")
        return q, k, v

    def forward(self, hidden_states: Tensor, position_embeddings, past_key_values=None,
                cache_position: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """``hidden_states [B, N, hidden]`` -> ``(out [B, N, hidden], aux_loss or None)``."""
        q, k, v = self.project(hidden_states, position_embeddings, past_key_values, cache_position)
        if self.keep_qk:
            self.last_qk = (q, k)
        if self.dense_mode or not self.routed:
            o = causal_sdpa(q, k, v, self.scale)
        else:
            o = self.attend(q, k, v, hidden_states)
        B, N = hidden_states.shape[:2]
        return self.o_proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hidden: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dense_mode={self.dense_mode}")


@register_attention("dense")
class DenseAttention(LMAttention):
    """Full causal attention (SDPA): the baseline every routed layer is compared with."""

    routed = False


@register_attention("sliding_window")
class SlidingWindowAttention(LMAttention):
    """Causal sliding window of ``window_blocks`` key blocks of ``attention_block_size`` tokens
    ending at the query's own block, on the block-sparse kernel (static: no router; see
    :func:`block_window_route`)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.block_size = _opt(config, "attention_block_size", 64)
        self.window_blocks = _opt(config, "window_blocks", 4)
        check_block_options(block_size=self.block_size, top_k=self.window_blocks, sink_blocks=0, local_blocks=1,
                            max_len=self.max_len, what="window_blocks")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hidden: Tensor) -> Tensor:
        route = block_window_route(q.shape[2], k.shape[2], self.block_size, self.window_blocks, q.device)
        return routed_attention(q, k, v, route, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, window_blocks={self.window_blocks}"


@register_attention("moba")
class MoBAAttention(LMAttention):
    """Mixture of Block Attention: each query block attends to its ``moba_top_k`` key blocks
    chosen by :class:`~routed.routers.blocks.MoBARouter` (its own block always among them),
    computed exactly on the block-sparse kernel."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        block = _opt(config, "attention_block_size", 64)
        top_k = _opt(config, "moba_top_k", 8)
        sink, local = _opt(config, "moba_sink_blocks", 0), _opt(config, "moba_local_blocks", 1)
        check_block_options(block_size=block, top_k=top_k, sink_blocks=sink, local_blocks=local,
                            max_len=self.max_len, what="moba_top_k")
        self.router = MoBARouter(block, top_k, q_block_size=getattr(config, "route_q_block_size", None),
                                 sink_blocks=sink, local_blocks=local, heads=_opt(config, "moba_heads", "kv"),
                                 backend=self.router_backend)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hidden: Tensor) -> Tensor:
        route = self.router(q, k, scale=self.scale)
        return routed_attention(q, k, v, route, scale=self.scale, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", router={self.router!r}"
