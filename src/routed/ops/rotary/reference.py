"""Plain PyTorch rotary embedding (the HF/Llama convention): the tests' ground truth and the CPU path."""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``cos, sin [B, N, D]`` broadcast over the heads of
    ``x [B, H, N, D]``, in ``x``'s dtype (each product rounded, as HF's eager code does)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin
