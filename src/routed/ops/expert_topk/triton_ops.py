"""Host side of the token-choice route kernels: launchers, autograd and the ``torch.library``
custom ops that ``torch.compile`` traces.

Chain: ``_expert_topk_fwd_kernel`` / ``_expert_sort_kernel`` / ``_expert_topk_bwd_kernel``
(triton_kernels.py) -> :func:`expert_topk_fwd` / :func:`expert_topk_bwd` -> ``_ExpertTopK``
(eager: a plain ``autograd.Function``, whose dispatch costs less host time than a custom op's) or
the ``routed::expert_topk_fwd`` custom op with registered autograd (under ``torch.compile``) ->
:func:`routed.ops.expert_topk.expert_topk_route`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ...testing import new_output
from .triton_kernels import _expert_sort_kernel, _expert_topk_bwd_kernel, _expert_topk_fwd_kernel

MODES = {"softmax_topk": 0, "topk_softmax": 1, "probs": 2}
# Elements of the sort kernel's one-hot [tile tokens * K, experts] tile: ~64 int32 per thread of 4 warps.
_ONE_HOT_ELEMENTS = 8192


def _tile(T: int, K: int, E: int) -> tuple[int, int, int]:
    k_pad, e_pad = triton.next_power_of_2(K), max(2, triton.next_power_of_2(E))
    block_t = max(1, min(256, _ONE_HOT_ELEMENTS // (k_pad * e_pad), triton.next_power_of_2(max(T, 1))))
    return k_pad, e_pad, block_t


def expert_topk_fwd(x: Tensor, bias: Optional[Tensor], k: int, mode: int, normalize: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x [T, E]`` logits (modes 0, 1) or a distribution (mode 2) -> ``(probs [T, E] float32 (mode 2:
    empty), ids [T, k] int32, weights [T, k] float32, order [T*k] int64, counts [E] int32,
    offsets [E+1] int32, slot_rows [T, k] int64)``; see :mod:`.triton_kernels`."""
    T, E = x.shape
    dev = x.device
    k_pad, e_pad, block_t = _tile(T, k, E)
    tiles = triton.cdiv(T, block_t)
    probs = new_output((T, E) if mode != 2 else (0, E), dtype=torch.float32, device=dev)
    ids = new_output((T, k), dtype=torch.int32, device=dev)
    w = new_output((T, k), dtype=torch.float32, device=dev)
    hist = new_output((E, tiles), dtype=torch.int32, device=dev)
    order = new_output((T * k,), dtype=torch.int64, device=dev)
    slot_rows = new_output((T, k), dtype=torch.int64, device=dev)
    if T == 0:
        counts = torch.zeros(E, dtype=torch.int32, device=dev)
        return probs, ids, w, order, counts, torch.zeros(E + 1, dtype=torch.int32, device=dev), slot_rows
    _expert_topk_fwd_kernel[(tiles,)](
        x, bias if bias is not None else x, probs, ids, w, hist, T, E, x.stride(0), tiles,
        MODE=mode, NORMALIZE=normalize, HAS_BIAS=bias is not None, K=k, K_PAD=k_pad, E_PAD=e_pad, BLOCK_T=block_t)
    cum = hist.view(-1).cumsum(0, dtype=torch.int32)  # inclusive, over (expert, tile), expert-major
    counts = new_output((E,), dtype=torch.int32, device=dev)
    offsets = new_output((E + 1,), dtype=torch.int32, device=dev)
    _expert_sort_kernel[(tiles,)](ids, hist, cum, order, slot_rows, counts, offsets, T, E, tiles, K=k, K_PAD=k_pad,
                                  E_PAD=e_pad, BLOCK_T=block_t)
    return probs, ids, w, order, counts, offsets, slot_rows


