"""Plain-PyTorch gated sum of branch outputs (the twin of :mod:`.triton_kernels`)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def gated_sum_reference(gate_logits: Tensor, branches: Sequence[Tensor]) -> Tensor:
    """``sum_g sigmoid(gate_logits[:, :, g, :]) * branches[g]``.

    Args:
        gate_logits: ``[B, N, G, H]`` (one logit per token, branch and head; a linear layer's
            ``[B, N, G * H]`` output viewed so).
        branches: ``G`` tensors ``[B, H, N, D]`` of one dtype.
    Returns ``[B, H, N, D]`` in the branches' dtype (gates and sum in float32, or float64 for float64 inputs).
    """
    acc = torch.promote_types(torch.promote_types(gate_logits.dtype, branches[0].dtype), torch.float32)
    gates = torch.sigmoid(gate_logits.to(acc)).permute(2, 0, 3, 1).unsqueeze(-1)  # [G, B, H, N, 1]
    out = sum(g * o.to(acc) for g, o in zip(gates, branches))
    return out.to(branches[0].dtype)
