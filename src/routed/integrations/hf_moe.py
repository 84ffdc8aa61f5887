"""Hugging Face plug-in for mixture-of-experts models (Mixtral, Qwen2-MoE and other transformers 5.x
models whose sparse block holds a ``gate`` top-k router and a fused ``experts`` module).

* :func:`swap_moe_routers` turns every ``*TopKRouter`` of a model into a routed router, in place,
  keeping its weight. The module stays an instance of its original class (a subclass is swapped in),
  so the model still records ``router_logits`` and computes its auxiliary loss as before. With
  ``method="token_choice"`` the routing is the model's own, bit for bit.
* :func:`use_routed_experts` runs the experts through :func:`routed.ops.expert_dispatch.expert_mlp`
  (sorted, grouped GEMM) by registering a ``"routed"`` experts implementation.

For the graph-of-tokens routers the router needs the tokens' sequence layout, which a forward
pre-hook on the sparse block supplies. The attention-aware router also needs the attention of the
same decoder layer, in one of two ways (``attention_source``):

* ``"weights"``: the ``[B, H, N, N]`` matrix that ``attn_implementation="eager"`` builds anyway,
  handed over by a forward hook on ``self_attn``.
* ``"qk"``: for every other implementation (SDPA, flash, routed), which never build that matrix,
  the model's attention implementation is wrapped (registered as ``routed_moe_qk_<name>``, with
  the same mask function) so that it also hands the layer's post-RoPE ``q`` and ``k`` to the router,
  which recomputes ``mean_h A_h p`` as one attention pass with the gate distributions as values:
  ``O(N max(d, E))`` memory per head, no ``N x N`` tensor, about ``4 N^2 max(d, E)`` FLOPs per
  head (half when causal) on top of the layer's own attention.

``"auto"`` (the default) takes ``"weights"`` under eager attention and ``"qk"`` otherwise. Either
needs the whole sequence in one call: with a KV cache (decoding) the router has no gate
distributions for the cached tokens and raises. The ``router_logits`` of a mixing router are ``log(p~)``, the log of the mixed
distribution experts were picked from, so that the model's auxiliary loss sees the real routing.
The mixing runs over every token of a row, padding included (causal mixing keeps right padding out
of the real tokens).
"""

from __future__ import annotations

import re
import sys
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.expert_dispatch import expert_mlp
from ..route import ExpertRoute, RouteError
from ..routers.experts import (ROUTER_METHODS, attention_mixed_probs, expert_capacity, expert_choice_route,
                               similarity_mixed_probs, token_choice_route, topk_route_from_probs,
                               update_selection_bias)

__all__ = ["swap_moe_routers", "use_routed_experts", "is_hf_topk_router"]

_SUBCLASSES: dict[type, type] = {}


def is_hf_topk_router(module: nn.Module) -> bool:
    """A transformers top-k router: a ``*TopKRouter`` with ``weight [E, H]``, ``top_k``, ``num_experts``
    and ``hidden_dim`` (Mixtral's and Qwen2-MoE's in transformers 5.x)."""
    return (type(module).__name__.endswith("TopKRouter")
            and all(hasattr(module, a) for a in ("top_k", "num_experts", "hidden_dim"))
            and isinstance(getattr(module, "weight", None), nn.Parameter))


