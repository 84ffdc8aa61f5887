"""Rows moved by a permutation with padding slots, with a backward that gathers instead of adding.

``x.gather`` along the sequence has a ``scatter_add`` backward: atomic adds, and when many slots
read one row (padding slots clamped to token 0, as cluster-sorted layouts have), those adds
serialise on that row. Where the index is a bijection between real slots and tokens, the
gradient of every row is the gradient of the one slot that read it: the backward is the inverse
gather, no atomics, exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...env import env_switch
from ..layout import token_major


_BACKENDS = (None, "torch", "triton")


def row_kernel_enabled(device: torch.device) -> bool:
    """Whether the automatic choice (``backend=None``) and BiFormer's region reorders take the Triton row
    mover on ``device``: on CUDA unless ``ROUTED_ROW_KERNEL=0`` (H200, bf16: the BRA module's forward and
    backward 10-14% faster than with PyTorch's gathers and permute copies,
    benchmarks/results/h200/bra_row_kernel_*.json); on the CPU only under ``ROUTED_ROW_KERNEL=1`` with
    ``TRITON_INTERPRET=1`` (exact there, and slow: for tests)."""
    if device.type == "cuda":
        return env_switch("ROUTED_ROW_KERNEL", True)
    from ...env import triton_runs_on

    return env_switch("ROUTED_ROW_KERNEL", False) and triton_runs_on(device)


def _gather_rows(x: Tensor, index: Tensor, zero_padding: bool, backend: Optional[str],
                 token_major: bool = False) -> Tensor:
    """``y[..., s, :] = x[..., index[..., s], :]`` (``index`` broadcast over ``x``'s leading dims and
    ``d``); where ``index < 0``: zero, or (torch backend, not ``zero_padding``) row 0. ``token_major``:
    the kernel writes ``y`` with its rows axis outside the merged head axes (see :func:`permute_rows`)."""
    if backend is None:
        backend = "triton" if row_kernel_enabled(x.device) and x.is_cuda and _triton_view(x) is not None else "torch"
    if backend == "triton":
        return _gather_rows_triton(x, index, token_major)
    y = x.gather(-2, index.clamp_min(0).unsqueeze(-1).expand(*x.shape[:-2], index.shape[-1], x.shape[-1]))
    return y.masked_fill((index < 0).unsqueeze(-1), 0) if zero_padding else y


def _triton_view(x: Tensor) -> Optional[Tensor]:
    """``x`` as ``[A, B, N, d]`` without a copy (rows contiguous), or None."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        return None
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[:, None]
    try:
        return x.view(x.shape[0], -1, *x.shape[-2:])
    except RuntimeError:  # leading axes that do not merge into one stride
        return None


def _is_token_major(x: Tensor) -> bool:
    """Whether ``x [..., N, d]``, its leading axes merged as the kernel sees them, is token-major."""
    x4 = _triton_view(x)
    return x4 is not None and token_major(x4)


