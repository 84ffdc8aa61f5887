"""Rotary position embedding of ``[B, H, N, D]`` queries or keys (the HF/Llama convention: the two
halves of the head dim rotate together), as the LM layers apply it before attention.

    q = apply_rotary(q, cos, sin)      # cos, sin [B, N, D] from the model's rotary module

Backends: ``"triton"`` (one fused launch forward and one backward, float32 math, the output in the
input's token/head order: :mod:`.triton_kernels`; CUDA GPUs, or the CPU under ``TRITON_INTERPRET=1``)
and ``"reference"`` (PyTorch, :mod:`.reference`: five elementwise passes and a ``cat`` each way).
``None`` takes the kernel on CUDA GPUs unless ``ROUTED_ROTARY_KERNEL=0`` (on the H200 it took an 8k LM
layer's training step from 1.09 to 0.93 ms dense, 0.73 to 0.56 MoBA, 1.49 to 1.31 NSA, CUDA-graphed:
results/h200/profile_layers_8k_rotary{,_off}.json), and the reference otherwise or wherever the kernel
cannot take the call (cos/sin that need gradients, an odd head dim).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ...backends import kernel_or_reference
from ...env import env_switch, triton_why_not
from ...route import RouteError
from .reference import apply_rotary_reference, rotate_half

__all__ = ["apply_rotary", "apply_rotary_reference", "rotate_half"]


def _check(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.dim() != 4:
        raise RouteError(f"apply_rotary takes x [B, H, N, D], got shape {list(x.shape)}.")
    B, _, N, D = x.shape
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (N, D):
        raise RouteError(f"cos and sin must both be [B, N, D] = [{B} (or 1), {N}, {D}] for x {list(x.shape)}, got "
                         f"{list(cos.shape)} and {list(sin.shape)}.")


def _kernel_why_not(x: Tensor, cos: Tensor, sin: Tensor) -> Optional[str]:
    why = triton_why_not(x)
    if why is not None:
        return why
    if x.shape[-1] % 2:
        return f"the head dim must be even, got {x.shape[-1]}"
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin need gradients, which the kernel does not give"
    if cos.device != x.device or sin.device != x.device:
        return f"cos/sin are on {cos.device}/{sin.device}, x on {x.device}"
    return None


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``x * cos + rotate_half(x) * sin``, differentiable in ``x``.

    Args:
        x: ``[B, H, N, D]``, any strides (a projection's ``[B, N, H, D]`` output transposed).
        cos, sin: ``[B, N, D]`` (or ``[1, N, D]``), broadcast over the heads.
        backend: ``"triton"``, ``"reference"`` or None (see the module docstring).
    Returns ``[B, H, N, D]`` in ``x``'s dtype; the kernel keeps ``x``'s token/head order.
    """
    _check(x, cos, sin)
    backend = kernel_or_reference("rotary", backend, lambda: _kernel_why_not(x, cos, sin),
                                  lambda: x.device.type == "cuda" and env_switch("ROUTED_ROTARY_KERNEL", True))
    if backend == "reference":
        return apply_rotary_reference(x, cos, sin)
    from .triton_ops import apply_rotary_triton

    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    return apply_rotary_triton(x, cos, sin)
