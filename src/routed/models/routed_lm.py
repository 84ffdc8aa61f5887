"""A small decoder-only language model whose attention is chosen per layer.

``RoutedLMConfig(attention_types=["dense", "moba", "nsa", ...])`` builds layer ``i`` from
``routed.layers.registry.attention_class(attention_types[i])``: dense, sliding window, MoBA and NSA
ship here, and any layer registered later (k-means routing, MoSA, ...) plugs in by its name.
The rest is a Llama-style block: RMSNorm, rotary embeddings, SwiGLU MLP, tied embeddings.

``mlp_types=["dense", "moe", ...]`` turns a layer's MLP into a :class:`~routed.layers.moe.RoutedMoE`
(``num_experts`` SwiGLU experts, ``num_experts_per_tok`` per token) routed by ``expert_router``:
token choice, expert choice, or the similarity- and attention-aware routers; the attention-aware
one reads the same block's attention (its ``q``/``k``, so no ``N x N`` matrix is built). The MoE
layers' balancing losses join ``aux_loss``::

    config = RoutedLMConfig(hidden_size=256, num_hidden_layers=4, mlp_types="moe", num_experts=8,
                            num_experts_per_tok=2, expert_router="attention")

It follows transformers' conventions (``PreTrainedConfig`` / ``PreTrainedModel`` /
``GenerationMixin``, a ``DynamicCache``), so ``save_pretrained``, ``from_pretrained`` and
``generate()`` work (and ``AutoModelForCausalLM``, once this module is imported)::

    config = RoutedLMConfig(vocab_size=50257, hidden_size=512, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=2, attention_types=["moba"] * 8)
    model = RoutedLMForCausalLM(config)
    out = model(input_ids, labels=input_ids)        # out.loss, out.logits [B, N, vocab]
    ids = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)

Padding is not supported (every sequence of a batch has the same length); an ``attention_mask``
with zeros raises.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# Importing a layer module registers its names: dense, sliding_window, moba (lm_attention), nsa,
# mosa, routing.
from ..layers import lm_attention, mosa, nsa, routing_attention  # noqa: F401
from ..layers.lm_attention import LMAttention
from ..layers.moe import RoutedMoE
from ..layers.kv_cache import cache_keys, key_change
from ..layers.registry import attention_class
from ..routers.experts import ROUTER_METHODS, SCORE_ORDERS, ExpertRouter

__all__ = ["RoutedLMConfig", "RoutedLMModel", "RoutedLMForCausalLM", "MLP_TYPES"]

MLP_TYPES = ("dense", "moe")

# Newer transformers name the output's cache field "cache", older ones "past_key_values";
# generate() reads the one its version defines (the GPU machine may run another version).
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


@dataclass
class RoutedLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``aux_loss``: the sum of the layers' auxiliary losses
    (k-means commitment, MoSA's rate loss, the MoE layers' Switch and z losses, ...), or None. Training code that computes its own
    cross-entropy from ``logits`` must add it (``loss`` already includes it)."""

    aux_loss: Optional[Tensor] = None


