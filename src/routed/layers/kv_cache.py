"""What a layer needs to keep state of its own beside a transformers KV cache (NSA's compressed
keys, the mixing MoE routers' gates): find the cache layer's key tensor, and tell a crop (a prefix
view of the keys the state was built against) from a replacement (reorder, batch select), both
without a device sync."""

from __future__ import annotations

import weakref
from typing import Optional

from torch import Tensor

__all__ = ["cache_keys", "is_prefix_view", "key_change"]


def cache_keys(cache, layer_idx: int) -> Optional[Tensor]:
    """The ``[B, Hkv, T, D]`` key tensor a transformers cache holds for ``layer_idx`` (``cache.layers[i].keys``
    in transformers >= 4.54, ``cache.key_cache[i]`` before), or None (empty, or a layout not known here)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        keys = getattr(layers[layer_idx], "keys", None) if layer_idx < len(layers) else None
    else:
        key_cache = getattr(cache, "key_cache", None)
        keys = key_cache[layer_idx] if key_cache is not None and layer_idx < len(key_cache) else None
    return keys if isinstance(keys, Tensor) and keys.dim() == 4 else None


def is_prefix_view(keys: Tensor, held: Tensor) -> bool:
    """True when ``keys`` is ``held[:, :, :L]`` (what ``crop`` leaves): a view of the same storage with the
    same batch, heads, head_dim, strides and start, no longer than ``held``. Cheap, no device sync."""
    return (keys._base is (held if held._base is None else held._base) and keys.data_ptr() == held.data_ptr()
            and keys.stride() == held.stride() and keys.shape[:2] == held.shape[:2]
            and keys.shape[3] == held.shape[3] and keys.shape[2] <= held.shape[2])


def key_change(keys: Tensor, held_ref: Optional[weakref.ref]) -> str:
    """How the cache layer's key tensor ``keys`` relates to the one a layer's record was built against
    (``held_ref``, a weak reference, or None): ``"same"``, ``"cropped"`` (``keys`` is a prefix view of it:
    the record's kept prefix is still exact) or ``"replaced"`` (it is gone, or ``keys`` is another tensor:
    reordered, batch-selected, moved, refilled by another model)."""
    held = None if held_ref is None else held_ref()
    if held is None:
        return "replaced"
    if keys is held:
        return "same"
    return "cropped" if is_prefix_view(keys, held) else "replaced"
