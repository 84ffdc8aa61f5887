"""Routing Transformer attention (Roy et al., TACL 2021): clustered heads mixed with local heads.

Routed heads attend inside content clusters learned by online spherical k-means
(:class:`~routed.routers.kmeans.KMeansRouter`); local heads attend within a sliding window, as
in the paper's mix. Causal language modelling needs more care than the paper's top-``w``
balanced clusters give: a token's membership there depends on later tokens, which leaks the
future into earlier outputs and makes KV-cache decoding differ from the full forward. Here a
token joins the cluster of its key's nearest centroid and, inside its cluster and in position
order, attends to its own chunk of ``w`` tokens and the chunk before (at most ``2w`` keys; see
:func:`~routed.routers.kmeans.cluster_window_route`). The cost stays balanced (``O(N w)``),
nothing depends on later tokens, and decoding reproduces the full forward exactly.

The clusters run on the block-sparse kernels as a causal block route over the cluster-sorted order
(each cluster padded to whole blocks of ``b <= 64`` slots). The sort materialises permuted copies of
the routed heads' q, k and v (``(G + 2) * L * head_dim`` per row, ``L <= N + C (b - 1)``, G query
heads per key/value head): ``O(N)`` memory, never ``N^2``.

Decoding keeps every cached token's cluster and in-cluster rank beside the cache (weakly keyed on
the cache object), so a step assigns only its new keys. A cache reordered in place (beam search's
``reorder_cache``) would leave that record in the old order: greedy decoding and sampling are
supported, beam search is not.

Routed heads carry no rotary embedding: their keys are pure content, so the k-means sees content
and cached keys can be re-assigned to clusters at decode time (order comes from the causal test
and from the local heads, which do use rotary).

Config fields (defaults in brackets), beside ``hidden_size``, ``num_attention_heads``,
``num_key_value_heads`` and ``head_dim``:

* ``routing_heads`` [half the query heads]: query heads that attend inside clusters (a multiple
  of the GQA group size); the others are local.
* ``kmeans_clusters`` [16]: centroids per routed key/value head.
* ``routing_window`` [64]: ``w``, the chunk of a cluster a query attends to (and the one before).
* ``routing_local_window`` [``routing_window``]: block of the local heads, which see their own
  block and the one before.
* ``routing_shared_qk`` [False]: the paper's shared query/key space for the routed heads: each
  routed head's key is its own query, normalised to unit length (no key projection for those
  heads), so a token clusters where it queries and attention follows the same similarity the
  k-means sees; a token then does not attend to itself (its own key would always score highest):
  it sees the earlier tokens of its cluster only, and the first token of a cluster gets zeros from
  the routed heads. Needs ``num_key_value_heads == num_attention_heads`` (one key per query head).
* ``kmeans_decay`` [0.999], ``kmeans_commitment`` [1e-4]: EMA decay and commitment-loss weight.
* ``attention_bias`` [False]; ``attention_backend`` [None: automatic] for ``routed_attention``;
  ``router_backend`` [None: automatic] for the k-means router's per-token work
  (:class:`~routed.routers.kmeans.KMeansRouter`'s ``backend``).
* ``attention_dense`` [False]: the ablation of the routed LM: full causal attention over every
  head (rotary on all), the same parameters, no k-means.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import routed_attention
from ..constants import cached_constants
from ..ops.permute_rows import permute_rows
from ..route import BlockRoute
from ..routers.kmeans import KMeansRouter, cluster_ranks, cluster_window_mask, cluster_window_route
from ..routers.static import sliding_window_route
from .lm_attention import apply_rotary, causal_sdpa
from .registry import register_attention

__all__ = ["RoutingAttention", "lm_head_dims", "local_window_route"]


def lm_head_dims(config) -> tuple[int, int, int, int]:
    """``(hidden, query heads, key/value heads, head_dim)`` of a model config, with a clear error."""
    hidden = config.hidden_size
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(config, "head_dim", None) or hidden // hq
    if hq % hkv:
        raise ValueError(f"num_attention_heads={hq} must be a multiple of num_key_value_heads={hkv}.")
    return hidden, hq, hkv, d


@cached_constants(32)
def local_window_route(n: int, block: int, device: torch.device) -> BlockRoute:
    """The local heads' route for ``n`` tokens: each query block sees its own key block and the one
    before, causal. Built once per (length, block, device): a route caches the kernels' derived data,
    so reusing it saves that work (and a host sync) on every call."""
    return sliding_window_route(n, block_size=block, window_blocks=2, causal=True, device=device)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA of ``q [B, Hq, Nq, D]`` over ``k, v [B, Hkv, Nk, D]`` with a bool ``mask`` broadcast to
    ``[B, Hq, Nq, Nk]`` (the decode path: ``Nq`` is small, so the mask is ``O(Nk)`` per query)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _plain_linear(m: nn.Module) -> bool:
    """Whether ``m`` is an ``nn.Linear`` that its weight may stand for (no subclass, adapter or hook that
    calling the module would run), so the layer may compute it in parts from its weight."""
    return type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)


@register_attention("routing")
class RoutingAttention(nn.Module):
    """Routing Transformer attention layer (the registry interface; see :mod:`routed.layers.registry`).

    ``forward(hidden_states [B, N, hidden], position_embeddings (cos, sin) [B, N, head_dim],
    past_key_values=None, cache_position=None) -> (out [B, N, hidden], aux_loss)``; ``aux_loss`` is
    the k-means commitment loss in training, None in evaluation. In training every call also moves
    the centroids (EMA). Any sequence length.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden, hq, hkv, d = lm_head_dims(config)
        self.layer_idx, self.hq, self.hkv, self.head_dim = layer_idx, hq, hkv, d
        self.group = hq // hkv
        routed = getattr(config, "routing_heads", None)
        routed = hq // 2 if routed is None else routed
        if not 0 <= routed <= hq or routed % self.group:
            raise ValueError(f"routing_heads={routed} must lie in [0, {hq}] and be a multiple of the GQA group size "
                             f"{self.group} (num_attention_heads / num_key_value_heads), so routed heads own whole "
                             "key/value heads.")
        self.kv_routed = routed // self.group
        self.kv_local = hkv - self.kv_routed
        self.clusters = int(getattr(config, "kmeans_clusters", 16))
        self.window = int(getattr(config, "routing_window", 64))
        self.local_window = int(getattr(config, "routing_local_window", None) or self.window)
        if self.window < 1 or self.local_window < 1 or self.clusters < 1:
            raise ValueError(f"routing_window ({self.window}), routing_local_window ({self.local_window}) and "
                             f"kmeans_clusters ({self.clusters}) must be >= 1.")
        self.shared_qk = bool(getattr(config, "routing_shared_qk", False))
        if self.shared_qk and self.group != 1:
            raise ValueError(f"routing_shared_qk=True makes each routed head's key its own query, so it needs one "
                             f"key/value head per query head: num_key_value_heads={hkv} must equal "
                             f"num_attention_heads={hq}.")
        self.backend = getattr(config, "attention_backend", None)
        self.dense_mode = bool(getattr(config, "attention_dense", False))
        self._cluster_state: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(hidden, hq * d, bias=bias)
        # shared query/key: the routed heads' keys come from their queries, only the local heads project keys
        self.k_proj = nn.Linear(hidden, (self.kv_local if self.shared_qk else hkv) * d, bias=bias)
        self.v_proj = nn.Linear(hidden, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, hidden, bias=bias)
        decay, commitment = getattr(config, "kmeans_decay", 0.999), getattr(config, "kmeans_commitment", 1e-4)
        self.kmeans = (KMeansRouter(self.kv_routed, d, self.clusters, decay=float(decay), commitment=float(commitment),
                                    backend=getattr(config, "router_backend", None)) if self.kv_routed else None)

    def extra_repr(self) -> str:
        return (f"routed_kv_heads={self.kv_routed}, local_kv_heads={self.kv_local}, clusters={self.clusters}, "
                f"window={self.window}, local_window={self.local_window}, shared_qk={self.shared_qk}")

    # --------------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], past_key_values=None,
                cache_position: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        B, N, _ = hidden_states.shape
        d, G, kl = self.head_dim, self.group, self.kv_local
        q = self.q_proj(hidden_states).view(B, N, self.hq, d)
        k = self.k_proj(hidden_states).view(B, N, -1, d)
        if self.shared_qk:  # the routed heads' keys: their queries, unit length (G == 1)
            k = torch.cat([k, F.normalize(q[:, :, kl:], dim=-1)], 2)
        cos, sin = position_embeddings
        scale = d ** -0.5
        if self.dense_mode:  # ablation: full causal attention, rotary on every head, no k-means
            v = self.v_proj(hidden_states).view(B, N, self.hkv, d)
            q, k, v = (apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin),
                       v.transpose(1, 2))
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            o = causal_sdpa(q, k, v, scale)
            return self.o_proj(o.transpose(1, 2).reshape(B, N, self.hq * d)), None
        # The local and routed heads stay apart from here to the output projection: one split of each
        # projection (its backward is one cat), none of the cats and slices whose backward zero-fills
        # and adds full-size gradients. Views [B, heads, N, d] of the projections' [B, N, heads, d].
        # Nothing saves q or k themselves (rotary makes new local heads, the routed heads are saved in
        # slot order), so they are freed after the forward. V's local heads are saved as they are: a
        # GEMM per head group, so that this view does not keep the routed heads' values alive too
        # (on the H200 at 64k: 5% less peak memory for 1.2% more time, routing_layer_variants.json).
        q_l, q_r = (t.transpose(1, 2) for t in q.split([kl * G, self.hq - kl * G], 2))
        k_l, k_r = (t.transpose(1, 2) for t in k.split([kl, self.kv_routed], 2))
        v_l, v_r = (t.view(B, N, h, d).transpose(1, 2)
                    for t, h in zip(self._per_head_group(self.v_proj, hidden_states), (kl, self.kv_routed)))
        # Rotary on the local heads only (routed keys stay pure content, see the module docstring).
        if kl:
            q_l, k_l = apply_rotary(q_l, cos, sin), apply_rotary(k_l, cos, sin)

        aux = cl = trained = None
        if self.kmeans is not None:
            if self.training:  # assignment and EMA step in one pass over the keys; the loss follows
                trained = self.kmeans.train_assign(k_r)
                cl = trained.assignment
            else:
                with torch.no_grad():
                    cl = self.kmeans.assign(k_r)  # [B, routed kv heads, N]; initialises on first use

        if past_key_values is not None:
            if trained is not None:  # the commitment loss in token order (no slots on this path)
                aux = self.kmeans.commitment_after(trained, k_r, self._committed_queries(q_r))
            k_all, v_all = past_key_values.update(torch.cat([k_l, k_r], 1), torch.cat([v_l, v_r], 1), self.layer_idx)
            clusters = None
            if cl is not None:
                with torch.no_grad():
                    clusters = self._remember_clusters(past_key_values, cl, k_all[:, kl:])
            if k_all.shape[2] != N:  # decoding (or a chunk) after cached tokens: masks over the cache
                o = torch.cat(self._after_cache(torch.cat([q_l, q_r], 1), k_all, v_all, clusters, scale), 1)
                return self.o_proj(o.transpose(1, 2).reshape(B, N, self.hq * d)), aux
            k_l, k_r, v_l, v_r = k_all[:, :kl], k_all[:, kl:], v_all[:, :kl], v_all[:, kl:]
            trained = None  # its loss was taken above, in token order
        # No earlier tokens: the kernels over the whole sequence. Outputs as [B, N, heads, d] views.
        outs = []
        if kl:
            route = local_window_route(N, self.local_window, q_l.device)
            outs.append(routed_attention(q_l, k_l, v_l, route, scale=scale, backend=self.backend).transpose(1, 2))
        if self.kv_routed:
            o_r, commitment = self._routed_full(q_r, k_r, v_r, cl, scale, trained)
            outs.append(o_r.transpose(1, 2))
            if commitment is not None:  # training without a cache (with one, the loss was taken above)
                aux = commitment
        return self._project_out([o.flatten(2) for o in outs]), aux

    def _project_out(self, outs: list[Tensor]) -> Tensor:
        """``o_proj`` of the heads' outputs ``[B, N, heads * d]`` (local heads first) without their cat:
        one GEMM per head group, the second accumulating into the first's output. The cat would copy
        every output once more and o_proj would save that copy (the attention saves its own outputs).
        An ``o_proj`` that is not a plain ``nn.Linear`` (an adapter, a hook) is called on the cat."""
        if len(outs) == 1 or not _plain_linear(self.o_proj):
            return self.o_proj(torch.cat(outs, -1) if len(outs) > 1 else outs[0])
        o_l, o_r = outs
        w_l, w_r = self.o_proj.weight.split([o_l.shape[-1], o_r.shape[-1]], 1)
        y = F.linear(o_l, w_l, self.o_proj.bias)
        return torch.addmm(y.flatten(0, 1), o_r.flatten(0, 1), w_r.t()).view_as(y)

    def _per_head_group(self, proj: nn.Linear, x: Tensor) -> list[Tensor]:
        """``proj(x)`` as the local heads' and the routed heads' ``[B, N, heads * d]``, one GEMM each
        (one when a group is empty, or ``proj`` is not a plain ``nn.Linear``): separate tensors, so
        saving one keeps only its own memory."""
        sizes = [self.kv_local * self.head_dim, self.kv_routed * self.head_dim]
        if not self.kv_local or not self.kv_routed or not _plain_linear(proj):
            return list(proj(x).split(sizes, -1))
        bias = proj.bias.split(sizes) if proj.bias is not None else (None, None)
        return [F.linear(x, w, b) for w, b in zip(proj.weight.split(sizes), bias)]

    def _committed_queries(self, q_r: Tensor) -> Optional[Tensor]:
        """The queries the commitment loss pulls to their keys' centroids: ``[B, Hk, G, N, d]`` (None
        with shared query/key, where the keys are the queries)."""
        return None if self.shared_qk else q_r.unflatten(1, (self.kv_routed, self.group))

    def _routed_full(self, q_r: Tensor, k_r: Tensor, v_r: Tensor, cl: Tensor, scale: float,
                     trained=None) -> tuple[Tensor, Optional[Tensor]]:
        """Clustered attention of the routed heads over a whole sequence (the kernel path): ``q_r
        [B, Hk * G, N, d]``, ``k_r, v_r [B, Hk, N, d]`` (any strides), ``cl [B, Hk, N]`` the keys'
        clusters; returns ``([B, Hk * G, N, d], commitment loss)``. The loss (None without
        ``trained``, :meth:`KMeansRouter.train_assign`'s state) is computed on the slot-order copies
        the attention saves anyway, so its backward keeps no projection alive."""
        B, Hk, N, d = k_r.shape
        G = self.group
        with torch.no_grad():
            route, slot_tokens, token_slots = cluster_window_route(cl.reshape(B * Hk, N), self.clusters, self.window,
                                                                   strict=self.shared_qk)
            L = slot_tokens.shape[1]
            to_slot, to_token = slot_tokens.view(B, Hk, 1, L), token_slots.view(B, Hk, 1, N)

        # Pad slots hold a copy of token 0, not zeros (one pass less over each tensor): they follow
        # their cluster's tokens, so no real query attends to a pad key; a pad query does see real
        # keys, so the way back gives pad slots a zero gradient (zero_padding) and reads token slots.
        def to_slots(t: Tensor) -> Tensor:  # [B, Hk, h, N, d] (any strides) -> [B * Hk, h, L, d]
            return permute_rows(t, to_slot, to_token, zero_padding=False).flatten(0, 1)

        q_s, k_s = to_slots(q_r.unflatten(1, (Hk, G))), to_slots(k_r.unsqueeze(2))
        o = routed_attention(q_s, k_s, to_slots(v_r.unsqueeze(2)), route, scale=scale,
                             backend=self.backend)  # [B * Hk, G, L, d]
        commitment = None
        if trained is not None:
            # with shared query/key the routed keys are the unit queries: the keys' loss is all of it
            q_c = None if self.shared_qk else q_s.unflatten(0, (B, Hk))
            commitment = self.kmeans.commitment_after(trained, k_s.unflatten(0, (B, Hk)).squeeze(2), q_c,
                                                      slot_tokens.view(B, Hk, L))
        # token-major rows back: o_proj's GEMM reads whole token rows, not strided ones (and
        # the way back to the slots gives q, k, v's gradients their projections' layout, as permute_rows does)
        o = permute_rows(o.view(B, Hk, G, L, d), to_token, to_slot, token_major_out=True)
        return o.view(B, Hk * G, N, d), commitment

    def _remember_clusters(self, cache, cl: Tensor, k_r: Tensor) -> tuple[Tensor, Tensor]:
        """Clusters and in-cluster ranks ``[B * routed kv heads, T]`` of every cached token.

        The layer keeps them beside ``cache`` (weakly keyed on it) and appends the new keys' ``cl``,
        so decoding never re-assigns cached keys; a cache holding tokens this layer never saw
        (another copy of the model filled it) is re-assigned once from its keys ``k_r [B, Hk, T, d]``.
        """
        R, T, N = k_r.shape[0] * k_r.shape[1], k_r.shape[2], cl.shape[-1]
        state = self._cluster_state.get(cache)
        if T > N and (state is None or state[0].shape[1] != T - N):
            old = self.kmeans.assign(k_r[:, :, : T - N]).reshape(R, T - N)
            state = (old, *cluster_ranks(old, self.clusters))
        cl = cl.reshape(R, N)
        rank, counts = cluster_ranks(cl, self.clusters)
        if state is not None and T > N:
            rank = rank + state[2].gather(1, cl)  # earlier members of the same cluster come first
            cl, rank, counts = torch.cat([state[0], cl], 1), torch.cat([state[1], rank], 1), state[2] + counts
        self._cluster_state[cache] = (cl, rank, counts)
        return cl, rank

    def _after_cache(self, q: Tensor, k: Tensor, v: Tensor, clusters: Optional[tuple[Tensor, Tensor]],
                     scale: float) -> list[Tensor]:
        """Attention of ``N`` new queries (the last ``N`` cached positions) over the whole cache;
        ``clusters``: every cached token's cluster and rank (:meth:`_remember_clusters`)."""
        B, _, N, d = q.shape
        T = k.shape[2]
        G, kl = self.group, self.kv_local
        pos_k = torch.arange(T, device=q.device)
        pos_q = pos_k[T - N:]
        outs = []
        if kl:
            b = self.local_window
            mask = (torch.div(pos_k, b, rounding_mode="floor")[None, :] >=
                    torch.div(pos_q, b, rounding_mode="floor")[:, None] - 1) & (pos_k[None, :] <= pos_q[:, None])
            outs.append(_masked_attention(q[:, : kl * G], k[:, :kl], v[:, :kl], mask, scale))
        if self.kv_routed:
            Hk = self.kv_routed
            R = B * Hk
            cl, rank = clusters
            with torch.no_grad():
                pk = pos_k.expand(R, T)
                mask = cluster_window_mask(cl[:, T - N:], rank[:, T - N:], pk[:, T - N:], cl, rank, pk, self.window,
                                           strict=self.shared_qk)
                if self.shared_qk:  # strict: a cluster's first token sees nothing; let it attend to
                    seen = mask.any(-1, keepdim=True)  # itself (a finite softmax), then zero its output
                    mask = mask | (~seen & (pk[:, None, :] == pk[:, T - N:, None]))
            mask = mask.view(B, Hk, 1, N, T).expand(B, Hk, G, N, T).reshape(B, Hk * G, N, T)
            o = _masked_attention(q[:, kl * G:], k[:, kl:], v[:, kl:], mask, scale)
            if self.shared_qk:
                o = o * seen.view(B, Hk, N, 1).to(o.dtype)
            outs.append(o)
        return outs
