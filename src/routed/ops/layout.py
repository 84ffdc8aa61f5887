"""Token/head order of ``[B, H, N, D]`` tensors, shared by the ops whose outputs follow their input's
layout (block-sparse attention, rotary, the row mover). No Triton import: the PyTorch paths use it too."""

from __future__ import annotations

import torch
from torch import Tensor

from ..testing import new_output


def token_major(t: Tensor) -> bool:
    """True when a ``[B, H, N, D]`` tensor is laid out ``[B, N, H, D]`` in memory (heads inside
    tokens: the transposed view of a projection's output, as Hugging Face layers pass it)."""
    # (a tensor whose last axis is strided is copied head-major first: its outputs are head-major)
    return t.shape[1] > 1 and t.shape[2] > 1 and t.stride(-1) == 1 and t.stride(1) < t.stride(2)


def output_like(like: Tensor, last: int, dtype: torch.dtype, fake: bool = False) -> Tensor:
    """A new ``[B, H, N, last]`` output in ``like``'s token/head order (``[B, H, N, D]``), as SDPA's
    flash path does: a token-major output makes ``out.transpose(1, 2).reshape(B, N, H * last)`` a
    view instead of a copy, and token-major gradients flow back into the projection without one."""
    B, H, N = like.shape[:3]
    shape = (B, N, H, last) if token_major(like) else (B, H, N, last)
    t = like.new_empty(shape, dtype=dtype) if fake else new_output(shape, dtype=dtype, device=like.device)
    return t.transpose(1, 2) if token_major(like) else t