class _RoutedRouterMixin:
    """Forward of a swapped-in router. Returns what the transformers router returns:
    ``(router_logits [T, E], scores [T, k], indices [T, k])``; empty slots (capacity, expert choice)
    get score 0 and index ``E`` when the block's experts implementation skips it (eager, routed),
    else index 0."""

    def forward(self, hidden_states: Tensor):  # noqa: D401
        h = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(h, self.weight)
        E, k = self.num_experts, self.top_k
        opts = self._routed_opts
        method = opts["method"]
        T = h.shape[0]
        cap = None if opts["capacity_factor"] is None else expert_capacity(T, k, E, opts["capacity_factor"])
        out_logits = logits
        bias = self.routed_selection_bias if opts["balance_bias_rate"] > 0 else None
        if method == "token_choice":
            route = token_choice_route(logits, k, score_order=opts["score_order"], normalize=self._routed_normalize,
                                       selection_bias=bias, capacity=cap, backend=opts.get("router_backend"))
        elif method == "expert_choice":
            route = expert_choice_route(logits, min(T, cap or expert_capacity(T, k, E, 1.0)), selection_bias=bias)
        else:
            bn = self.__dict__.pop("_routed_bn", None)
            if hidden_states.dim() == 3:
                bn = tuple(hidden_states.shape[:2])
            if bn is None or bn[0] * bn[1] != T:
                raise RouteError(f"the {method} router needs the tokens' [batch, seq] layout to mix along sequences: "
                                 f"got {T} flattened tokens and {'no layout' if bn is None else list(bn)}; call the "
                                 "sparse block (its hook supplies the layout) or pass [batch, seq, hidden].")
            B, N = bn
            p = logits.float().softmax(-1).view(B, N, E)
            if method == "similarity":
                feats = F.linear(h.view(B, N, -1), self.routed_sim_proj.to(h.dtype))
                probs = similarity_mixed_probs(p, feats, causal=opts["causal"], temperature=opts["temperature"],
                                               mix=opts["mix"])
            else:
                attn = self.__dict__.pop("_routed_attn", None)
                qk = self.__dict__.pop("_routed_qk", None)
                if attn is None and qk is None:
                    raise RouteError("the attention-aware router got nothing from this layer's self_attn: with "
                                     "attention_source='weights' load the model with attn_implementation='eager' "
                                     "(SDPA and flash attention never build the attention matrix), or swap with "
                                     "attention_source='qk' (or 'auto').")
                if qk is not None:
                    q, key, scale = qk
                    if key.shape[2] != N:
                        raise RouteError(f"attention-aware routing saw {key.shape[2]} keys for {N} queries: with a KV "
                                         "cache the router has no gate distributions for the cached tokens; run the "
                                         "whole sequence at once (use_cache=False).")
                    probs = attention_mixed_probs(p, q=q, k=key, causal=opts["causal"], scale=scale, mix=opts["mix"])
                else:
                    if attn.shape[-1] != N:
                        raise RouteError(f"attention-aware routing saw attention over {attn.shape[-1]} keys for {N} "
                                         "queries: with a KV cache the router has no gate distributions for the "
                                         "cached tokens; run the whole sequence at once (use_cache=False).")
                    probs = attention_mixed_probs(p, attn_weights=attn, causal=opts["causal"], mix=opts["mix"])
            probs = probs.reshape(T, E)
            route = topk_route_from_probs(probs, k, normalize=self._routed_normalize, selection_bias=bias,
                                          capacity=cap, backend=opts.get("router_backend"))
            out_logits = probs.clamp_min(1e-20).log().to(logits.dtype)
        cached = self.__dict__.pop("_routed_cached_len", 0)
        if cached and (method in ("similarity", "expert_choice") or cap is not None):
            raise RouteError(f"the {method} router (capacity_factor={opts['capacity_factor']}) routes a token using the "
                             f"other tokens of the sequence, but this call comes after {cached} cached tokens whose gate "
                             "distributions it does not have: the routing would differ from a full forward. Run the "
                             "whole sequence at once (generate(..., use_cache=False)), or use token_choice without a "
                             "capacity, which decodes exactly.")
        if bias is not None and self.training:
            update_selection_bias(self.routed_selection_bias, route.counts, opts["balance_bias_rate"])
        self.last_route = route
        # Empty slots (capacity, expert choice): index E where the experts implementation skips it;
        # otherwise expert 0 with score 0 (transformers' grouped_mm leaves index-E rows uninitialised
        # and batched_mm indexes out of range, outside expert parallelism).
        skips_sentinel = self.__dict__.pop("_routed_skips_sentinel", False)
        empty = torch.full_like(route.expert_ids.long(), E if skips_sentinel else 0)
        idx = torch.where(route.expert_ids >= 0, route.expert_ids.long(), empty)
        scores = route.weights
        if self._routed_cast_scores:
            scores = scores.to(logits.dtype)
        return out_logits, scores, idx


def _routed_class(base: type) -> type:
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Routed{base.__name__}", (_RoutedRouterMixin, base), {})
    return _SUBCLASSES[base]


# experts implementations that skip slots with index num_experts (transformers' batched_mm and
# grouped_mm do so only under expert parallelism)
_SENTINEL_SKIPPING_EXPERTS = ("eager", "routed")


def _block_pre_hook(block: nn.Module, args, kwargs):
    experts_config = getattr(getattr(block, "experts", None), "config", None)
    impl = getattr(experts_config, "_experts_implementation", None)
    block.gate._routed_skips_sentinel = impl in _SENTINEL_SKIPPING_EXPERTS
    x = args[0] if args else kwargs["hidden_states"]
    if x.dim() == 3:
        block.gate._routed_bn = (x.shape[0], x.shape[1])


