"""Expert routers: turn router logits (and, for the graph-of-tokens routers, token similarities or
the preceding attention) into an :class:`~routed.route.ExpertRoute`, plus the load-balancing terms.

Routers:

* token choice, ``softmax_topk`` (Mixtral, Qwen-MoE): ``p = softmax(logits)``, each token takes its
  ``k`` largest ``p``; weights are those ``p`` (renormalised to sum to 1 when ``normalize``).
* token choice, ``topk_softmax`` (Switch-style top-k first): each token takes its ``k`` largest
  logits; weights are the softmax over just those ``k``.
* expert choice (Zhou et al. 2022): each expert takes the ``capacity`` tokens with the largest
  ``p[:, e]``; a token may get any number of experts, including none. Selection looks at every
  token of the batch, future ones too, so it is not causal.
* similarity-aware (Nguyen et al. 2025, "graph of tokens"): each token's gate distribution is
  mixed with those of similar tokens, ``p~ = (1 - mix) p + mix S p`` with
  ``S = softmax_j(<f_i, f_j> / temperature)`` over unit-norm features ``f`` (a learned projection
  of the router input); then top-k on ``p~``.
* attention-aware: the same mixing with ``S`` the preceding attention layer's attention averaged
  over heads, ``S = mean_h softmax(q_h k_h^T * scale)``.

In causal models the mixing only looks at earlier tokens (``j <= i``). ``S p`` is computed as an
attention with the gate distributions as values (``scaled_dot_product_attention`` with
``v = p``, both padded to one head dim so that a fused kernel runs), so no ``N x N`` tensor is
built: it costs one attention pass of about ``4 N^2 max(d, E)`` FLOPs per head (half when
causal), ``d`` the feature or head dim, ``E`` the experts, and ``O(N max(d, E))`` memory per
head. Given an explicit ``[B, H, N, N]`` attention matrix (HF eager attention builds one anyway),
it is averaged over heads and, when causal, masked to earlier tokens and renormalised.

Incremental (KV-cache) decoding: the mixing functions also take the state of ``T`` earlier tokens
(``past_probs``, their unmixed gate distributions ``[B, T, E]``; for the similarity router
``past_features [B, T, d]``; for the attention router ``k`` then covers all ``T + N`` tokens, as an
attention layer under a cache returns it). The ``N`` new tokens are the last ``N`` positions (the
causal mask is bottom-right aligned) and the result is theirs only, ``[B, N, E]``: exactly the
full sequence's result sliced to them. A call costs ``~4 N (T + N) max(d, E)`` FLOPs per head; a
chunk of several new tokens builds a boolean ``[N, T + N]`` mask (a full pass or a single new token
builds none). :attr:`RouterOutput.gate_probs` and :attr:`RouterOutput.features` are what a caller
keeps for the next call.

Load balancing, each optional and reported by :class:`ExpertRouter`:

* :func:`switch_aux_loss`: ``E * sum_e f_e P_e`` (fraction of slots routed to ``e`` times mean
  probability of ``e``), as Switch Transformer and Hugging Face's ``load_balancing_loss_func``.
* :func:`router_z_loss`: ``mean(logsumexp(logits)^2)`` (ST-MoE), keeps logits small.
* auxiliary-loss-free balancing (DeepSeek-V3): a per-expert selection bias, added to the scores
  only to choose experts (never to the weights), nudged outside autograd after each training step
  towards the under-loaded experts: :func:`update_selection_bias`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.expert_topk import expert_topk_route
from ..route import ExpertRoute, RouteError

__all__ = [
    "token_choice_route", "topk_route_from_probs", "expert_choice_route", "apply_capacity", "expert_capacity",
    "similarity_mixed_probs", "attention_mixed_probs", "switch_aux_loss", "router_z_loss",
    "update_selection_bias", "RouterOutput", "ExpertRouter", "ROUTER_METHODS",
]

ROUTER_METHODS = ("token_choice", "expert_choice", "similarity", "attention")
SCORE_ORDERS = ("softmax_topk", "topk_softmax")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RouteError(msg)


def _check_logits(logits: Tensor, k: Optional[int] = None) -> None:
    _check(isinstance(logits, Tensor) and logits.dim() == 2 and logits.is_floating_point(),
           f"router logits must be a floating-point [tokens, experts] tensor, got "
           f"{getattr(logits, 'dtype', type(logits).__name__)} {list(getattr(logits, 'shape', []))}.")
    if k is not None:
        E = logits.shape[1]
        _check(isinstance(k, int) and 1 <= k <= E, f"k must be an int in [1, num_experts={E}], got {k!r}.")


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * tokens * k / experts)`` (at least 1)."""
    _check(capacity_factor > 0, f"capacity_factor must be > 0, got {capacity_factor}.")
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def apply_capacity(route: ExpertRoute, capacity: int) -> ExpertRoute:
    """Drop the slots past ``capacity`` per expert, earlier tokens first served (as Switch/GShard).

    Dropped slots become ``-1`` with weight 0; the token keeps its other slots (the residual
    connection carries it where all were dropped). Serving by token order keeps the choice causal:
    whether token ``t`` is dropped depends only on tokens ``<= t`` of the flattened order (batch
    major, so a sequence's tokens also compete with the whole of the sequences before it).
    """
    _check(isinstance(capacity, int) and capacity >= 0, f"capacity must be an int >= 0, got {capacity!r}.")
    e = route.sorted_expert_ids()
    rank = torch.arange(e.numel(), device=e.device) - route.offsets.long()[e]
    dropped = route.order[rank >= capacity]
    keep = torch.ones(route.expert_ids.numel(), dtype=torch.bool, device=route.device)
    keep[dropped] = False
    keep = keep.view_as(route.expert_ids)
    ids = torch.where(keep, route.expert_ids, torch.full_like(route.expert_ids, -1))
    weights = torch.where(keep, route.weights, torch.zeros_like(route.weights))
    return ExpertRoute.from_expert_ids(ids, weights, route.num_experts, capacity=capacity, validate=False)