def expert_topk_bwd(x: Tensor, probs: Tensor, ids: Tensor, w: Tensor, dw: Tensor, dprobs: Optional[Tensor],
                    mode: int, normalize: bool) -> Tensor:
    """The gradient of ``x`` from those of the weights ``dw [T, k]`` and of ``probs`` (``dprobs
    [T, E]`` or None)."""
    T, E = x.shape
    k = ids.shape[1]
    dx = new_output((T, E), dtype=x.dtype, device=x.device)
    if T:
        k_pad, e_pad, block_t = _tile(T, k, E)
        dw = dw.contiguous()
        dprobs = dprobs.contiguous() if dprobs is not None else None
        _expert_topk_bwd_kernel[(triton.cdiv(T, block_t),)](
            probs, x, ids, w, dw, dprobs if dprobs is not None else dw, dx, T, E, x.stride(0), dx.stride(0),
            MODE=mode, NORMALIZE=normalize, HAS_DPROBS=dprobs is not None, K=k, K_PAD=k_pad, E_PAD=e_pad,
            BLOCK_T=block_t)
    return dx


def _input_grads(ctx, dprobs, dw, bwd) -> tuple:
    """The gradients of ``(x, bias, k, mode, normalize)`` from those of ``probs`` and the weights, by
    ``bwd`` (the launcher eagerly, its custom op under compile); mode 2 returns no softmax."""
    x, probs, ids, w = ctx.saved_tensors
    if dw is None and dprobs is None:
        return None, None, None, None, None
    dw = torch.zeros_like(w) if dw is None else dw
    dprobs = None if ctx.mode == 2 else dprobs
    return bwd(x, probs, ids, w, dw, dprobs, ctx.mode, ctx.normalize), None, None, None, None


class _ExpertTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, k, mode, normalize):
        out = expert_topk_fwd(x, bias, k, mode, normalize)
        probs, ids, w = out[:3]
        ctx.save_for_backward(x, probs, ids, w)
        ctx.mode, ctx.normalize = mode, normalize
        ctx.mark_non_differentiable(*out[1:2], *out[3:])
        return out

    @staticmethod
    def backward(ctx, dprobs, _ids, dw, *_rest):
        return _input_grads(ctx, dprobs, dw, expert_topk_bwd)


# ------------------------------------------------------------------------------ torch.compile path
@torch.library.custom_op("routed::expert_topk_fwd", mutates_args=())
def expert_topk_fwd_op(x: Tensor, bias: Optional[Tensor], k: int, mode: int, normalize: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return expert_topk_fwd(x.contiguous(), bias, k, mode, normalize)


@expert_topk_fwd_op.register_fake
def _(x, bias, k, mode, normalize):
    T, E = x.shape
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    return (x.new_empty((T, E) if mode != 2 else (0, E), dtype=f32), x.new_empty(T, k, dtype=i32),
            x.new_empty(T, k, dtype=f32), x.new_empty(T * k, dtype=i64), x.new_empty(E, dtype=i32),
            x.new_empty(E + 1, dtype=i32), x.new_empty(T, k, dtype=i64))


@torch.library.custom_op("routed::expert_topk_bwd", mutates_args=())
def expert_topk_bwd_op(x: Tensor, probs: Tensor, ids: Tensor, w: Tensor, dw: Tensor, dprobs: Optional[Tensor],
                       mode: int, normalize: bool) -> Tensor:
    return expert_topk_bwd(x.contiguous(), probs, ids, w, dw, dprobs, mode, normalize)


@expert_topk_bwd_op.register_fake
def _(x, probs, ids, w, dw, dprobs, mode, normalize):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, _bias, _k, mode, normalize = inputs
    ctx.save_for_backward(x, output[0], output[1], output[2])
    ctx.mode, ctx.normalize = mode, normalize


def _backward(ctx, dprobs, _ids, dw, *_rest):
    return _input_grads(ctx, dprobs, dw, expert_topk_bwd_op)


torch.library.register_autograd("routed::expert_topk_fwd", _backward, setup_context=_setup)


def expert_topk_triton(x: Tensor, bias: Optional[Tensor], k: int, mode: int, normalize: bool):
    """Eager calls take the plain autograd Function; ``torch.compile`` sees the custom op."""
    if torch.compiler.is_compiling():
        return expert_topk_fwd_op(x, bias, k, mode, normalize)
    return _ExpertTopK.apply(x.contiguous(), bias, k, mode, normalize)
