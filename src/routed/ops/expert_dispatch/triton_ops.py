"""Host side of the dispatch's Triton kernels: launchers, ``torch.library`` custom ops (so
``torch.compile`` traces them) and their autograd.

Chain: ``_swiglu_*_kernel`` / ``_moe_combine_*_kernel`` (triton_kernels.py) -> host launchers ->
:func:`moe_swiglu`, :func:`moe_combine` and :func:`moe_gather`: in eager mode plain
``autograd.Function`` s (a custom op's dispatch costs ~25 us of host time per call, more with
autograd, and a MoE layer of 8k tokens is host-bound), under ``torch.compile`` the
``routed::moe_swiglu``, ``routed::moe_combine`` and ``routed::moe_gather`` custom ops with registered
autograd -> :func:`routed.ops.expert_dispatch.grouped.sorted_expert_mlp` (``fused=True``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...testing import new_output
from .triton_kernels import _moe_combine_bwd_kernel, _moe_combine_fwd_kernel, _swiglu_bwd_kernel, _swiglu_fwd_kernel


def _block(n: int, cap: int = 1024) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


# ------------------------------------------------------------------------------------------ SwiGLU
def _swiglu_fwd(gu: Tensor) -> Tensor:
    A, I2 = gu.shape
    I = I2 // 2
    out = new_output((A, I), dtype=gu.dtype, device=gu.device)
    if A:
        blk = _block(I)
        _swiglu_fwd_kernel[(A, triton.cdiv(I, blk))](gu, out, I, gu.stride(0), out.stride(0), BLOCK=blk)
    return out


@torch.library.custom_op("routed::moe_swiglu", mutates_args=())
def moe_swiglu_op(gate_up: Tensor) -> Tensor:
    """``[A, 2I]`` gate rows' outputs then up rows' -> ``silu(gate) * up`` ``[A, I]``."""
    return _swiglu_fwd(gate_up.contiguous())


@moe_swiglu_op.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def _swiglu_bwd(gate_up: Tensor, dout: Tensor) -> Tensor:
    gu, do = gate_up.contiguous(), dout.contiguous()
    A, I2 = gu.shape
    dgu = new_output((A, I2), dtype=gu.dtype, device=gu.device)
    if A:
        blk = _block(I2 // 2)
        _swiglu_bwd_kernel[(A, triton.cdiv(I2 // 2, blk))](gu, do, dgu, I2 // 2, gu.stride(0), do.stride(0),
                                                           dgu.stride(0), BLOCK=blk)
    return dgu


@torch.library.custom_op("routed::moe_swiglu_bwd", mutates_args=())
def moe_swiglu_bwd(gate_up: Tensor, dout: Tensor) -> Tensor:
    return _swiglu_bwd(gate_up, dout)


@moe_swiglu_bwd.register_fake
def _(gate_up, dout):
    return torch.empty_like(gate_up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, dout):
    (gu,) = ctx.saved_tensors
    return moe_swiglu_bwd(gu, dout)


torch.library.register_autograd("routed::moe_swiglu", _swiglu_backward, setup_context=_swiglu_setup)


# ----------------------------------------------------------------------------------------- combine
def _combine_fwd(ys: Tensor, inv: Tensor, weights: Optional[Tensor]) -> Tensor:
    T, K = inv.shape
    H = ys.shape[1]
    out = new_output((T, H), dtype=ys.dtype, device=ys.device)
    if T:
        blk = _block(H)
        w = weights if weights is not None else inv  # any pointer; unused without HAS_W
        _moe_combine_fwd_kernel[(T, triton.cdiv(H, blk))](ys, inv, w, out, H, K, ys.stride(0), out.stride(0),
                                                          HAS_W=weights is not None, BLOCK_H=blk)
    return out


@torch.library.custom_op("routed::moe_combine", mutates_args=())
def moe_combine_op(ys: Tensor, inv: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_j weights[t, j] * ys[inv[t, j]]`` over slots with ``inv >= 0``.

    ``ys [A, H]`` expert outputs in sorted order, ``inv [T, k]`` int64 row of each slot (``-1``:
    empty), ``weights [T, k]``. Returns ``[T, H]`` in ``ys.dtype`` (float32 accumulation)."""
    return _combine_fwd(ys.contiguous(), inv.contiguous(), weights.contiguous())


@moe_combine_op.register_fake
def _(ys, inv, weights):
    return ys.new_empty(inv.shape[0], ys.shape[1])


