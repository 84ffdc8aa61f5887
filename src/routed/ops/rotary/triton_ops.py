"""Host launchers, autograd and the ``torch.compile`` custom ops of the rotary embedding."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..layout import output_like
from .triton_kernels import _rotary_kernel

BLOCK_N = 32  # rows per program: 32 x 64 float32 halves, four of them with cos/sin, at 4 warps


def rotary_launch(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    """``x [B, H, N, D]`` (last axis contiguous), ``cos, sin [B or 1, N, D]`` (last axis contiguous,
    one set of strides) -> the rotated ``x`` (``backward``: the transposed rotation)."""
    B, H, N, D = x.shape
    out = output_like(x, D, x.dtype)  # the input's token/head order: no copy to merge the heads
    if out.numel():
        half = D // 2
        grid = (triton.cdiv(N, BLOCK_N), B * H)
        _rotary_kernel[grid](x, cos, sin, out, *x.stride()[:3], cos.stride(0) if cos.shape[0] > 1 else 0,
                             cos.stride(1), *out.stride()[:3], H, N, HALF=half, BLOCK_N=BLOCK_N,
                             BLOCK_H=max(16, triton.next_power_of_2(half)), BACKWARD=backward, num_warps=4)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_launch(x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return rotary_launch(grad, cos, sin, True), None, None


# ------------------------------------------------------------------------------ torch.compile path
@torch.library.custom_op("routed::rotary", mutates_args=())
def rotary_op(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    return rotary_launch(x, cos, sin, backward)


@rotary_op.register_fake
def _(x, cos, sin, backward):
    return output_like(x, x.shape[-1], x.dtype, fake=True)


def _setup_context(ctx, inputs, output):
    _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return rotary_op(grad.contiguous() if grad.stride(-1) != 1 else grad, cos, sin, True), None, None, None


torch.library.register_autograd("routed::rotary", _backward, setup_context=_setup_context)


def apply_rotary_triton(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Eager calls take the plain autograd Function (no custom-op dispatch cost); ``torch.compile``
    sees the custom op."""
    if torch.compiler.is_compiling():
        return rotary_op(x, cos, sin, False)
    return _Rotary.apply(x, cos, sin)