def topk_route_from_probs(probs: Tensor, k: int, *, normalize: bool = True, selection_bias: Optional[Tensor] = None,
                          capacity: Optional[int] = None, backend: Optional[str] = None) -> ExpertRoute:
    """Each token takes the ``k`` experts with the largest ``probs (+ selection_bias)``.

    Args:
        probs: ``[T, E]`` gate distribution (rows sum to 1).
        normalize: renormalise the ``k`` chosen probabilities to sum to 1 (Mixtral does, for any
            ``k``; with ``k = 1`` every weight is then 1 and the router gets no gradient).
        selection_bias: optional ``[E]`` added to the scores for the choice only (weights stay
            unbiased): auxiliary-loss-free balancing.
        capacity: optional slots per expert (see :func:`apply_capacity`); None drops nothing.
        backend: of the top-k and sort, ``"triton"`` (one fused route kernel), ``"reference"`` or
            None (the kernel on CUDA GPUs); see :func:`routed.ops.expert_topk.expert_topk_route`.
    """
    _check_logits(probs, k)
    route, _ = expert_topk_route(probs, k, mode="probs", normalize=normalize, selection_bias=selection_bias,
                                 backend=backend)
    return route if capacity is None else apply_capacity(route, capacity)


def token_choice_route(logits: Tensor, k: int, *, score_order: str = "softmax_topk", normalize: bool = True,
                       selection_bias: Optional[Tensor] = None, capacity: Optional[int] = None,
                       backend: Optional[str] = None) -> ExpertRoute:
    """Token-choice top-k routing from router logits ``[T, E]``.

    ``score_order="softmax_topk"``: softmax over all experts, then top-k (weights renormalised when
    ``normalize``). ``"topk_softmax"``: top-k logits, then softmax over those ``k`` (already
    normalised). The softmax runs in float32. See :func:`topk_route_from_probs` for the rest.
    """
    _check_logits(logits, k)
    _check(score_order in SCORE_ORDERS, f"score_order must be one of {SCORE_ORDERS}, got {score_order!r}.")
    route, _ = expert_topk_route(logits, k, mode=score_order, normalize=normalize, selection_bias=selection_bias,
                                 backend=backend)
    return route if capacity is None else apply_capacity(route, capacity)


