"""Triton kernels around the grouped expert GEMMs: the SwiGLU gate and the weighted combine.

Without them the dispatch spends more memory passes than GEMM-adjacent work needs: ``silu(g) * u``
is two kernels with a temporary, the unpermute is a gather followed by a ``[T, 1, k] @ [T, k, H]``
matmul, and the backward of the token gather is an atomic ``index_add`` in bfloat16. Here:

* ``_swiglu_fwd_kernel`` / ``_swiglu_bwd_kernel``: one pass over the ``[A, 2I]`` gate/up rows.
* ``_moe_combine_fwd_kernel``: ``out[t] = sum_j w[t, j] * y[inv[t, j]]`` (``inv = -1``: empty slot),
  reading each expert output row once, accumulating in float32. With no weights it is the
  deterministic backward of the gather ``x[token of each sorted row]``.
* ``_moe_combine_bwd_kernel``: for each token, ``dy[inv[t, j]] = w[t, j] * dout[t]`` and
  ``dw[t, j] = <dout[t], y[inv[t, j]]>``, each expert output row read and written once; every
  live row has exactly one slot, so no atomics.
"""

import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(GU, OUT, I, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(GU + row * stride_gu + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + I + offs, mask=m, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(OUT + row * stride_out + offs, h.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(GU, DOUT, DGU, I, stride_gu, stride_dout, stride_dgu, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(GU + row * stride_gu + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + I + offs, mask=m, other=0.0).to(tl.float32)
    dh = tl.load(DOUT + row * stride_dout + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dg = dh * u * (s + silu * (1.0 - s))
    du = dh * silu
    tl.store(DGU + row * stride_dgu + offs, dg.to(DGU.dtype.element_ty), mask=m)
    tl.store(DGU + row * stride_dgu + I + offs, du.to(DGU.dtype.element_ty), mask=m)


@triton.jit
def _moe_combine_fwd_kernel(Y, INV, W, OUT, H, K, stride_y, stride_out, HAS_W: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(0, K):
        a = tl.load(INV + t * K + j).to(tl.int64)
        live = a >= 0
        y = tl.load(Y + tl.where(live, a, 0) * stride_y + offs, mask=m & live, other=0.0).to(tl.float32)
        if HAS_W:
            y = y * tl.load(W + t * K + j).to(tl.float32)
        acc += y
    tl.store(OUT + t * stride_out + offs, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _moe_combine_bwd_kernel(DOUT, Y, INV, W, DY, DW, H, K, stride_dout, stride_y, stride_dy,
                            BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for j in range(0, K):
        a = tl.load(INV + t * K + j).to(tl.int64)
        live = a >= 0
        a_safe = tl.where(live, a, 0)
        w = tl.load(W + t * K + j).to(tl.float32)
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + tl.arange(0, BLOCK_H)
            m = offs < H
            do = tl.load(DOUT + t * stride_dout + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.load(Y + a_safe * stride_y + offs, mask=m & live, other=0.0).to(tl.float32)
            dot += do * y
            tl.store(DY + a_safe * stride_dy + offs, (w * do).to(DY.dtype.element_ty), mask=m & live)
        tl.store(DW + t * K + j, tl.sum(dot, axis=0))
