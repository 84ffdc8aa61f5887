"""Mixture of Sparse Attention (MoSA, Piękos et al., 2025): expert-choice heads mixed with dense heads.

Every sparse head has a router ``r = sigmoid(x W_r)`` that picks ``k = ceil(N / mosa_sparsity)``
tokens (expert choice: the head chooses its tokens); only those are projected to q, k, v, attend
to each other causally (in position order, so the attention among them is plain dense causal
attention over ``k`` tokens: SDPA's fused kernels run it), are scaled by their router score (the
router's gradient) and scatter back. Cost per sparse head ``O(k^2 + k hidden)`` instead of
``O(N^2 + N hidden)``. The other heads are dense (or local) causal heads. Memory: the picked rows
of ``x`` per head (``hidden / d`` times the size of a head's ``q``) and their output-projection products
exist only a few heads at a time and are never saved for backward, which keeps what attention over the
picked tokens needs (``q, k, v, out``) and per-token bookkeeping.

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

import functools
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..attention import routed_attention
from ..ops.rotary import rotate_half as _rotate_half
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators of sums over heads: float32 at least (bf16 adds of ~N/k * heads terms round badly)."""
    return torch.promote_types(dtype, torch.float32)


def _autocast_state(t: Tensor) -> tuple:
    """The autocast state the forward ran under, for ``t``'s device; a forward saves it as ``ctx.amp``
    for :func:`_in_forward_autocast`."""
    dev = t.device.type
    return dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev)


def _autocast_as(state: tuple):
    """The autocast context of a state from :func:`_autocast_state`."""
    dev, dtype, enabled = state
    return torch.autocast(dev, dtype=dtype, enabled=enabled)


