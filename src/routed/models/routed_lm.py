"""A small decoder-only language model whose attention is chosen per layer.

``RoutedLMConfig(attention_types=["dense", "moba", "nsa", ...])`` builds layer ``i`` from
``routed.layers.registry.attention_class(attention_types[i])``: dense, sliding window, MoBA and NSA
ship here, and any layer registered later (k-means routing, MoSA, ...) plugs in by its name.
The rest is a Llama-style block: RMSNorm, rotary embeddings, SwiGLU MLP, tied embeddings.

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

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# Importing a layer module registers its names: dense, sliding_window, moba (lm_attention), nsa,
# mosa, routing.
from ..layers import lm_attention, mosa, nsa, routing_attention  # noqa: F401
from ..layers.registry import attention_class

__all__ = ["RoutedLMConfig", "RoutedLMModel", "RoutedLMForCausalLM"]

# Newer transformers name the output's cache field "cache", older ones "past_key_values";
# generate() reads the one its version defines (the GPU machine may run another version).
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


@dataclass
class RoutedLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``aux_loss``: the sum of the layers' auxiliary losses
    (k-means commitment, MoSA's rate loss, ...), or None. Training code that computes its own
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
                 router_backend: Optional[str] = None, tie_word_embeddings: bool = True, **kwargs) -> None:
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
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


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


class RoutedDecoderLayer(nn.Module):
    def __init__(self, config: RoutedLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = attention_class(config.attention_types[layer_idx])(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, position_embeddings, past_key_values=None, cache_position=None):
        a, aux = self.self_attn(self.input_layernorm(x), position_embeddings, past_key_values=past_key_values,
                                cache_position=cache_position)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), aux


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