def _decoder_pre_hook(layer: nn.Module, args, kwargs):
    """Tell the layer's router how many tokens the KV cache held before this call (host-side; no sync)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    idx = getattr(getattr(layer, "self_attn", None), "layer_idx", 0)
    layer.mlp.gate._routed_cached_len = cache.get_seq_length(idx) if cache is not None else 0


def _attn_hook(gate: nn.Module):
    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is not None:
            gate._routed_attn = weights
    return hook


def swap_moe_routers(model: nn.Module, method: str = "token_choice", *, score_order: str = "softmax_topk",
                     capacity_factor: Optional[float] = None, causal: bool = True, similarity_dim: int = 64,
                     temperature: float = 0.1, mix: float = 0.5, attention_source: str = "auto",
                     balance_bias_rate: float = 0.0, router_backend: Optional[str] = None) -> list[nn.Module]:
    """Replace, in place, the routing of every transformers top-k router in ``model``.

    Args:
        method: one of ``"token_choice"``, ``"expert_choice"``, ``"similarity"``, ``"attention"``
            (see :mod:`routed.routers.experts`); the router's weight, ``top_k`` and (Qwen)
            ``norm_topk_prob`` are kept.
        score_order, capacity_factor, causal, temperature, mix: as for
            :class:`routed.routers.experts.ExpertRouter`.
        similarity_dim: size of the new (trainable, randomly initialised) feature projection of the
            similarity router, ``routed_sim_proj [similarity_dim, H]``.
        attention_source: the attention router's input: ``"weights"``, ``"qk"`` or ``"auto"`` (see
            the module docstring). ``"qk"`` changes ``model.config._attn_implementation`` to a
            wrapper of the current one.
        balance_bias_rate: > 0 turns on auxiliary-loss-free balancing: a per-expert selection bias
            (buffer ``routed_selection_bias``, saved with the model) added to the scores only to
            choose experts, moved by this rate after each training-mode call (DeepSeek-V3: 1e-3).
        router_backend: the top-k and expert sort: ``"triton"`` (the fused route kernel, the default on
            CUDA GPUs), ``"reference"`` (PyTorch: with ``"token_choice"`` the model's own routing bit
            for bit) or None.
    Returns the swapped routers (each records its last :class:`~routed.route.ExpertRoute` in
    ``last_route``). Raises if the model has none.
    """
    if method not in ROUTER_METHODS:
        raise RouteError(f"method must be one of {ROUTER_METHODS}, got {method!r}.")
    if router_backend not in (None, "triton", "reference"):
        raise RouteError(f"router_backend must be 'triton', 'reference' or None, got {router_backend!r}.")
    if attention_source not in ("auto", "weights", "qk"):
        raise RouteError(f"attention_source must be 'auto', 'weights' or 'qk', got {attention_source!r}.")
    if method == "expert_choice" and causal:
        raise RouteError("expert-choice routing is not causal (each expert ranks all tokens); pass causal=False to "
                         "accept that.")
    swapped = []
    for name, block in model.named_modules():
        gate = getattr(block, "gate", None)
        if gate is None or not is_hf_topk_router(gate):
            continue
        base = type(gate) if not isinstance(gate, _RoutedRouterMixin) else type(gate).__mro__[2]
        gate.__class__ = _routed_class(base)
        # Mixtral always renormalises the top-k probabilities and returns float32 scores; Qwen-MoE
        # renormalises when norm_topk_prob and casts the scores to the logits' dtype.
        gate._routed_normalize = bool(getattr(gate, "norm_topk_prob", True))
        gate._routed_cast_scores = hasattr(gate, "norm_topk_prob")
        gate._routed_opts = dict(method=method, score_order=score_order, capacity_factor=capacity_factor,
                                 causal=causal, temperature=temperature, mix=mix, balance_bias_rate=balance_bias_rate,
                                 router_backend=router_backend)
        if balance_bias_rate > 0 and not hasattr(gate, "routed_selection_bias"):
            gate.register_buffer("routed_selection_bias", torch.zeros(gate.num_experts, device=gate.weight.device))
        if method == "similarity" and not hasattr(gate, "routed_sim_proj"):
            w = torch.empty(similarity_dim, gate.hidden_dim, device=gate.weight.device, dtype=gate.weight.dtype)
            gate.routed_sim_proj = nn.Parameter(nn.init.normal_(w, std=gate.hidden_dim ** -0.5))
        if not getattr(block, "_routed_hooked", False):
            block.register_forward_pre_hook(_block_pre_hook, with_kwargs=True)
            block._routed_hooked = True
        swapped.append(gate)
    for layer in model.modules():  # decoder layers: their kwargs say whether a KV cache holds earlier tokens
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if isinstance(gate, _RoutedRouterMixin) and not getattr(layer, "_routed_cache_hooked", False):
            layer.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True)
            layer._routed_cache_hooked = True
    if not swapped:
        raise RouteError(f"{type(model).__name__} has no transformers top-k router (a module '.gate' of a class "
                         "named '*TopKRouter'); nothing to swap.")
    if method == "attention":
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attention_source == "auto":
            attention_source = "weights" if impl in (None, "eager") else "qk"
        _hook_attention(model, attention_source)
        if attention_source == "qk":
            _use_qk_capturing_attention(model)
    return swapped


# attention module -> the router of its decoder layer (weak keys: no reference cycle, nothing in
# the model's state_dict, unlike an attribute holding the router module)
_QK_GATES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
QK_PREFIX = "routed_moe_qk_"


def _hook_attention(model: nn.Module, source: str) -> None:
    """Connect each decoder layer's attention to the router of the same layer."""
    hooked = 0
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None)
        if attn is None or gate is None or not isinstance(gate, _RoutedRouterMixin):
            continue
        if source == "qk":
            _QK_GATES[attn] = gate
        elif not getattr(attn, "_routed_attn_hooked", False):
            attn.register_forward_hook(_attn_hook(gate))
            attn._routed_attn_hooked = True
        hooked += 1
    if not hooked:
        raise RouteError("attention-aware routing needs decoder layers with 'self_attn' and an 'mlp' holding the "
                         "router; none found.")