class RoutedLMConfig(PretrainedConfig):
    """Configuration of :class:`RoutedLMForCausalLM`.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads: the usual.
        num_key_value_heads: KV heads (GQA; default: as many as query heads).
        head_dim: default ``hidden_size // num_attention_heads``.
        intermediate_size: SwiGLU width (default ``8/3 * hidden_size`` rounded up to 64).
        max_position_embeddings: the longest sequence the model is meant for (routers check
            their top-k against its number of blocks).
        rope_theta: rotary base.
        attention_types: one registered attention name per layer (default all ``"dense"``); a
            single string is repeated for every layer. (Not ``layer_types``: transformers reserves
            that name for cache kinds and validates it; here it is ``"full_attention"`` for every
            layer, since every layer keeps its whole KV cache. ``layer_types`` holding attention
            names is accepted as an alias.)
        attention_block_size, route_q_block_size, window_blocks, moba_top_k, moba_sink_blocks,
        moba_local_blocks, moba_heads, nsa_compress_block, nsa_compress_stride, nsa_top_n,
        nsa_sink_blocks, nsa_local_blocks, nsa_window_blocks: the attention layers' options (see
            :mod:`routed.layers.lm_attention` and :mod:`routed.layers.nsa`).
        attention_dense: run every routed layer in its dense mode (ablations).
        attention_backend, router_backend: backends of the attention op and of the routers'
            scoring (None: automatic).
        mlp_types: ``"dense"`` (SwiGLU of ``intermediate_size``) or ``"moe"`` per layer (default
            all dense); one string (or a comma list) for all layers.
        num_experts, num_experts_per_tok: the MoE layers' experts ``E`` and experts per token ``k``.
        moe_intermediate_size: each expert's SwiGLU width (default ``intermediate_size // k``: the
            same active parameters as the dense MLP).
        expert_router: ``"token_choice"``, ``"expert_choice"``, ``"similarity"`` or ``"attention"``
            (see :class:`~routed.routers.experts.ExpertRouter`). The attention-aware router mixes
            with the same block's attention averaged over heads, recomputed from its ``q``/``k``
            (detached: the router does not train the attention); that layer must be one of
            :mod:`routed.layers.lm_attention`'s (dense, sliding_window, moba, nsa), and the
            mixing uses its dense causal softmax, not a routed layer's sparse one.
        expert_score_order, expert_normalize, expert_capacity_factor, expert_similarity_dim,
        expert_temperature, expert_mix, expert_balance_bias_rate: the router's ``score_order``,
            ``normalize``, ``capacity_factor``, ``similarity_dim``, ``temperature``, ``mix`` and
            ``balance_bias_rate`` (auxiliary-loss-free balancing when > 0).
        router_aux_loss_coef, router_z_loss_coef: weights of the Switch and z losses in ``aux_loss``.
        expert_causal: False admits routers that look at later tokens (expert choice, non-causal
            mixing); the next-token loss then sees the future through the routing (ablations only).
        expert_backend: the expert dispatch backend (None: automatic).

    KV-cache decoding (``generate()``, chunked prefill) gives the full pass's logits with token
    choice and, when causal (``expert_causal``), with the similarity- and attention-aware routers:
    each of their layers keeps, beside the KV cache (weakly keyed on the cache object), the cached
    tokens' unmixed gate distributions (and, for the similarity router, their features), so a call
    of ``N`` new tokens mixes them with all earlier tokens as the full pass does (the attention
    router reads the cached keys from the cache itself); a decode step costs ``O(cached tokens)``
    per layer. The record is checked against the cache layer's key tensor by identity: a crop
    (``cache.crop``) keeps the record's kept prefix, while a cache the layer did not fill (a
    prefill by another model or with ``use_cache`` off in between), reordered (beam search) or
    otherwise replaced raises, since the earlier tokens' gates cannot be rebuilt from the cache.
    A capacity (``expert_capacity_factor``), expert choice and non-causal mixing depend on every
    token of the batch or sequence, so a decoding step past a prefill raises with them;
    ``generate(..., use_cache=False)`` works with every router.
    """

    model_type = "routed_lm"

    def __init__(self, vocab_size: int = 50257, hidden_size: int = 256, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, intermediate_size: Optional[int] = None,
                 max_position_embeddings: int = 4096, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, attention_bias: bool = False, attention_types=None,
                 attention_block_size: int = 64, route_q_block_size: Optional[int] = None, window_blocks: int = 4,
                 moba_top_k: int = 8, moba_sink_blocks: int = 0, moba_local_blocks: int = 1, moba_heads: str = "kv",
                 nsa_compress_block: int = 32, nsa_compress_stride: int = 16, nsa_top_n: int = 8,
                 nsa_sink_blocks: int = 1, nsa_local_blocks: int = 2, nsa_window_blocks: Optional[int] = None,
                 attention_dense: bool = False, attention_backend: Optional[str] = None,
                 router_backend: Optional[str] = None, mlp_types=None, num_experts: int = 8,
                 num_experts_per_tok: int = 2, moe_intermediate_size: Optional[int] = None,
                 expert_router: str = "token_choice", expert_score_order: str = "softmax_topk",
                 expert_normalize: Optional[bool] = None, expert_capacity_factor: Optional[float] = None,
                 expert_similarity_dim: int = 64, expert_temperature: float = 0.1, expert_mix: float = 0.5,
                 expert_balance_bias_rate: float = 0.0, router_aux_loss_coef: float = 0.01,
                 router_z_loss_coef: float = 0.0, expert_causal: bool = True, expert_backend: Optional[str] = None,
                 tie_word_embeddings: bool = True, **kwargs) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.intermediate_size = intermediate_size or -(-(8 * hidden_size // 3) // 64) * 64
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.rms_norm_eps, self.initializer_range, self.attention_bias = rms_norm_eps, initializer_range, attention_bias
        hf_kinds = kwargs.pop("layer_types", None)
        if attention_types is None and hf_kinds is not None and any(t != "full_attention" for t in hf_kinds):
            attention_types = hf_kinds  # attention names given under transformers' name
        if attention_types is None:
            attention_types = ["dense"] * num_hidden_layers
        elif isinstance(attention_types, str):
            attention_types = [attention_types] * num_hidden_layers
        attention_types = list(attention_types)
        if len(attention_types) != num_hidden_layers:
            raise ValueError(f"attention_types has {len(attention_types)} entries but num_hidden_layers="
                             f"{num_hidden_layers}; give one attention name per layer (or one name for all).")
        self.attention_types = attention_types
        self.layer_types = ["full_attention"] * num_hidden_layers  # cache kinds, for transformers
        self.attention_block_size, self.route_q_block_size = attention_block_size, route_q_block_size
        self.window_blocks = window_blocks
        self.moba_top_k, self.moba_sink_blocks = moba_top_k, moba_sink_blocks
        self.moba_local_blocks, self.moba_heads = moba_local_blocks, moba_heads
        self.nsa_compress_block, self.nsa_compress_stride, self.nsa_top_n = (nsa_compress_block, nsa_compress_stride,
                                                                             nsa_top_n)
        self.nsa_sink_blocks, self.nsa_local_blocks = nsa_sink_blocks, nsa_local_blocks
        self.nsa_window_blocks = nsa_window_blocks
        self.attention_dense, self.attention_backend, self.router_backend = (attention_dense, attention_backend,
                                                                             router_backend)
        self.mlp_types = _per_layer(mlp_types, "dense", num_hidden_layers, "mlp_types", MLP_TYPES)
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or max(1, self.intermediate_size // num_experts_per_tok)
        self.expert_router, self.expert_score_order, self.expert_normalize = (expert_router, expert_score_order,
                                                                              expert_normalize)
        self.expert_capacity_factor, self.expert_similarity_dim = expert_capacity_factor, expert_similarity_dim
        self.expert_temperature, self.expert_mix = expert_temperature, expert_mix
        self.expert_balance_bias_rate = expert_balance_bias_rate
        self.router_aux_loss_coef, self.router_z_loss_coef = router_aux_loss_coef, router_z_loss_coef
        self.expert_causal, self.expert_backend = expert_causal, expert_backend
        if "moe" in self.mlp_types:
            _check_moe_options(self)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _per_layer(value, default: str, layers: int, name: str, allowed: tuple[str, ...]) -> list[str]:
    """One name per layer from None (``default``), one name or a comma list (repeated when single)."""
    if value is None:
        value = default
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    value = list(value)
    if len(value) == 1:
        value = value * layers
    if len(value) != layers:
        raise ValueError(f"{name} has {len(value)} entries but num_hidden_layers={layers}; give one per layer "
                         "(or one for all).")
    bad = sorted({v for v in value if v not in allowed})
    if bad:
        raise ValueError(f"unknown {name} {bad}; choose from {list(allowed)}.")
    return value


def _check_moe_options(c: "RoutedLMConfig") -> None:
    """Config-level errors for the MoE fields (named as the config names them)."""
    if c.expert_router not in ROUTER_METHODS:
        raise ValueError(f"expert_router must be one of {list(ROUTER_METHODS)}, got {c.expert_router!r}.")
    if c.expert_score_order not in SCORE_ORDERS:
        raise ValueError(f"expert_score_order must be one of {list(SCORE_ORDERS)}, got {c.expert_score_order!r}.")
    if not (isinstance(c.num_experts, int) and c.num_experts >= 1):
        raise ValueError(f"num_experts must be an int >= 1, got {c.num_experts!r}.")
    if not (isinstance(c.num_experts_per_tok, int) and 1 <= c.num_experts_per_tok <= c.num_experts):
        raise ValueError(f"num_experts_per_tok must be an int in [1, num_experts={c.num_experts}], got "
                         f"{c.num_experts_per_tok!r}.")
    if c.expert_router == "expert_choice" and c.expert_causal:
        raise ValueError("expert_router='expert_choice' is not causal (each expert ranks every token of the batch, "
                         "later ones included), so a causal LM trained with it sees the future; set "
                         "expert_causal=False to accept that (ablations), or use token_choice, similarity or attention.")
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "expert_balance_bias_rate"):
        if getattr(c, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(c, name)}.")


class RotaryEmbedding(nn.Module):
    """``(cos, sin)``, each ``[B, N, head_dim]``, for integer positions ``[B, N]`` (Llama's layout)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_inv_freq()

    @torch.no_grad()
    def reset_inv_freq(self) -> None:
        """Fill the (non-persistent) frequencies; loading a checkpoint re-runs this, since
        from_pretrained builds the model on the meta device where buffers hold no values."""
        d = self.head_dim
        self.inv_freq.copy_(1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                                device=self.inv_freq.device) / d)))

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _moe(config: RoutedLMConfig) -> RoutedMoE:
    return RoutedMoE(config.hidden_size, config.moe_intermediate_size, config.num_experts, config.num_experts_per_tok,
                     router=config.expert_router, aux_loss_coef=config.router_aux_loss_coef,
                     z_loss_coef=config.router_z_loss_coef, backend=config.expert_backend,
                     score_order=config.expert_score_order, normalize=config.expert_normalize,
                     capacity_factor=config.expert_capacity_factor, causal=config.expert_causal,
                     similarity_dim=config.expert_similarity_dim, temperature=config.expert_temperature,
                     mix=config.expert_mix, balance_bias_rate=config.expert_balance_bias_rate)


class _GateRecord(NamedTuple):
    """What a mixing MoE layer keeps beside one KV cache: the cached tokens' routing state."""

    probs: Tensor  # [B, T, E]: unmixed gate distributions of the T cached tokens
    features: Optional[Tensor]  # [B, T, d]: their features (similarity router), else None
    kv_len: int  # T, the cached tokens the record covers
    keys: weakref.ref  # the cache layer's key tensor after the call that wrote the record


class RoutedDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))`` with a dense SwiGLU or a
    :class:`~routed.layers.moe.RoutedMoE` (``config.mlp_types[layer_idx]``). ``forward`` returns
    ``(x [B, N, hidden], aux_loss or None)``."""

    def __init__(self, config: RoutedLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = attention_class(config.attention_types[layer_idx])(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        moe = getattr(config, "mlp_types", ["dense"] * config.num_hidden_layers)[layer_idx] == "moe"
        self.mlp = _moe(config) if moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.routes_by_attention = moe and config.expert_router == "attention"
        if self.routes_by_attention:
            if not isinstance(self.self_attn, LMAttention):
                raise ValueError(f"expert_router='attention' reads the attention's q and k, which layer {layer_idx}'s "
                                 f"{config.attention_types[layer_idx]!r} attention ({type(self.self_attn).__name__}) "
                                 "does not expose; use dense, sliding_window, moba or nsa attention there, or another "
                                 "expert_router.")
            self.self_attn.keep_qk = True
        # Token choice without a capacity routes a token from that token alone; causal mixing (without a
        # capacity) from it and the earlier tokens, whose gates the layer keeps beside the KV cache.
        no_cap = config.expert_capacity_factor is None
        self.mixes_earlier = moe and no_cap and config.expert_causal and config.expert_router in ("similarity",
                                                                                                  "attention")
        self.decodes_incrementally = not moe or self.mixes_earlier or (config.expert_router == "token_choice"
                                                                       and no_cap)
        # The gate record of every live KV cache this layer decodes with (weak keys, as NSA's compressed keys).
        self._gate_records: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def _past_gates(self, cache, cached_len: int) -> Optional[_GateRecord]:
        """The record of the ``cached_len`` tokens ``cache`` holds for this layer (cut to the kept prefix
        after a crop), None when the cache is empty; raises when it does not describe them. Call before
        the attention updates the cache (no reference to the old key tensor is kept)."""
        if cached_len == 0:
            return None
        record = self._gate_records.get(cache)
        keys = cache_keys(cache, self.layer_idx)
        why = None
        if keys is None:
            why = (f"{type(cache).__name__} does not expose its key tensor (cache.layers[i].keys or "
                   "cache.key_cache[i]), so the layer cannot tell whether its record still matches it")
        elif record is None:
            why = "the layer has no record for this cache (it was filled by another model, or by a call without it)"
        elif (change := key_change(keys, record.keys)) == "replaced":
            why = "the cache's keys were replaced since the layer's last call (reorder_cache, batch_select, ...)"
        else:
            if change == "cropped":  # the record's kept prefix is exact
                n = keys.shape[2]
                feats = None if record.features is None else record.features[:, :n]
                record = _GateRecord(record.probs[:, :n], feats, n, weakref.ref(keys))
            if record.kv_len != cached_len or keys.shape[2] != cached_len:
                why = f"the record covers {record.kv_len} tokens, the cache {cached_len}"
        if why is not None:
            raise ValueError(
                f"layer {self.layer_idx}'s MoE router ({self.mlp.router.method}) mixes each token's gate with those "
                f"of the earlier tokens and keeps them beside the KV cache, but its record does not match this "
                f"cache: {why}. The earlier tokens' gates cannot be rebuilt from the cache: fill the cache with "
                "this model from the first token on (beam search is not supported), or call "
                "generate(..., use_cache=False).")
        return record

    def _remember_gates(self, cache, past: Optional[_GateRecord]) -> None:
        """Store the record of the whole updated cache: ``past`` plus this call's gates and features."""
        out = self.mlp.last
        probs, feats = out.gate_probs, out.features
        if past is not None:
            probs = torch.cat([past.probs, probs], 1)
            feats = None if feats is None else torch.cat([past.features, feats], 1)
        keys = cache_keys(cache, self.layer_idx)
        if keys is None:  # nothing to check a later call against; _past_gates will raise then
            self._gate_records.pop(cache, None)
            return
        self._gate_records[cache] = _GateRecord(probs, feats, probs.shape[1], weakref.ref(keys))

    def forward(self, x: Tensor, position_embeddings, past_key_values=None, cache_position=None):
        cached = 0 if past_key_values is None else past_key_values.get_seq_length(self.layer_idx)
        if cached > 0 and not self.decodes_incrementally:
            r = self.mlp.router
            raise ValueError(f"layer {self.layer_idx}'s MoE router ({r.method}, capacity_factor={r.capacity_factor}, "
                             f"causal={r.causal}) routes a token using the other tokens of the call, so it cannot "
                             "decode from a KV cache (the logits would differ from a full forward); call "
                             "generate(..., use_cache=False) or run the full sequence without a cache.")
        track = past_key_values is not None and self.mixes_earlier
        past = self._past_gates(past_key_values, cached) if track else None
        a, aux = self.self_attn(self.input_layernorm(x), position_embeddings, past_key_values=past_key_values,
                                cache_position=cache_position)
        x = x + a
        h = self.post_attention_layernorm(x)
        if not isinstance(self.mlp, RoutedMoE):
            return x + self.mlp(h), aux
        state = {}
        if past is not None:
            state["past_probs"] = past.probs
            if past.features is not None:
                state["past_features"] = past.features
        if self.routes_by_attention:
            q, k = self.self_attn.last_qk  # k: the cached keys followed by the new ones
            self.self_attn.last_qk = None  # the router's copy is all that is needed
            m = self.mlp(h, q=q.detach(), k=k.detach(), **state)
        else:
            m = self.mlp(h, **state)
        if track:
            self._remember_gates(past_key_values, past)
        bal = self.mlp.balance_loss
        if bal is not None:
            aux = bal if aux is None else aux + bal
        return x + m, aux