def expert_choice_route(logits: Tensor, capacity: int, *, selection_bias: Optional[Tensor] = None) -> ExpertRoute:
    """Expert-choice routing: every expert takes the ``capacity`` tokens with the largest
    ``softmax(logits)[:, e]`` (+ ``selection_bias[e]``, which does not change an expert's own
    ranking and is accepted for symmetry); weights are those probabilities.

    Returns a route with ``k`` = the most experts any token got (``-1``-padded; measuring it is
    one device-to-host copy). Not causal: an expert's choice of token ``t`` depends on every token
    of ``logits``, later ones included.
    """
    _check_logits(logits)
    T, E = logits.shape
    _check(isinstance(capacity, int) and 1 <= capacity <= T,
           f"expert-choice capacity must be an int in [1, tokens={T}], got {capacity!r}; lower capacity_factor "
           "or route more tokens at once.")
    probs = logits.float().softmax(-1)
    scores = probs if selection_bias is None else probs + selection_bias.float()
    chosen_tok = scores.t().topk(capacity, dim=-1).indices  # [E, C]
    chosen = torch.zeros(E, T, dtype=torch.bool, device=logits.device)
    chosen.scatter_(1, chosen_tok, True)
    chosen = chosen.t()  # [T, E]
    width = max(int(chosen.sum(1).max()), 1)  # host sync: the widest token
    col = torch.arange(E, device=logits.device).expand(T, E)
    ids = torch.where(chosen, col, col + E).sort(-1).values[:, :width]
    live = ids < E
    ids = torch.where(live, ids, torch.full_like(ids, -1))
    w = torch.where(live, probs.gather(-1, ids.clamp_min(0)), torch.zeros((), dtype=probs.dtype, device=probs.device))
    return ExpertRoute.from_expert_ids(ids, w, E, capacity=capacity, validate=False)


# ---------------------------------------------------------------------------------------------------
# Graph-of-tokens mixing
def _check_probs3(probs: Tensor) -> None:
    _check(isinstance(probs, Tensor) and probs.dim() == 3 and probs.is_floating_point(),
           f"probs must be a floating-point [batch, seq, experts] tensor, got {list(getattr(probs, 'shape', []))}.")


def _mix(probs: Tensor, mixed: Tensor, mix: float) -> Tensor:
    _check(0.0 <= mix <= 1.0, f"mix must lie in [0, 1], got {mix}.")
    return mixed if mix == 1.0 else (1.0 - mix) * probs + mix * mixed


def _attend_values(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float) -> Tensor:
    """``softmax(q k^T * scale) v`` through ``scaled_dot_product_attention`` with one head dim for
    q/k and v: the fused kernels (flash on CPU and GPU, memory-efficient) want equal dims, and the
    math fallback they would otherwise leave would build the ``N x N`` scores. Zero columns change
    neither ``q k^T`` nor the kept columns of the output.

    The ``Nq`` queries are the last ``Nq`` of the ``Nk`` key positions: with ``causal`` the mask is
    bottom-right aligned (SDPA's ``is_causal`` is top-left aligned, right only when ``Nq == Nk``; one
    query sees every key; otherwise a boolean ``[Nq, Nk]`` mask)."""
    d, e = q.shape[-1], v.shape[-1]
    if e < d:
        v = F.pad(v, (0, d - e))
    elif d < e:
        q, k = F.pad(q, (0, e - d)), F.pad(k, (0, e - d))
    nq, nk = q.shape[-2], k.shape[-2]
    mask = None
    if causal and nq != nk and nq > 1:
        mask = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nk - nq, nk, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and nq == nk,
                                          scale=scale)[..., :e]


def _past_probs(probs: Tensor, past_probs: Optional[Tensor]) -> Tensor:
    """``[B, T + N, E]``: the earlier tokens' gate distributions followed by the new ones (``T = 0``
    without ``past_probs``)."""
    if past_probs is None:
        return probs
    B, _, E = probs.shape
    _check(isinstance(past_probs, Tensor) and past_probs.dim() == 3 and past_probs.shape[0] == B
           and past_probs.shape[2] == E,
           f"past_probs must be the earlier tokens' gate distributions [batch={B}, cached, experts={E}], got "
           f"{list(getattr(past_probs, 'shape', []))}.")
    return torch.cat([past_probs.to(probs.dtype), probs], 1)


