"""Plain-PyTorch expert MLPs: one loop over experts, straight from the per-token expert ids.

This is the ground truth of the dispatch tests. It does not read the route's sorted order, counts
or offsets, so a test that compares dispatch against it checks those too.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu_expert(x: Tensor, gate_up: Tensor, down: Tensor, act: Callable[[Tensor], Tensor] = F.silu) -> Tensor:
    """One expert's SwiGLU MLP: ``down @ (act(gate @ x) * (up @ x))``.

    Args:
        x: ``[n, H]``; gate_up: ``[2I, H]`` (gate rows first, then up rows, as Hugging Face's
            Mixtral/Qwen-MoE experts store them); down: ``[H, I]``.
    Returns ``[n, H]``.
    """
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act(gate) * up, down)


def expert_mlp_reference(x: Tensor, expert_ids: Tensor, weights: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
                         act: Callable[[Tensor], Tensor] = F.silu) -> Tensor:
    """``out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` by a loop over experts.

    Args:
        x: ``[T, H]``; expert_ids: ``[T, k]`` (``-1`` = empty slot); weights: ``[T, k]``;
        gate_up_proj: ``[E, 2I, H]``; down_proj: ``[E, H, I]``.
    Returns ``[T, H]`` in ``x.dtype`` (accumulated in float32, or float64 for float64 inputs).
    Differentiable in ``x``, ``weights`` and both weight tensors.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in range(gate_up_proj.shape[0]):
        tok, slot = torch.where(expert_ids == e)
        if tok.numel() == 0:
            continue
        y = swiglu_expert(x[tok], gate_up_proj[e], down_proj[e], act)
        out = out.index_add(0, tok, y.to(acc) * weights[tok, slot].to(acc).unsqueeze(-1))
    return out.to(x.dtype)