def _qk_capturing(base: str):
    """An attention implementation that runs ``base`` and hands q, k (and the scale) to the layer's router."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(module, query, key, value, attention_mask, **kwargs):
        gate = _QK_GATES.get(module)
        if gate is not None:
            gate._routed_qk = (query, key, kwargs.get("scaling"))
        if base == "eager":  # eager is each model's own function, not in the registry
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return forward


def _use_qk_capturing_attention(model: nn.Module) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    base = model.config._attn_implementation or "eager"
    if base.startswith(QK_PREFIX):
        return
    name = QK_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", base)
    AttentionInterface.register(name, _qk_capturing(base))
    if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:  # the same masks as the wrapped implementation
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)


def _routed_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """A transformers experts forward through routed's sorted dispatch (index ``E`` = empty slot)."""
    if getattr(self, "has_bias", False) or getattr(self, "is_transposed", False) or not getattr(self, "has_gate", True) \
            or not getattr(self, "is_concatenated", True) or getattr(self, "has_post_expert_norm", False):
        raise RouteError(f"{type(self).__name__} uses a layout routed's dispatch does not cover (biases, transposed, "
                         "interleaved or gate-less experts); keep its own experts implementation.")
    E = self.num_experts
    ids = torch.where(top_k_index >= E, torch.full_like(top_k_index, -1), top_k_index)
    route = ExpertRoute.from_expert_ids(ids, top_k_weights, E, all_live=not bool((top_k_index >= E).any()),
                                        validate=False)
    x = hidden_states
    backend = getattr(self, "routed_backend", None)
    y = expert_mlp(x, route, self.gate_up_proj.to(x.dtype), self.down_proj.to(x.dtype), backend=backend,
                   act=self.act_fn)
    return y.to(hidden_states.dtype)


def use_routed_experts(model: nn.Module, backend: Optional[str] = None) -> int:
    """Run every transformers experts module of ``model`` through routed's dispatch (``backend`` as for
    :func:`~routed.ops.expert_dispatch.expert_mlp`). Returns how many experts modules now use it."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS["routed"] = _routed_experts_forward
    n = 0
    for m in model.modules():
        if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj") and hasattr(m, "num_experts"):
            m.routed_backend = backend
            n += 1
    if not n:
        raise RouteError(f"{type(model).__name__} has no transformers experts module (gate_up_proj, down_proj).")
    model.config._experts_implementation = "routed"
    return n
