"""Mixture of Sparse Attention (MoSA, Piękos et al., 2025): expert-choice heads mixed with dense heads.

Every sparse head has a router ``r = sigmoid(x W_r)`` that picks ``k = ceil(N / mosa_sparsity)``
tokens (expert choice: the head chooses its tokens); only those are projected to q, k, v, attend
to each other causally (in position order, so the attention among them is plain dense causal
attention over ``k`` tokens: SDPA's fused kernels run it), are scaled by their router score (the
router's gradient) and scatter back. Cost per sparse head ``O(k^2 + k hidden)`` instead of
``O(N^2 + N hidden)``. The other heads are dense (or local) causal heads.

Selection (``mosa_selection``):

* ``"topk"`` [default]: the paper's expert choice over the whole sequence, exactly ``k`` tokens.
  Whether an earlier token is picked depends on later tokens' scores, so the future can move
  earlier outputs, and decoding token by token cannot reproduce it: it raises under a KV cache.
* ``"threshold"``: causal. A token is a candidate when its score exceeds 0.5 and is picked while
  the candidates so far stay within the budget ``floor(mosa_capacity * (t + 1) / mosa_sparsity) + 1``
  at its position ``t``; a rate loss ``mosa_rate_weight * (mean score - 1/sparsity)^2`` pulls the
  scores down so that about ``1/sparsity`` of the tokens stay candidates (the budget caps the rest).
  Nothing depends on later tokens; KV-cache decoding reproduces the full forward (the layer keeps
  the picked flags of a cache beside it, keyed weakly on the cache object; a cache reordered in
  place, as beam search does, would leave them in the old order: greedy decoding and sampling are
  supported, beam search is not).

Config fields (defaults in brackets), beside ``hidden_size``, ``num_attention_heads`` and
``head_dim``: ``mosa_heads`` [half the heads], ``mosa_sparsity`` [8], ``mosa_selection``
[``"topk"``], ``mosa_capacity`` [1.25], ``mosa_rate_weight`` [1e-2], ``mosa_hybrid`` [``"dense"``
or ``"local"``], ``mosa_local_window`` [64] (local heads see their block and the one before),
``attention_bias`` [False], ``attention_dense`` [False] (the routed LM's ablation: sparse heads take
every token, still scaled by their router scores). Every head has its own key/value head here (no GQA).
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import routed_attention
from .lm_attention import apply_rotary
from .registry import register_attention
from .routing_attention import local_window_route

__all__ = ["MoSAAttention", "mosa_select"]

_SELECTIONS = ("topk", "threshold")


def mosa_select(scores: Tensor, sparsity: float, selection: str = "topk", capacity: float = 1.25,
                candidates_before: Optional[Tensor] = None, start: int = 0) -> tuple[Tensor, Tensor]:
    """Which tokens each sparse head picks.

    Args:
        scores: ``[B, H, N]`` router scores in (0, 1).
        sparsity: ``N / k``.
        selection: ``"topk"`` (expert choice, ``k = ceil(N / sparsity)``), ``"threshold"``
            (causal budget; see the module docstring) or ``"all"`` (every token: the dense ablation).
        candidates_before: ``[B, H]`` candidates among earlier (cached) tokens, threshold only.
        start: position of the first token (the cached length), threshold only.
    Returns:
        ``ids [B, H, k]`` int64 token indices in increasing order and ``picked [B, H, k]`` bool
        (False at padding slots, which hold tokens that were not picked; threshold only).
    """
    B, H, N = scores.shape
    if selection == "all":  # the dense ablation: every token, no routing decision
        ids = torch.arange(N, device=scores.device).expand(B, H, N)
        return ids, torch.ones_like(ids, dtype=torch.bool)
    if selection == "topk":
        k = min(N, math.ceil(N / sparsity))
        ids = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        return ids, torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(start, start + N, device=scores.device)
    cand = scores > 0.5
    before = 0 if candidates_before is None else candidates_before.unsqueeze(-1)
    budget = torch.floor(capacity * (pos + 1) / sparsity).long() + 1
    picked = cand & (before + cand.long().cumsum(-1) <= budget)
    k = min(N, int(math.floor(capacity * (start + N) / sparsity)) + 1)
    # Picked tokens first, in position order; then unpicked ones fill the static width.
    key = torch.where(picked, pos, pos + 2 * (start + N))
    ids = key.topk(k, dim=-1, largest=False).indices.sort(dim=-1).values
    return ids, picked.gather(-1, ids)


@register_attention("mosa")
class MoSAAttention(nn.Module):
    """MoSA layer (the registry interface; see :mod:`routed.layers.registry`).

    ``forward(hidden_states [B, N, hidden], position_embeddings (cos, sin) [B, N, head_dim],
    past_key_values=None, cache_position=None) -> (out [B, N, hidden], aux_loss)``; ``aux_loss``
    is the rate loss of the threshold selection in training, else None.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden, h = config.hidden_size, config.num_attention_heads
        d = getattr(config, "head_dim", None) or hidden // h
        self.layer_idx, self.heads, self.head_dim = layer_idx, h, d
        hs = getattr(config, "mosa_heads", None)
        self.sparse_heads = h // 2 if hs is None else int(hs)
        self.dense_heads = h - self.sparse_heads
        if not 1 <= self.sparse_heads <= h:
            raise ValueError(f"mosa_heads={self.sparse_heads} must lie in [1, num_attention_heads={h}]; a layer "
                             "without sparse heads is the 'dense' layer.")
        self.sparsity = float(getattr(config, "mosa_sparsity", 8))
        self.selection = getattr(config, "mosa_selection", "topk")
        self.capacity = float(getattr(config, "mosa_capacity", 1.25))
        self.rate_weight = float(getattr(config, "mosa_rate_weight", 1e-2))
        self.hybrid = getattr(config, "mosa_hybrid", "dense")
        self.local_window = int(getattr(config, "mosa_local_window", 64))
        if self.selection not in _SELECTIONS:
            raise ValueError(f"mosa_selection must be one of {_SELECTIONS}, got {self.selection!r}.")
        if getattr(config, "attention_dense", False):  # the routed LM's ablation: every head sees every token
            self.selection, self.hybrid = "all", "dense"
        if self.hybrid not in ("dense", "local"):
            raise ValueError(f"mosa_hybrid must be 'dense' or 'local', got {self.hybrid!r}.")
        if self.sparsity < 1:
            raise ValueError(f"mosa_sparsity must be >= 1 (sequence length over tokens per head), got {self.sparsity}.")
        bias = bool(getattr(config, "attention_bias", False))
        hd, hs = self.dense_heads, self.sparse_heads
        self.qkv_dense = nn.Linear(hidden, 3 * hd * d, bias=bias) if hd else None
        # Sparse heads project only their picked tokens: per-head weights [heads, hidden, 3 d].
        self.qkv_sparse = nn.Parameter(torch.randn(hs, hidden, 3 * d) * hidden ** -0.5)
        self.router = nn.Linear(hidden, hs, bias=True)
        self.o_proj = nn.Linear(h * d, hidden, bias=bias)
        self._picked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def extra_repr(self) -> str:
        return (f"sparse_heads={self.sparse_heads}, dense_heads={self.dense_heads} ({self.hybrid}), "
                f"sparsity={self.sparsity}, selection={self.selection!r}")

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], past_key_values=None,
                cache_position: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        x = hidden_states
        B, N, hidden = x.shape
        d, hd, hs = self.head_dim, self.dense_heads, self.sparse_heads
        cos, sin = position_embeddings
        scale = d ** -0.5
        past = 0 if past_key_values is None else past_key_values.get_seq_length(self.layer_idx)
        if past and self.selection == "topk":
            raise RuntimeError("mosa_selection='topk' picks tokens by comparing the whole sequence, so it cannot "
                               "decode with a KV cache; train with mosa_selection='threshold' (causal) to generate.")
        aux = None

        # Sparse heads: route, gather the picked tokens, project them.
        logits = self.router(x)
        if logits.element_size() < 4:  # bf16/fp16: score (and pick) in float32
            logits = logits.float()
        scores = torch.sigmoid(logits).transpose(1, 2)  # [B, hs, N]
        state = self._picked.get(past_key_values) if past else None
        cand_before = None if state is None else state[1]
        ids, picked = mosa_select(scores, self.sparsity, self.selection, self.capacity, cand_before, past)
        if self.training and self.selection == "threshold" and hs:
            aux = self.rate_weight * (scores.mean() - 1.0 / self.sparsity) ** 2
        k_sel = ids.shape[-1]
        # Picked rows of x by flat index: the backward adds into [B * N, hidden], where a gather from
        # x expanded over the heads would allocate [B, heads, N, hidden] (tens of GB at 64k tokens).
        flat = ids + (torch.arange(B, device=ids.device) * N).view(B, 1, 1)
        xs = F.embedding(flat.reshape(-1), x.reshape(B * N, hidden)).view(B, hs, k_sel, hidden)
        qs, ks, vs = torch.einsum("bhkc,hcd->bhkd", xs, self.qkv_sparse.to(x.dtype)).split(d, dim=-1)
        cs = cos.unsqueeze(1).expand(B, hs, N, d).gather(2, ids.unsqueeze(-1).expand(B, hs, k_sel, d))
        sn = sin.unsqueeze(1).expand(B, hs, N, d).gather(2, ids.unsqueeze(-1).expand(B, hs, k_sel, d))
        qs, ks = (apply_rotary(t.reshape(B * hs, 1, k_sel, d), cs.reshape(B * hs, k_sel, d),
                               sn.reshape(B * hs, k_sel, d)).view(B, hs, k_sel, d) for t in (qs, ks))
        w = (scores.gather(-1, ids) * picked).to(x.dtype)  # [B, hs, k]

        # Dense heads.
        if hd:
            qd, kd, vd = self.qkv_dense(x).view(B, N, 3, hd, d).permute(2, 0, 3, 1, 4)
            qd, kd = apply_rotary(qd, cos, sin), apply_rotary(kd, cos, sin)

        if past == 0:  # the whole sequence: dense causal attention among each head's picked tokens
            out = None
            if hs:
                if self.selection != "threshold":  # all slots picked: plain causal attention among the k tokens
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                else:  # unpicked padding slots are hidden as keys (their own rows are weighted 0)
                    tri = torch.ones(k_sel, k_sel, dtype=torch.bool, device=x.device).tril()
                    eye = torch.eye(k_sel, dtype=torch.bool, device=x.device)
                    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=(tri & picked[:, :, None, :]) | eye,
                                                       scale=scale)
                out = self._project_picked(o * w.unsqueeze(-1), flat, B * N)
            if hd:
                o = self._dense(qd, kd, vd, scale).transpose(1, 2).reshape(B * N, hd * d)
                dense_out = F.linear(o, self.o_proj.weight[:, :hd * d])
                out = dense_out if out is None else out + dense_out
            if self.o_proj.bias is not None:
                out = out + self.o_proj.bias
            if past_key_values is not None:  # prefill: fill the cache (topk too; it raises on decode)
                self._cache_update(ids, picked, scores, ks, vs, kd if hd else None, vd if hd else None,
                                   past_key_values, N)
            return out.view(B, N, hidden), aux
        k_all, v_all, flags = self._cache_update(ids, picked, scores, ks, vs, kd if hd else None,
                                                 vd if hd else None, past_key_values, N)
        o = self._after_cache(ids, qs, w, qd if hd else None, k_all, v_all, flags, N, scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, self.heads * d)), aux

    def _project_picked(self, o: Tensor, flat: Tensor, rows: int) -> Tensor:
        """The sparse heads' share of the output projection, computed on their picked tokens only and
        added into ``[rows, hidden]`` (flat token index ``flat [B, heads, k]``). Projecting the
        scattered ``[B, N, heads * d]`` instead would cost ``N / k`` times the FLOPs, nearly all of
        them on zeros. ``o [B, heads, k, d]`` is already weighted by the router scores."""
        hd, hs, d = self.dense_heads, self.sparse_heads, self.head_dim
        w_s = self.o_proj.weight[:, hd * d:].view(-1, hs, d)  # [hidden, heads, d]
        y = torch.einsum("bhkd,chd->bhkc", o, w_s.to(o.dtype))  # [B, heads, k, hidden]
        out = torch.zeros(rows, y.shape[-1], dtype=y.dtype, device=y.device)
        return out.index_add(0, flat.reshape(-1), y.reshape(-1, y.shape[-1]))

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        if self.hybrid == "dense":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return routed_attention(q, k, v, local_window_route(q.shape[2], self.local_window, q.device), scale=scale)

    def _cache_update(self, ids, picked, scores, ks, vs, kd, vd, cache, N):
        """Append the new tokens to the cache: sparse heads' k/v at every position (zeros where not
        picked); the picked flags and the running candidate count live beside the cache (weakly
        keyed on it). Returns the cached ``k, v [B, heads, T, d]`` and flags ``[B, sparse heads, T]``."""
        B, hs, k_sel = ids.shape
        d = self.head_dim
        idx = ids.unsqueeze(-1).expand(B, hs, k_sel, d)
        keep = picked.unsqueeze(-1).to(ks.dtype)
        ks_full = torch.zeros(B, hs, N, d, dtype=ks.dtype, device=ks.device).scatter(2, idx, ks * keep)
        vs_full = torch.zeros(B, hs, N, d, dtype=vs.dtype, device=vs.device).scatter(2, idx, vs * keep)
        flags = torch.zeros(B, hs, N, dtype=torch.bool, device=ks.device).scatter(2, ids, picked)
        cand = (scores > 0.5).long().sum(-1)
        state = self._picked.get(cache)
        if cache.get_seq_length(self.layer_idx) and state is None:
            raise RuntimeError("this KV cache holds tokens this MoSA layer never saw (its picked flags are missing); "
                               "fill the cache through the model's forward.")
        if state is not None:
            flags, cand = torch.cat([state[0], flags], -1), state[1] + cand
        self._picked[cache] = (flags, cand)
        k_new = ks_full if kd is None else torch.cat([kd, ks_full], 1)
        v_new = vs_full if vd is None else torch.cat([vd, vs_full], 1)
        k_all, v_all = cache.update(k_new, v_new, self.layer_idx)
        return k_all, v_all, flags

    def _after_cache(self, ids, qs, w, qd, k_all, v_all, flags, N, scale) -> Tensor:
        """New queries (the last ``N`` cached positions) over the whole cache: ``O(T)`` per query."""
        B, hs, k_sel, d = qs.shape
        hd = self.dense_heads
        T = k_all.shape[2]
        pos_k = torch.arange(T, device=qs.device)
        pos_q = pos_k[T - N:]
        causal = pos_k[None, :] <= pos_q[:, None]
        outs = []
        if hd:
            mask = causal
            if self.hybrid == "local":
                b = self.local_window
                mask = mask & (torch.div(pos_k, b, rounding_mode="floor")[None, :] >=
                               torch.div(pos_q, b, rounding_mode="floor")[:, None] - 1)
            outs.append(F.scaled_dot_product_attention(qd, k_all[:, :hd], v_all[:, :hd], attn_mask=mask, scale=scale))
        if hs:
            idx = ids.unsqueeze(-1).expand(B, hs, k_sel, d)
            q_full = torch.zeros(B, hs, N, d, dtype=qs.dtype, device=qs.device).scatter(2, idx, qs)
            w_full = torch.zeros(B, hs, N, dtype=w.dtype, device=qs.device).scatter(2, ids, w)
            eye = pos_k[None, :] == pos_q[:, None]  # every row sees something (unpicked rows are weighted 0)
            mask = (causal & flags[:, :, None, :]) | eye
            o = F.scaled_dot_product_attention(q_full, k_all[:, hd:], v_all[:, hd:], attn_mask=mask, scale=scale)
            outs.append(o * w_full.unsqueeze(-1))
        return torch.cat(outs, 1)
