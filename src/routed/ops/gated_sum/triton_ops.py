"""Host launchers, autograd and the ``torch.compile`` custom ops of the gated branch sum."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ...testing import new_output
from .triton_kernels import _gated_sum_bwd_kernel, _gated_sum_fwd_kernel

BLOCK_N = 32  # tokens per program: 4 branch tiles of 32 x 128 float32 stay in registers at 4 warps


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _same_strides(branches: list[Tensor]) -> list[Tensor]:
    """The kernels index every branch with one set of strides, last axis contiguous: the branches as
    given when they already share them (the attention kernels' outputs do), else contiguous copies."""
    first = branches[0].stride()
    if first[-1] == 1 and all(o.stride() == first for o in branches):
        return branches
    return [o.contiguous() for o in branches]


def _padded(branches: list[Tensor]) -> list[Tensor]:
    return branches + [branches[0]] * (4 - len(branches))  # dummies the constexpr G never reads


def gated_sum_fwd(z: Tensor, branches: list[Tensor]) -> Tensor:
    """``z [B, N, G, H]``, ``G`` branches ``[B, H, N, D]`` -> ``[B, H, N, D]`` laid out ``[B, N, H, D]``."""
    branches = _same_strides(branches)
    B, H, N, D = branches[0].shape
    out = new_output((B, N, H, D), dtype=branches[0].dtype, device=z.device).permute(0, 2, 1, 3)
    if out.numel():
        grid = (triton.cdiv(N, BLOCK_N), B * H)
        _gated_sum_fwd_kernel[grid](z, *_padded(branches), out, *z.stride(), *branches[0].stride()[:3],
                                    *out.stride()[:3], H, N, D, G=len(branches), BLOCK_N=BLOCK_N,
                                    BLOCK_D=_block_d(D), num_warps=4)
    return out


def gated_sum_bwd(z: Tensor, branches: list[Tensor], dout: Tensor) -> list[Tensor]:
    """``[dz, d branch_0, ...]``: ``dz`` like ``z`` (contiguous), the branch gradients contiguous."""
    branches = _same_strides(branches)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    B, H, N, D = branches[0].shape
    dz = new_output(z.shape, dtype=z.dtype, device=z.device)
    dos = [new_output((B, H, N, D), dtype=o.dtype, device=o.device) for o in branches]
    if dout.numel():
        grid = (triton.cdiv(N, BLOCK_N), B * H)
        _gated_sum_bwd_kernel[grid](z, *_padded(branches), dout, dz, *_padded(dos), *z.stride(),
                                    *branches[0].stride()[:3], *dout.stride()[:3], *dz.stride(),
                                    *dos[0].stride()[:3], H, N, D, G=len(branches), BLOCK_N=BLOCK_N,
                                    BLOCK_D=_block_d(D), num_warps=4)
    return [dz] + dos


class _GatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, *branches):
        ctx.save_for_backward(z, *branches)
        return gated_sum_fwd(z, list(branches))

    @staticmethod
    def backward(ctx, dout):
        z, *branches = ctx.saved_tensors
        return tuple(gated_sum_bwd(z, branches, dout))


# ------------------------------------------------------------------------------ torch.compile path
@torch.library.custom_op("routed::gated_sum_fwd", mutates_args=())
def gated_sum_fwd_op(z: Tensor, branches: list[Tensor]) -> Tensor:
    return gated_sum_fwd(z, branches)


@gated_sum_fwd_op.register_fake
def _(z, branches):
    B, H, N, D = branches[0].shape
    return torch.empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), dtype=branches[0].dtype, device=z.device)


@torch.library.custom_op("routed::gated_sum_bwd", mutates_args=())
def gated_sum_bwd_op(z: Tensor, branches: list[Tensor], dout: Tensor) -> list[Tensor]:
    return gated_sum_bwd(z, branches, dout)


@gated_sum_bwd_op.register_fake
def _(z, branches, dout):
    return [z.new_empty(z.shape)] + [o.new_empty(o.shape) for o in branches]


def _setup_context(ctx, inputs, output):
    z, branches = inputs
    ctx.save_for_backward(z, *branches)


def _backward(ctx, dout):
    z, *branches = ctx.saved_tensors
    dz, *dos = gated_sum_bwd_op(z, branches, dout)
    return dz, dos


torch.library.register_autograd("routed::gated_sum_fwd", _backward, setup_context=_setup_context)


def gated_sum_triton(z: Tensor, branches: list[Tensor]) -> Tensor:
    """Eager calls take the plain autograd Function (no custom-op dispatch cost); ``torch.compile``
    sees the custom op."""
    if torch.compiler.is_compiling():
        return gated_sum_fwd_op(z, list(branches))
    return _GatedSum.apply(z, *branches)
