"""Gated sum of branch outputs: ``out = sum_g sigmoid(z_g) * o_g`` (NSA's combination of its
compressed, selected and sliding-window branches, per token and query head).

    out = gated_sum(gate(hidden).view(B, N, 3, H), [o_cmp, o_slc, o_win])

Backends: ``"triton"`` (one fused launch forward and one backward, :mod:`.triton_kernels`; CUDA
GPUs, or the CPU under ``TRITON_INTERPRET=1``) and ``"reference"`` (autograd over plain PyTorch,
:mod:`.reference`). ``None`` takes the kernel on CUDA GPUs and the reference elsewhere. Both compute
the gates in float32 and accumulate the sum in float32. The kernel's output is a ``[B, H, N, D]``
view of ``[B, N, H, D]`` memory, so merging the heads for the output projection is free.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ...backends import kernel_or_reference
from ...env import triton_why_not
from ...route import RouteError
from .reference import gated_sum_reference

__all__ = ["gated_sum", "gated_sum_reference"]

MAX_BRANCHES = 4


def _check(gate_logits: Tensor, branches: Sequence[Tensor]) -> None:
    if not isinstance(branches, (list, tuple)) or not 1 <= len(branches) <= MAX_BRANCHES:
        raise RouteError(f"branches must be a list of 1 to {MAX_BRANCHES} tensors, got "
                         f"{type(branches).__name__} of {len(branches) if isinstance(branches, (list, tuple)) else '?'}.")
    shape, dtype = branches[0].shape, branches[0].dtype
    if len(shape) != 4 or any(o.shape != shape or o.dtype != dtype for o in branches):
        raise RouteError("branches must be [B, H, N, D] tensors of one shape and dtype, got "
                         + ", ".join(f"{o.dtype} {list(o.shape)}" for o in branches) + ".")
    B, H, N, _ = shape
    want = (B, N, len(branches), H)
    if not gate_logits.is_floating_point() or tuple(gate_logits.shape) != want:
        raise RouteError(f"gate_logits must be a floating-point [B, N, branches, H] = {list(want)} tensor, got "
                         f"{gate_logits.dtype} {list(gate_logits.shape)} (view a [B, N, branches * H] gate "
                         f"projection with .view(B, N, {len(branches)}, H)).")
    if any(o.device != gate_logits.device for o in branches):
        raise RouteError("gate_logits and branches must be on one device, got "
                         f"{gate_logits.device} and {[str(o.device) for o in branches]}.")


def gated_sum(gate_logits: Tensor, branches: Sequence[Tensor], *, backend: Optional[str] = None) -> Tensor:
    """``sum_g sigmoid(gate_logits[:, :, g, :]) * branches[g]``, differentiable in all inputs.

    Args:
        gate_logits: ``[B, N, G, H]``, one logit per token, branch and head.
        branches: ``G`` (1 to 4) tensors ``[B, H, N, D]`` of one dtype.
        backend: ``"triton"``, ``"reference"`` or None (the kernel on CUDA GPUs).
    Returns ``[B, H, N, D]`` in the branches' dtype.
    """
    _check(gate_logits, branches)
    backend = kernel_or_reference("gated-sum", backend, lambda: triton_why_not(branches[0]),
                                  lambda: gate_logits.device.type == "cuda")
    if backend == "triton":
        from .triton_ops import gated_sum_triton

        return gated_sum_triton(gate_logits, list(branches))
    return gated_sum_reference(gate_logits, branches)
