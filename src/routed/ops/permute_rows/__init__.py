"""Rows moved by a permutation with padding slots, with a backward that gathers instead of adding.

``x.gather`` along the sequence has a ``scatter_add`` backward: atomic adds, and when many slots
read one row (padding slots clamped to token 0, as cluster-sorted layouts have), those adds
serialise on that row. Where the index is a bijection between real slots and tokens, the
gradient of every row is the gradient of the one slot that read it: the backward is the inverse
gather, no atomics, exact.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gather_rows(x: Tensor, index: Tensor, zero_padding: bool) -> Tensor:
    """``y[..., s, :] = x[..., index[..., s], :]`` (``index`` broadcast over ``x``'s leading dims and
    ``d``); where ``index < 0``: zero, or row 0 when not ``zero_padding``."""
    y = x.gather(-2, index.clamp_min(0).unsqueeze(-1).expand(*x.shape[:-2], index.shape[-1], x.shape[-1]))
    return y.masked_fill((index < 0).unsqueeze(-1), 0) if zero_padding else y


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse, zero_padding):
        ctx.save_for_backward(inverse)
        ctx.zero_padding = zero_padding
        return _gather_rows(x, index, zero_padding)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_rows(grad, inverse, ctx.zero_padding), None, None, None


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor, *, zero_padding: bool = True) -> Tensor:
    """Rows of ``x`` (along its second-to-last axis) in the order ``index``; padding slots
    (``index < 0``) are zero.

    Args:
        x: ``[R, H, N, d]``, or any ``[..., N, d]`` (any strides: nothing is copied but the rows).
        index: ``[R, L]`` int64 (shared by the ``H`` axis), or ``[..., L]`` with one axis fewer than
            ``x`` whose leading axes broadcast to ``x``'s: the row of ``x`` each output slot takes,
            ``-1`` for padding. Every row index may appear at most once in a row of ``index``.
        inverse: ``[R, N]`` (or ``[..., N]``, as ``index``) int64, the slot that took each row
            (``index[r, inverse[r, t]] = t``), ``-1`` for rows no slot took (their gradient is zero).
        zero_padding: False: padding slots (and, in backward, rows no slot took) hold a copy of row 0
            instead of zeros, which saves a pass over the output; for callers that never read them
            (the Routing Transformer's pad slots are segments of their own).
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
    return _PermuteRows.apply(x, index, inverse, zero_padding)