def similarity_mixed_probs(probs: Tensor, features: Tensor, *, causal: bool, temperature: float = 0.1,
                           mix: float = 0.5, past_probs: Optional[Tensor] = None,
                           past_features: Optional[Tensor] = None) -> Tensor:
    """Similarity-aware gate distributions ``(1 - mix) p + mix S p``, ``S = softmax_j(<f_i, f_j> / temperature)``.

    Args:
        probs: ``[B, N, E]`` gate distributions (rows sum to 1) of the ``N`` (new) tokens.
        features: ``[B, N, d]`` their features; they are L2-normalised here (cosine similarity).
        causal: token ``i`` mixes only tokens ``j <= i``.
        temperature, mix: the softmax temperature and the mixing weight.
        past_probs, past_features: the state of ``T`` earlier tokens (KV-cache decoding, chunked
            prefill), both or neither: their unmixed gate distributions ``[B, T, E]`` and their
            features ``[B, T, d]`` (as given to this function, not normalised). The new tokens are
            positions ``T .. T + N - 1`` and mix with all ``T + N`` tokens (causally: with those up
            to themselves); the result equals the full ``T + N`` sequence's, sliced to them.
    Returns ``[B, N, E]`` (rows still sum to 1). No ``N x N`` tensor: ``S p`` is an attention with
    ``q = f`` (the new tokens), ``k = f`` (all tokens) and ``v = p`` (a chunk of ``N > 1`` new tokens
    after ``T > 0`` earlier ones builds a boolean ``[N, T + N]`` mask).
    """
    _check_probs3(probs)
    _check(features.dim() == 3 and features.shape[:2] == probs.shape[:2],
           f"features must be [batch, seq, dim] matching probs {list(probs.shape[:2])}, got {list(features.shape)}.")
    _check(temperature > 0, f"temperature must be > 0, got {temperature}.")
    _check((past_probs is None) == (past_features is None),
           "give both past_probs and past_features (the earlier tokens' gate distributions and features), or neither.")
    v = _past_probs(probs, past_probs).unsqueeze(1)  # [B, 1, T + N, E]
    f_new = F.normalize(features.to(probs.dtype), dim=-1).unsqueeze(1)  # [B, 1, N, d]
    f_all = f_new
    if past_features is not None:
        (B, _, d), T = features.shape, past_probs.shape[1]
        _check(isinstance(past_features, Tensor) and past_features.shape == (B, T, d),
               f"past_features must be [batch={B}, cached={T}, dim={d}] (as past_probs, with the features' dim), "
               f"got {list(getattr(past_features, 'shape', []))}.")
        f_all = torch.cat([F.normalize(past_features.to(probs.dtype), dim=-1).unsqueeze(1), f_new], 2)
    mixed = _attend_values(f_new, f_all, v, causal=causal, scale=1.0 / temperature)
    return _mix(probs, mixed.squeeze(1), mix)


def attention_mixed_probs(probs: Tensor, *, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                          attn_weights: Optional[Tensor] = None, causal: bool, scale: Optional[float] = None,
                          mix: float = 0.5, past_probs: Optional[Tensor] = None) -> Tensor:
    """Attention-aware gate distributions ``(1 - mix) p + mix A p``, ``A`` the preceding attention
    layer's attention averaged over heads.

    Args:
        probs: ``[B, N, E]`` gate distributions (rows sum to 1) of the ``N`` (new) tokens.
        q, k: ``q [B, Hq, N, D]`` of the new tokens and ``k [B, Hkv, T + N, D]`` of all tokens
            (``Hkv`` divides ``Hq``); ``A`` is recomputed inside an attention pass with ``v = p``,
            never stored: ``mean_h A_h p = mean_h softmax(q_h k_h^T scale) p``. Detach them to keep
            the router's gradient out of the attention layer.
        attn_weights: instead of ``q``/``k``, an attention matrix that was materialised anyway,
            ``[B, H, N, T + N]``; with ``causal`` its future entries are masked out and rows
            renormalised.
        causal: token ``i`` mixes only tokens ``j <= i``.
        scale: of ``q k^T``; default ``D ** -0.5``.
        mix: the mixing weight.
        past_probs: the unmixed gate distributions ``[B, T, E]`` of ``T`` earlier tokens (KV-cache
            decoding, chunked prefill; None: ``T = 0``). The new tokens are positions
            ``T .. T + N - 1`` (the causal mask is bottom-right aligned); the result equals the full
            ``T + N`` sequence's, sliced to them.
    Returns ``[B, N, E]``.
    """
    _check_probs3(probs)
    B, N, E = probs.shape
    values = _past_probs(probs, past_probs)  # [B, T + N, E]
    L = values.shape[1]
    if attn_weights is not None:
        _check(q is None and k is None, "give either q and k or attn_weights, not both.")
        _check(attn_weights.dim() == 4 and attn_weights.shape[0] == B and attn_weights.shape[2:] == (N, L),
               f"attn_weights must be [batch={B}, heads, {N}, {L}] (new tokens x earlier + new tokens), got "
               f"{list(attn_weights.shape)}.")
        a = attn_weights.to(probs.dtype).mean(1)  # [B, N, T + N]
        if causal:
            a = a.tril(L - N)
            a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        return _mix(probs, a @ values, mix)
    _check(q is not None and k is not None, "attention-aware routing needs the preceding attention's q and k "
           "(or its attn_weights).")
    _check(q.dim() == 4 and k.dim() == 4 and q.shape[0] == B and q.shape[2] == N and k.shape[2] == L
           and k.shape[0] == B and q.shape[3] == k.shape[3],
           f"q must be [batch={B}, heads, seq={N}, dim] and k [batch, kv_heads, {'' if L == N else 'cached + '}"
           f"seq={L}, dim]; got {list(q.shape)} and {list(k.shape)}.")
    hq, hkv = q.shape[1], k.shape[1]
    _check(hq % hkv == 0, f"k's heads ({hkv}) must divide q's heads ({hq}).")
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=1)
    v = values.to(q.dtype).unsqueeze(1).expand(B, hq, L, E)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mixed = _attend_values(q, k, v, causal=causal, scale=scale).mean(1)
    return _mix(probs, mixed.to(probs.dtype), mix)


