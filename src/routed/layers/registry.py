"""The attention layers a routed language model can use, by name.

A model config lists one name per layer (``"dense"``, ``"sliding_window"``, ``"moba"``, ``"nsa"``,
``"routing"``, ``"mosa"``, ...); each name maps to an ``nn.Module`` class registered here, so new
routers plug into the same model without touching it.

Interface every registered class follows::

    layer = cls(config, layer_idx)      # config: the model config (hidden_size, num_attention_heads,
                                        # num_key_value_heads, head_dim, and the layer's own options)
    out, aux_loss = layer(hidden_states,            # [batch, seq, hidden]
                          position_embeddings,      # (cos, sin), each [batch, seq, head_dim] (rotary)
                          past_key_values=None,     # a transformers Cache, or None
                          cache_position=None)      # [seq] int64 positions of the new tokens
    # out: [batch, seq, hidden]; aux_loss: a scalar tensor to add to the training loss, or None
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["register_attention", "attention_class", "attention_names"]

_ATTENTION: dict[str, type[nn.Module]] = {}


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` the attention layer called ``name``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ATTENTION and _ATTENTION[name] is not cls:
            raise ValueError(f"an attention layer is already registered as {name!r} ({_ATTENTION[name].__name__}).")
        _ATTENTION[name] = cls
        return cls

    return deco


def attention_class(name: str) -> type[nn.Module]:
    """The layer class registered as ``name``; a clear error listing the known names otherwise."""
    if name not in _ATTENTION:
        raise ValueError(f"unknown attention layer {name!r}; known: {sorted(_ATTENTION)}. Register new ones with "
                         "routed.layers.registry.register_attention.")
    return _ATTENTION[name]


def attention_names() -> list[str]:
    return sorted(_ATTENTION)