def _gather_rows_triton(x: Tensor, index: Tensor, token_major: bool = False) -> Tensor:
    import triton

    from ...env import triton_runs_on
    from .triton_kernels import _gather_rows_kernel

    x4 = _triton_view(x)
    why = None
    if not triton_runs_on(x.device):
        why = f"x is on {x.device} (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    elif x4 is None:
        why = (f"x {list(x.shape)} with strides {x.stride()}: its rows must be contiguous and its leading axes "
               "must merge into two")
    if why:
        raise RuntimeError(f"permute_rows(backend='triton') cannot run: {why}.")
    A, Bh, _, d = x4.shape
    L = index.shape[-1]
    idx = index.expand(*x.shape[:-2], L).reshape(A, Bh, L)  # small: one int per output row
    if token_major:  # [A, L, Bh, d] memory: heads merge with the next layer's projection without a copy
        out = torch.empty(A, L, Bh, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    else:
        out = torch.empty(A, Bh, L, d, dtype=x.dtype, device=x.device)
    block_d = min(triton.next_power_of_2(max(d, 1)), 256)
    block_l = max(16, min(128, 8192 // block_d))
    if out.numel():
        _gather_rows_kernel[(triton.cdiv(L, block_l), A * Bh)](
            x4, idx, out, *x4.stride()[:3], *idx.stride(), *out.stride()[:3], Bh, L, d, BLOCK_L=block_l,
            BLOCK_D=block_d, num_warps=4)
    return out.view(*x.shape[:-2], L, d)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse, zero_padding, backend, token_major_out):
        ctx.save_for_backward(inverse)
        ctx.zero_padding, ctx.backend, ctx.x_token_major = zero_padding, backend, _is_token_major(x)
        return _gather_rows(x, index, zero_padding, backend, token_major_out)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.backend == "triton" and _triton_view(grad) is None:  # e.g. a convolution's NCHW gradient
            grad = grad.contiguous()
        # the gradient in x's own layout: a token-major x's gradient joins its projection's without a strided copy
        dx = _gather_rows(grad, inverse, ctx.zero_padding, ctx.backend, ctx.x_token_major)
        return dx, None, None, None, None, None


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor, *, zero_padding: bool = True,
                 backend: Optional[str] = None, token_major_out: bool = False) -> Tensor:
    """Rows of ``x`` (along its second-to-last axis) in the order ``index``; padding slots
    (``index < 0``) are zero.

    Args:
        x: ``[R, H, N, d]``, or any ``[..., N, d]`` (any strides: nothing is copied but the rows).
        index: ``[R, L]`` int64 (shared by the ``H`` axis), or ``[..., L]`` with one axis fewer than
            ``x`` whose leading axes broadcast to ``x``'s: the row of ``x`` each output slot takes,
            ``-1`` for padding. Every row index may appear at most once in a row of ``index``.
        inverse: ``[R, N]`` (or ``[..., N]``, as ``index``) int64, the slot that took each row
            (``index[r, inverse[r, t]] = t``), ``-1`` for rows no slot took (their gradient is zero).
        zero_padding: False: padding slots (and, in backward, rows no slot took) may hold a copy of
            row 0 instead of zeros (the torch backend: it saves a pass over the output); for callers
            that never read them (the Routing Transformer's pad slots are segments of their own).
        backend: "triton" (one kernel moving whole rows; needs contiguous rows and leading axes that
            merge into two), "torch" (``gather``), or None: Triton on a CUDA tensor it can take unless
            ``ROUTED_ROW_KERNEL=0`` (:func:`row_kernel_enabled`), else torch.
        token_major_out: the kernel writes the output as ``[R, L, H, d]`` memory (the axes between the
            first and the rows merged into ``H``), so heads merge for an output projection without a
            copy. Layouts only: values are the same. The backward's gradient always takes ``x``'s layout.
    Returns:
        ``[R, H, L, d]`` (``[..., L, d]``). The backward is ``permute_rows(grad, inverse, index)``.
    """
    if index.dim() == 2 and inverse.dim() == 2 and x.dim() == 4:  # the [R, H, N, d] form
        index, inverse = index[:, None], inverse[:, None]
    lead = x.shape[:-2]
    fits = (index.dim() == inverse.dim() == x.dim() - 1 and inverse.shape[-1] == x.shape[-2]
            and index.shape[:-1] == inverse.shape[:-1]
            and all(i in (1, n) for i, n in zip(index.shape[:-1], lead)))
    if not fits:
        raise ValueError(f"permute_rows: x [R, H, N, d] = {list(x.shape)} needs index [R, L] and inverse [R, N] "
                         f"(or, for x [..., N, d], index [..., L] and inverse [..., N] over x's leading axes); got "
                         f"index {list(index.shape)} and inverse {list(inverse.shape)}.")
    if backend not in _BACKENDS:
        raise ValueError(f"permute_rows: backend must be one of {_BACKENDS}, got {backend!r}.")
    return _PermuteRows.apply(x, index, inverse, zero_padding, backend, token_major_out)