# ---------------------------------------------------------------------------------------------------
# Load balancing
def switch_aux_loss(probs: Tensor, route: ExpertRoute) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``: ``f_e`` the slots routed to ``e`` per
    token (summing to ``k``), ``P_e`` the mean probability of ``e``. Equals Hugging Face's
    ``load_balancing_loss_func`` on the same route; 1 per slot when perfectly balanced. Gradient
    flows through ``P``."""
    _check(probs.dim() == 2 and probs.shape == (route.num_tokens, route.num_experts),
           f"probs must be [{route.num_tokens}, {route.num_experts}], got {list(probs.shape)}.")
    T = max(route.num_tokens, 1)
    f = route.counts.to(probs.dtype) / T
    return route.num_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (in float32)."""
    _check_logits(logits)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


@torch.no_grad()
def update_selection_bias(bias: Tensor, counts: Tensor, rate: float) -> Tensor:
    """Auxiliary-loss-free balancing step, in place and outside autograd:
    ``bias += rate * sign(mean load - load)`` (over-loaded experts get chosen less). Returns ``bias``."""
    load = counts.to(bias.dtype)
    bias.add_(rate * torch.sign(load.mean() - load))
    return bias


# ---------------------------------------------------------------------------------------------------
@dataclass
class RouterOutput:
    """What an :class:`ExpertRouter` call produced.

    Attributes:
        route: the :class:`~routed.route.ExpertRoute` over the flattened ``T`` tokens.
        logits: ``[T, E]`` raw router logits.
        probs: ``[T, E]`` the distribution experts were chosen from (after similarity/attention
            mixing for those routers).
        gate_probs: the mixing routers only (else None): the unmixed gate distributions
            ``softmax(logits)`` as ``[B, N, E]``, what a later call of the same sequences takes as
            ``past_probs`` (concatenated after the earlier ones) to continue them exactly.
        features: the similarity router only (else None): the tokens' features ``[B, N, d]``
            (before normalisation), a later call's ``past_features``.

    The load-balancing terms and metrics are computed when first read (so a layer that does not
    use them launches no kernels for them): :attr:`aux_loss` (Switch), :attr:`z_loss`,
    :attr:`load` (``[E]`` fraction of live slots per expert), :attr:`entropy` (mean entropy of
    ``probs``, nats) and :attr:`gate_entropy` (of ``softmax(logits)``, before any mixing: the same
    quantity for every method, where :attr:`entropy` of a mixing router measures the mixture,
    which averaging distributions raises) and :attr:`top1_margin` (of ``probs``).
    """

    route: ExpertRoute
    logits: Tensor
    probs: Tensor
    gate_probs: Optional[Tensor] = None
    features: Optional[Tensor] = None

    @functools.cached_property
    def aux_loss(self) -> Tensor:
        return switch_aux_loss(self.probs, self.route)

    @functools.cached_property
    def z_loss(self) -> Tensor:
        return router_z_loss(self.logits)

    @functools.cached_property
    def load(self) -> Tensor:
        return self.route.counts.float() / max(self.route.num_assignments, 1)

    @functools.cached_property
    def entropy(self) -> Tensor:
        return _mean_entropy(self.probs)

    @functools.cached_property
    def gate_entropy(self) -> Tensor:
        return _mean_entropy(self.logits.float().softmax(-1))

    @functools.cached_property
    def top1_margin(self) -> Tensor:
        """Mean over tokens of ``probs``' largest minus second-largest entry (0 with one expert): how
        far the top-1 choice is from flipping."""
        if self.probs.shape[-1] < 2:
            return self.probs.new_zeros(())
        top2 = self.probs.float().topk(2, dim=-1).values
        return (top2[..., 0] - top2[..., 1]).mean()


