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


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``y[r, h, s] = x[r, h, index[r, s]]``, zero where ``index < 0``. ``x [R, H, N, d]``, ``index [R, L]``."""
    R, H, _, d = x.shape
    L = index.shape[1]
    y = x.gather(2, index.clamp_min(0).view(R, 1, L, 1).expand(R, H, L, d))
    return y.masked_fill((index < 0).view(R, 1, L, 1), 0)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_rows(grad, inverse), None, None


def permute_rows(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """Rows of ``x`` in the order ``index``; padding slots (``index < 0``) are zero.

    Args:
        x: ``[R, H, N, d]``.
        index: ``[R, L]`` int64, the row of ``x`` each output slot takes, ``-1`` for padding. Every
            row index may appear at most once in a row of ``index``.
        inverse: ``[R, N]`` int64, the slot that took each row (``index[r, inverse[r, t]] = t``), ``-1``
            for rows no slot took (their gradient is zero).
    Returns:
        ``[R, H, L, d]``. The backward is ``permute_rows(grad, inverse, index)``.
    """
    if index.dim() != 2 or inverse.dim() != 2 or index.shape[0] != x.shape[0] or inverse.shape != (x.shape[0],
                                                                                                       x.shape[2]):
        raise ValueError(f"permute_rows: x [R, H, N, d] = {list(x.shape)} needs index [R, L] and inverse [R, N]; got "
                         f"index {list(index.shape)} and inverse {list(inverse.shape)}.")
    return _PermuteRows.apply(x, index, inverse)