def _combine_bwd(dout: Tensor, ys: Tensor, inv: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    do, ys, inv, w = dout.contiguous(), ys.contiguous(), inv.contiguous(), weights.contiguous()
    T, K = inv.shape
    H = ys.shape[1]
    dys = new_output(ys.shape, dtype=ys.dtype, device=ys.device)
    dw = new_output((T, K), dtype=torch.float32, device=ys.device)
    if T:
        _moe_combine_bwd_kernel[(T,)](do, ys, inv, w, dys, dw, H, K, do.stride(0), ys.stride(0), dys.stride(0),
                                      BLOCK_H=_block(H))
    return dys, dw.to(weights.dtype)


@torch.library.custom_op("routed::moe_combine_bwd", mutates_args=())
def moe_combine_bwd(dout: Tensor, ys: Tensor, inv: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    return _combine_bwd(dout, ys, inv, weights)


@moe_combine_bwd.register_fake
def _(dout, ys, inv, weights):
    return torch.empty_like(ys), torch.empty_like(weights)


def _combine_setup(ctx, inputs, output):
    ys, inv, weights = inputs
    ctx.save_for_backward(ys, inv, weights)


def _combine_backward(ctx, dout):
    ys, inv, weights = ctx.saved_tensors
    dys, dw = moe_combine_bwd(dout, ys, inv, weights)
    return dys, None, dw


torch.library.register_autograd("routed::moe_combine", _combine_backward, setup_context=_combine_setup)


# ------------------------------------------------------------------------------------------ gather
@torch.library.custom_op("routed::moe_slot_sum", mutates_args=())
def moe_slot_sum(ys: Tensor, inv: Tensor) -> Tensor:
    """``out[t] = sum_j ys[inv[t, j]]`` over slots with ``inv >= 0`` (the combine without weights)."""
    return _combine_fwd(ys.contiguous(), inv.contiguous(), None)


@moe_slot_sum.register_fake
def _(ys, inv):
    return ys.new_empty(inv.shape[0], ys.shape[1])


@torch.library.custom_op("routed::moe_gather", mutates_args=())
def moe_gather_op(x: Tensor, rows: Tensor, inv: Tensor) -> Tensor:
    """``x[rows]`` (``rows [A]`` token of each sorted row); its backward sums each token's rows
    through ``inv [T, k]`` with the combine kernel (deterministic, float32 accumulation) instead
    of an atomic ``index_add``."""
    return x.index_select(0, rows)


@moe_gather_op.register_fake
def _(x, rows, inv):
    return x.new_empty(rows.shape[0], x.shape[1])


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _gather_backward(ctx, dxs):
    (inv,) = ctx.saved_tensors
    return moe_slot_sum(dxs, inv), None, None


torch.library.register_autograd("routed::moe_gather", _gather_backward, setup_context=_gather_setup)


# -------------------------------------------------------------------------------------- eager path
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _swiglu_fwd(gate_up)

    @staticmethod
    def backward(ctx, dout):
        (gu,) = ctx.saved_tensors
        return _swiglu_bwd(gu, dout)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, inv, weights):
        ctx.save_for_backward(ys, inv, weights)
        return _combine_fwd(ys, inv, weights)

    @staticmethod
    def backward(ctx, dout):
        ys, inv, weights = ctx.saved_tensors
        dys, dw = _combine_bwd(dout, ys, inv, weights)
        return dys, None, dw


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, dxs):
        (inv,) = ctx.saved_tensors
        return _combine_fwd(dxs.contiguous(), inv, None), None, None


def moe_swiglu(gate_up: Tensor) -> Tensor:
    """``[A, 2I]`` gate rows' outputs then up rows' -> ``silu(gate) * up`` ``[A, I]`` (differentiable)."""
    if torch.compiler.is_compiling():
        return moe_swiglu_op(gate_up)
    return _SwiGLU.apply(gate_up.contiguous())


def moe_combine(ys: Tensor, inv: Tensor, weights: Tensor) -> Tensor:
    """``out[t] = sum_j weights[t, j] * ys[inv[t, j]]`` over slots with ``inv >= 0`` (see
    :func:`moe_combine_op`); differentiable in ``ys`` and ``weights``."""
    if torch.compiler.is_compiling():
        return moe_combine_op(ys, inv, weights)
    return _Combine.apply(ys.contiguous(), inv.contiguous(), weights.contiguous())


def moe_gather(x: Tensor, rows: Tensor, inv: Tensor) -> Tensor:
    """``x[rows]``, its backward the deterministic slot sum (see :func:`moe_gather_op`)."""
    if torch.compiler.is_compiling():
        return moe_gather_op(x, rows, inv)
    return _Gather.apply(x, rows, inv)