def _mean_entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-20).log()).sum(-1).mean()


class ExpertRouter(nn.Module):
    """A learned router: ``logits = x @ weight.T``, then one of :data:`ROUTER_METHODS`.

    Args:
        hidden_size, num_experts, top_k: router input size, experts, experts per token (for expert
            choice, the average experts per token that sets the capacity).
        method: ``"token_choice"``, ``"expert_choice"``, ``"similarity"`` or ``"attention"``.
        score_order: token choice: ``"softmax_topk"`` or ``"topk_softmax"``.
        normalize: renormalise the chosen probabilities (``softmax_topk`` and the mixing routers);
            None: when ``top_k > 1`` (a single renormalised weight is a constant 1, which gives the
            router no gradient).
        capacity_factor: slots per expert as a multiple of the balanced load; None = no dropping
            (expert choice then uses 1.0).
        causal: the mixing routers look only at earlier tokens. Expert choice cannot be causal and
            raises unless ``causal=False``.
        similarity_dim, temperature, mix: the similarity router's feature size (a learned
            projection of ``x``; 0: the router input ``x`` itself, which adds no parameters), its
            softmax temperature and the mixing weight; ``mix`` also serves the attention router.
        balance_bias_rate: > 0 turns on auxiliary-loss-free balancing: in training mode, after
            each call the selection bias moves by this rate (DeepSeek-V3 uses 1e-3).
        router_backend: the top-k and expert sort: ``"triton"`` (one fused route kernel),
            ``"reference"`` (PyTorch) or None (the kernel on CUDA GPUs); see
            :func:`routed.ops.expert_topk.expert_topk_route`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2, *, method: str = "token_choice",
                 score_order: str = "softmax_topk", normalize: Optional[bool] = None,
                 capacity_factor: Optional[float] = None,
                 causal: bool = True, similarity_dim: int = 64, temperature: float = 0.1, mix: float = 0.5,
                 balance_bias_rate: float = 0.0, router_backend: Optional[str] = None):
        super().__init__()
        _check(method in ROUTER_METHODS, f"method must be one of {ROUTER_METHODS}, got {method!r}.")
        _check(score_order in SCORE_ORDERS, f"score_order must be one of {SCORE_ORDERS}, got {score_order!r}.")
        _check(isinstance(top_k, int) and 1 <= top_k <= num_experts,
               f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}.")
        _check(not (method == "expert_choice" and causal),
               "expert-choice routing is not causal (each expert ranks all tokens, later ones included); pass "
               "causal=False to accept that, or use a token-choice router in a causal LM.")
        _check(capacity_factor is None or capacity_factor > 0, f"capacity_factor must be > 0, got {capacity_factor}.")
        _check(0.0 <= mix <= 1.0 and temperature > 0, f"need 0 <= mix <= 1 and temperature > 0, got {mix}, {temperature}.")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.method, self.score_order = method, score_order
        self.normalize = top_k > 1 if normalize is None else normalize
        self.capacity_factor, self.causal = capacity_factor, causal
        self.temperature, self.mix, self.balance_bias_rate = temperature, mix, balance_bias_rate
        _check(router_backend in (None, "triton", "reference"),
               f"router_backend must be 'triton', 'reference' or None, got {router_backend!r}.")
        self.router_backend = router_backend
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        _check(isinstance(similarity_dim, int) and similarity_dim >= 0,
               f"similarity_dim must be an int >= 0 (0: use x itself as the features), got {similarity_dim!r}.")
        self.sim_proj = (nn.Linear(hidden_size, similarity_dim, bias=False)
                         if method == "similarity" and similarity_dim > 0 else None)
        self.register_buffer("selection_bias", torch.zeros(num_experts), persistent=True)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"method={self.method!r}, causal={self.causal}, capacity_factor={self.capacity_factor}")

    def _bias(self) -> Optional[Tensor]:
        return self.selection_bias if self.balance_bias_rate > 0 else None

    def forward(self, x: Tensor, *, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                attn_weights: Optional[Tensor] = None, past_probs: Optional[Tensor] = None,
                past_features: Optional[Tensor] = None) -> RouterOutput:
        """Route ``x [B, N, H]`` (or ``[T, H]``, one sequence). The attention router needs the preceding
        attention's ``q [B, Hq, N, D]`` and ``k [B, Hkv, N, D]`` or its ``attn_weights``.

        To continue sequences whose first ``T`` tokens an earlier call routed (KV-cache decoding,
        chunked prefill), the mixing routers take those tokens' state: ``past_probs [B, T, E]`` (the
        earlier calls' :attr:`RouterOutput.gate_probs`, concatenated) and, for the similarity router,
        ``past_features [B, T, d]`` (their :attr:`RouterOutput.features`); the attention router's
        ``k`` (or ``attn_weights``) then covers all ``T + N`` tokens. The new tokens are then routed as
        the full sequence would route them. Token choice needs no state; expert choice and a capacity
        depend on every token of the call, so they refuse it."""
        _check(x.dim() in (2, 3) and x.shape[-1] == self.hidden_size,
               f"x must be [batch, seq, {self.hidden_size}] or [tokens, {self.hidden_size}], got {list(x.shape)}.")
        if past_probs is not None or past_features is not None:
            _check(self.method in ("similarity", "attention"),
                   f"past_probs/past_features continue the similarity and attention routers; the {self.method} "
                   "router takes no earlier state.")
            _check(self.capacity_factor is None,
                   f"a capacity (capacity_factor={self.capacity_factor}) depends on every token of the call, so the "
                   "router cannot continue from earlier tokens' state; use capacity_factor=None.")
        x3 = x if x.dim() == 3 else x.unsqueeze(0)
        B, N, _ = x3.shape
        T = B * N
        logits = F.linear(x3, self.weight.to(x.dtype)).reshape(T, self.num_experts)
        E, kk = self.num_experts, self.top_k
        cap = None if self.capacity_factor is None else expert_capacity(T, kk, E, self.capacity_factor)
        gate_probs = feats = None
        if self.method == "token_choice":  # token_choice_route, keeping the softmax it computes
            route, probs = expert_topk_route(logits, kk, mode=self.score_order, normalize=self.normalize,
                                             selection_bias=self._bias(), backend=self.router_backend)
            if cap is not None:
                route = apply_capacity(route, cap)
        elif self.method == "expert_choice":
            cap = min(T, cap if cap is not None else expert_capacity(T, kk, E, 1.0))
            route = expert_choice_route(logits, cap, selection_bias=self._bias())
            probs = logits.float().softmax(-1)
        else:
            gate_probs = p = logits.float().softmax(-1).view(B, N, E)
            if self.method == "similarity":
                _check(q is None and k is None and attn_weights is None,
                       "the similarity router takes no attention inputs; use method='attention' for those.")
                feats = x3 if self.sim_proj is None else self.sim_proj(x3)
                probs = similarity_mixed_probs(p, feats, causal=self.causal, temperature=self.temperature,
                                               mix=self.mix, past_probs=past_probs, past_features=past_features)
            else:
                _check(past_features is None, "the attention router takes no past_features (only past_probs).")
                if q is not None:
                    q = q if q.dim() == 4 else q.unsqueeze(0)
                    k = k if k is None or k.dim() == 4 else k.unsqueeze(0)
                probs = attention_mixed_probs(p, q=q, k=k, attn_weights=attn_weights, causal=self.causal,
                                              mix=self.mix, past_probs=past_probs)
            probs = probs.reshape(T, E)
            route = topk_route_from_probs(probs, kk, normalize=self.normalize, selection_bias=self._bias(),
                                          capacity=cap, backend=self.router_backend)
        if self.training and self.balance_bias_rate > 0:
            update_selection_bias(self.selection_bias, route.counts, self.balance_bias_rate)
        return RouterOutput(route, logits, probs, gate_probs, feats)