class RoutedLMPreTrainedModel(PreTrainedModel):
    config_class = RoutedLMConfig
    config: RoutedLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["RoutedDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if callable(getattr(module, "routed_init", None)):
            # Layers that need their own start (NSA's mean-pool compression and gates) say so.
            module.routed_init(module)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, RotaryEmbedding):
            module.reset_inv_freq()
        elif isinstance(module, RoutedMoE):  # the experts' std as the dense MLP's Linear layers
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, ExpertRouter):
            module.weight.normal_(0.0, std)
            module.selection_bias.zero_()


class RoutedLMModel(RoutedLMPreTrainedModel):
    """The decoder stack: embeddings -> layers -> final norm (``last_hidden_state [B, N, hidden]``)."""

    def __init__(self, config: RoutedLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RoutedDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def forward(self, input_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                cache: Optional[Cache] = None, inputs_embeds: Optional[Tensor] = None,
                use_cache: Optional[bool] = None) -> tuple[Tensor, Optional[Cache], Optional[Tensor]]:
        """``(hidden [B, N, hidden], cache, aux_loss or None)``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        cache_position = torch.arange(past, past + x.shape[1], device=x.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        pe = self.rotary_emb(x, position_ids.expand(x.shape[0], -1))
        aux_total = None
        for layer in self.layers:
            x, aux = layer(x, pe, past_key_values=cache, cache_position=cache_position)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(x), cache, aux_total


class RoutedLMForCausalLM(RoutedLMPreTrainedModel, GenerationMixin):
    """:class:`RoutedLMModel` with a (tied) language-model head. ``forward(input_ids, labels=...)``
    returns a :class:`RoutedLMOutput` (``loss`` is the mean next-token cross-entropy plus the
    layers' auxiliary losses, also given alone as ``aux_loss``; labels of -100 are ignored)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RoutedLMConfig) -> None:
        super().__init__(config)
        self.model = RoutedLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, cache: Optional[Cache] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, past_key_values: Optional[Cache] = None,
                **kwargs) -> RoutedLMOutput:
        if cache is None:
            cache = past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("RoutedLMForCausalLM does not support padding (attention_mask has zeros); batch "
                             "sequences of one length, or run them one at a time.")
        hidden, cache, aux = self.model(input_ids, position_ids, cache, inputs_embeds, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            if aux is not None:
                loss = loss + aux
        return RoutedLMOutput(loss=loss, logits=logits, aux_loss=aux, **{_CACHE_FIELD: cache if use_cache else None})


# AutoConfig / AutoModelForCausalLM.from_pretrained(checkpoint) work once this module is imported.
AutoConfig.register(RoutedLMConfig.model_type, RoutedLMConfig, exist_ok=True)
AutoModelForCausalLM.register(RoutedLMConfig, RoutedLMForCausalLM, exist_ok=True)