def _in_forward_autocast(backward):
    """Runs a Function's backward under the autocast state its forward saved in ``ctx.amp`` (as
    ``torch.amp.custom_bwd`` does, for any device type): under bf16 autocast the forward's matmuls ran
    in bf16 while ``w`` and the weights stayed float32, and a backward outside autocast would mix the
    two in one ``bmm``."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with _autocast_as(ctx.amp):
            return backward(ctx, *grads)
    return run


def _chunks(heads: int, chunk: int):
    return ((h0, min(heads, h0 + chunk)) for h0 in range(0, heads, chunk))


def _picked_qkv_forward(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, batch: int,
                        chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of :class:`_PickedQKV` (shapes there), under the caller's autocast state."""
    H, M = rows.shape
    d = weight.shape[-1] // 3
    out = [x.new_empty(batch, H, M // batch, d) for _ in range(3)]
    for h0, h1 in _chunks(H, chunk):
        idx = rows[h0:h1].reshape(-1)
        qkv = torch.bmm(x.index_select(0, idx).view(h1 - h0, M, -1), weight[h0:h1])
        c, s = (t.index_select(0, idx).view(h1 - h0, M, d).to(x.dtype) for t in (cos, sin))
        for i, t in enumerate(qkv.split(d, dim=-1)):
            t = t * c + _rotate_half(t) * s if i < 2 else t  # as apply_rotary
            out[i][:, h0:h1] = t.view(h1 - h0, batch, M // batch, d).transpose(0, 1)
    return tuple(out)


def _picked_qkv_backward(gq: Tensor, gk: Tensor, gv: Tensor, x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor,
                         rows: Tensor, chunk: int, needs: tuple) -> tuple:
    """The backward of :class:`_PickedQKV`: ``(gx, gweight, gcos, gsin)``, None where ``needs`` says
    no. The picked rows of ``x`` are gathered again per chunk instead of being saved."""
    H, M = rows.shape
    d = weight.shape[-1] // 3
    need_x, need_w, need_c, need_s = needs
    gx = torch.zeros(x.shape, dtype=_acc_dtype(x.dtype), device=x.device) if need_x else None
    gw = torch.empty_like(weight) if need_w else None
    gcs = [torch.zeros(t.shape, dtype=_acc_dtype(t.dtype), device=t.device) if n else None
           for t, n in ((cos, need_c), (sin, need_s))]
    for h0, h1 in _chunks(H, chunk):
        n, idx = h1 - h0, rows[h0:h1].reshape(-1)
        c, s = (t.index_select(0, idx).view(n, M, d).to(x.dtype) for t in (cos, sin))
        g = [t[:, h0:h1].transpose(0, 1).reshape(n, M, d) for t in (gq, gk, gv)]
        # The rotary's transpose: rotate_half^T = -rotate_half.
        g_in = torch.cat([g[0] * c - _rotate_half(g[0] * s), g[1] * c - _rotate_half(g[1] * s), g[2]], -1)
        xs = x.index_select(0, idx).view(n, M, -1)
        if need_w:
            gw[h0:h1] = torch.bmm(xs.transpose(1, 2), g_in)
        if need_x:
            gx.index_add_(0, idx, torch.bmm(g_in, weight[h0:h1].transpose(1, 2)).view(-1, x.shape[1]).to(gx.dtype))
        if need_c or need_s:  # rare (learned positions): needs the unrotated q, k, so project again
            q, k = torch.bmm(xs, weight[h0:h1, :, :2 * d]).split(d, dim=-1)
            for acc, f in zip(gcs, (lambda t: t, _rotate_half)):
                if acc is not None:
                    acc.index_add_(0, idx, (g[0] * f(q) + g[1] * f(k)).reshape(-1, d).to(acc.dtype))
    gc, gs = (None if a is None else a.to(t.dtype) for a, t in zip(gcs, (cos, sin)))
    return None if gx is None else gx.to(x.dtype), gw, gc, gs


class _PickedQKV(torch.autograd.Function):
    """Rotated ``q, k`` and ``v`` of every sparse head at its picked tokens, ``chunk`` heads at a time.

    The picked rows of ``x`` (``[heads, B * k, hidden]``: ``hidden / d`` times the size of ``q``, 3.6 GB
    at 32k tokens with 425 heads) exist for one chunk at a time and are gathered again in backward
    instead of being saved; the rotary ``cos, sin`` at the picked positions likewise. Saved: ``x``,
    ``weight``, ``cos``, ``sin`` (saved anyway by the rest of the layer) and ``rows``.

    ``x [R, hidden]`` (``R = B * N`` flat tokens), ``weight [heads, hidden, 3 d]``, ``cos, sin [R, d]``,
    ``rows [heads, B * k]`` int64 (head-major flat token ids), ``batch = B``. Returns
    ``q, k, v [B, heads, k, d]``.
    """

    @staticmethod
    def forward(ctx, x, weight, cos, sin, rows, batch, chunk):
        ctx.save_for_backward(x, weight, cos, sin, rows)
        ctx.chunk, ctx.amp = chunk, _autocast_state(x)
        return _picked_qkv_forward(x, weight, cos, sin, rows, batch, chunk)

    @staticmethod
    @once_differentiable
    @_in_forward_autocast
    def backward(ctx, gq, gk, gv):
        x, weight, cos, sin, rows = ctx.saved_tensors
        grads = _picked_qkv_backward(gq, gk, gv, x, weight, cos, sin, rows, ctx.chunk, ctx.needs_input_grad[:4])
        return (*grads, None, None, None)


def _picked_out_forward(o: Tensor, w: Tensor, weight: Tensor, rows: Tensor, n_rows: int, chunk: int) -> Tensor:
    """The forward of :class:`_PickedOut` (shapes there), under the caller's autocast state."""
    B, H, K, d = o.shape
    acc = torch.zeros(n_rows, weight.shape[0], dtype=_acc_dtype(o.dtype), device=o.device)
    for h0, h1 in _chunks(H, chunk):
        ow = (o[:, h0:h1] * w[:, h0:h1, :, None]).transpose(0, 1).reshape(h1 - h0, B * K, d)
        y = torch.bmm(ow, weight[:, h0:h1].permute(1, 2, 0))
        acc.index_add_(0, rows[h0:h1].reshape(-1), y.view(-1, y.shape[-1]).to(acc.dtype))
    return acc.to(o.dtype)


def _picked_out_backward(g: Tensor, o: Tensor, w: Tensor, weight: Tensor, rows: Tensor, chunk: int,
                         needs: tuple) -> tuple:
    """The backward of :class:`_PickedOut`: ``(go, gw, gweight)`` (contiguous), None where ``needs``
    says no."""
    B, H, K, d = o.shape
    need_o, need_w, need_weight = needs
    go = o.new_empty(o.shape) if need_o else None
    gw = w.new_empty(w.shape) if need_w else None
    gweight = weight.new_empty(weight.shape) if need_weight else None
    for h0, h1 in _chunks(H, chunk):
        n = h1 - h0
        gy = g.index_select(0, rows[h0:h1].reshape(-1)).view(n, B * K, -1)
        oc = o[:, h0:h1].transpose(0, 1).reshape(n, B * K, d)
        wc = w[:, h0:h1].transpose(0, 1).reshape(n, B * K, 1)
        if need_weight:
            gweight[:, h0:h1] = torch.bmm((oc * wc).transpose(1, 2), gy).permute(2, 0, 1)
        g_ow = torch.bmm(gy, weight[:, h0:h1].permute(1, 0, 2))  # [n, B * K, d]
        if need_o:
            go[:, h0:h1] = (g_ow * wc).view(n, B, K, d).transpose(0, 1)
        if need_w:
            gw[:, h0:h1] = (g_ow * oc).sum(-1).view(n, B, K).transpose(0, 1)
    return go, gw, gweight


class _PickedOut(torch.autograd.Function):
    """The sparse heads' share of the output projection, on their picked tokens only, added into
    ``[R, hidden]``, ``chunk`` heads at a time: the per-head ``[B * k, hidden]`` products exist for one
    chunk at a time, in forward and (as the gathered output gradient) in backward; the sums over
    heads run in float32. Projecting the scattered ``[B, N, heads * d]`` instead would cost ``N / k``
    times the FLOPs, nearly all of them on zeros.

    ``o [B, heads, k, d]`` (attention output, saved by SDPA anyway), ``w [B, heads, k]`` router
    weights (applied here, so ``o * w`` is never saved), ``weight [hidden, heads, d]`` (the sparse
    heads' columns of ``o_proj``), ``rows [heads, B * k]`` int64 flat token ids, ``n_rows = R``.
    Returns ``[R, hidden]`` in ``o``'s dtype.
    """

    @staticmethod
    def forward(ctx, o, w, weight, rows, n_rows, chunk):
        ctx.save_for_backward(o, w, weight, rows)
        ctx.chunk, ctx.amp = chunk, _autocast_state(o)
        return _picked_out_forward(o, w, weight, rows, n_rows, chunk)

    @staticmethod
    @once_differentiable
    @_in_forward_autocast
    def backward(ctx, g):
        o, w, weight, rows = ctx.saved_tensors
        return (*_picked_out_backward(g, o, w, weight, rows, ctx.chunk, ctx.needs_input_grad[:3]), None, None, None)


# ------------------------------------------------------------------------------ torch.compile path
# Under torch.compile the two Functions above run as opaque custom ops: on an H200 (torch 2.11,
# aot_eager) the traced Functions gave the sparse heads' gradients off by up to 2e-2 (a third of the
# largest gradient) while the eager step matched float64 to 2e-8 (results/h200/probe_mosa_compile_variants.json). An opaque op runs the
# eager code on the real tensors. Autocast is passed in and restored inside, as the eager Functions
# do; not-needed gradients come back as empty placeholders (an op returns tensors only).
def _none_to_empty(ts, like: Tensor) -> list:
    return [like.new_empty(0) if t is None else t for t in ts]


@torch.library.custom_op("routed::mosa_picked_qkv", mutates_args=())
def _picked_qkv_op(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, batch: int, chunk: int,
                   amp_device: str, amp_dtype: torch.dtype, amp_enabled: bool) -> tuple[Tensor, Tensor, Tensor]:
    with _autocast_as((amp_device, amp_dtype, amp_enabled)):
        return _picked_qkv_forward(x, weight, cos, sin, rows, batch, chunk)


@_picked_qkv_op.register_fake
def _(x, weight, cos, sin, rows, batch, chunk, amp_device, amp_dtype, amp_enabled):
    H, M = rows.shape
    return tuple(x.new_empty(batch, H, M // batch, weight.shape[-1] // 3) for _ in range(3))


@torch.library.custom_op("routed::mosa_picked_qkv_bwd", mutates_args=())
def _picked_qkv_bwd_op(gq: Tensor, gk: Tensor, gv: Tensor, x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor,
                       rows: Tensor, chunk: int, need_x: bool, need_w: bool, need_c: bool, need_s: bool,
                       amp_device: str, amp_dtype: torch.dtype, amp_enabled: bool) -> list[Tensor]:
    with _autocast_as((amp_device, amp_dtype, amp_enabled)):
        grads = _picked_qkv_backward(gq, gk, gv, x, weight, cos, sin, rows, chunk, (need_x, need_w, need_c, need_s))
    return _none_to_empty(grads, x)


@_picked_qkv_bwd_op.register_fake
def _(gq, gk, gv, x, weight, cos, sin, rows, chunk, need_x, need_w, need_c, need_s, amp_device, amp_dtype,
      amp_enabled):
    return [t.new_empty(t.shape) if need else x.new_empty(0)
            for t, need in ((x, need_x), (weight, need_w), (cos, need_c), (sin, need_s))]


def _picked_qkv_setup(ctx, inputs, output):
    x, weight, cos, sin, rows, _, chunk, *amp = inputs
    ctx.save_for_backward(x, weight, cos, sin, rows)
    ctx.chunk, ctx.amp = chunk, tuple(amp)


def _picked_qkv_op_backward(ctx, gq, gk, gv):
    x, weight, cos, sin, rows = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    given = [g for g in (gq, gk, gv) if g is not None]
    if not given:
        return (None,) * 10
    gq, gk, gv = (torch.zeros_like(given[0]) if g is None else g for g in (gq, gk, gv))  # one shape
    grads = _picked_qkv_bwd_op(gq, gk, gv, x, weight, cos, sin, rows, ctx.chunk, *needs, *ctx.amp)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None, None)


torch.library.register_autograd("routed::mosa_picked_qkv", _picked_qkv_op_backward, setup_context=_picked_qkv_setup)


@torch.library.custom_op("routed::mosa_picked_out", mutates_args=())
def _picked_out_op(o: Tensor, w: Tensor, weight: Tensor, rows: Tensor, n_rows: int, chunk: int, amp_device: str,
                   amp_dtype: torch.dtype, amp_enabled: bool) -> Tensor:
    with _autocast_as((amp_device, amp_dtype, amp_enabled)):
        return _picked_out_forward(o, w, weight, rows, n_rows, chunk)


@_picked_out_op.register_fake
def _(o, w, weight, rows, n_rows, chunk, amp_device, amp_dtype, amp_enabled):
    return o.new_empty(n_rows, weight.shape[0])


@torch.library.custom_op("routed::mosa_picked_out_bwd", mutates_args=())
def _picked_out_bwd_op(g: Tensor, o: Tensor, w: Tensor, weight: Tensor, rows: Tensor, chunk: int, need_o: bool,
                       need_w: bool, need_weight: bool, amp_device: str, amp_dtype: torch.dtype,
                       amp_enabled: bool) -> list[Tensor]:
    with _autocast_as((amp_device, amp_dtype, amp_enabled)):
        grads = _picked_out_backward(g, o, w, weight, rows, chunk, (need_o, need_w, need_weight))
    return _none_to_empty(grads, o)


@_picked_out_bwd_op.register_fake
def _(g, o, w, weight, rows, chunk, need_o, need_w, need_weight, amp_device, amp_dtype, amp_enabled):
    return [t.new_empty(t.shape) if need else o.new_empty(0) for t, need in ((o, need_o), (w, need_w),
                                                                             (weight, need_weight))]


def _picked_out_setup(ctx, inputs, output):
    o, w, weight, rows, _, chunk, *amp = inputs
    ctx.save_for_backward(o, w, weight, rows)
    ctx.chunk, ctx.amp = chunk, tuple(amp)


def _picked_out_op_backward(ctx, g):
    o, w, weight, rows = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _picked_out_bwd_op(g, o, w, weight, rows, ctx.chunk, *needs, *ctx.amp)
    return (*(t if need else None for t, need in zip(grads, needs)), None, None, None, None, None, None)


torch.library.register_autograd("routed::mosa_picked_out", _picked_out_op_backward, setup_context=_picked_out_setup)


def picked_qkv(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, batch: int,
               chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`_PickedQKV` in eager mode, its custom op under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return _picked_qkv_op(x, weight, cos, sin, rows, batch, chunk, *_autocast_state(x))
    return _PickedQKV.apply(x, weight, cos, sin, rows, batch, chunk)


def picked_out(o: Tensor, w: Tensor, weight: Tensor, rows: Tensor, n_rows: int, chunk: int) -> Tensor:
    """:class:`_PickedOut` in eager mode, its custom op under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return _picked_out_op(o, w, weight, rows, n_rows, chunk, *_autocast_state(o))
    return _PickedOut.apply(o, w, weight, rows, n_rows, chunk)


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
        # Elements of the per-chunk [heads, B * k, hidden] temporaries (None: max(2 x's, 2^27)); bounds the
        # sparse heads' peak memory independently of their number. Not smaller: every chunk costs ~25
        # launches, and with 8 heads per chunk (425 heads at 32k) the GPU would wait on the host.
        self.chunk_elements: Optional[int] = None

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
        if self.selection == "threshold":
            # Picked slots first, in position order: plain causal attention among the slots is then
            # exact for every picked query (no [k, k] mask, which is 7 GB at 32k tokens and 425 heads;
            # SDPA's fused causal kernels run); unpicked slots are weighted 0 and only see slots before.
            order = picked.logical_not().to(torch.uint8).argsort(dim=-1, stable=True)
            ids, picked = ids.gather(-1, order), picked.gather(-1, order)
        k_sel = ids.shape[-1]
        # Picked rows of x by flat token index, head-major: backward adds into [B * N, hidden], where a
        # gather from x expanded over the heads would allocate [B, heads, N, hidden].
        flat = ids + (torch.arange(B, device=ids.device) * N).view(B, 1, 1)
        rows = flat.transpose(0, 1).reshape(hs, B * k_sel)
        chunk = self._chunk_heads(B * k_sel * hidden, B * N * hidden)
        qs, ks, vs = picked_qkv(x.reshape(B * N, hidden), self.qkv_sparse.to(x.dtype),
                                cos.expand(B, N, d).reshape(B * N, d), sin.expand(B, N, d).reshape(B * N, d),
                                rows, B, chunk)
        w = (scores.gather(-1, ids) * picked).to(x.dtype)  # [B, hs, k]

        # Dense heads.
        if hd:
            qd, kd, vd = self.qkv_dense(x).view(B, N, 3, hd, d).permute(2, 0, 3, 1, 4)
            qd, kd = apply_rotary(qd, cos, sin), apply_rotary(kd, cos, sin)

        if past == 0:  # the whole sequence: dense causal attention among each head's picked tokens
            out = None
            if hs:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                w_s = self.o_proj.weight[:, hd * d:].view(-1, hs, d).to(x.dtype)  # [hidden, heads, d]
                out = picked_out(o, w, w_s, rows, B * N, chunk)
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

    def _chunk_heads(self, per_head: int, x_elements: int) -> int:
        """Sparse heads per chunk: their ``[B * k, hidden]`` temporaries stay within ``chunk_elements``."""
        budget = self.chunk_elements or max(2 * x_elements, 1 << 27)
        return max(1, budget // max(1, per_head))

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
