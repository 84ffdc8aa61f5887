"""Triton kernels of the gated branch sum: one launch forward, one backward.

Written in autograd ops, ``sum_g sigmoid(z_g) * o_g`` over NSA's three branches is ~7 launches
forward and ~20 backward (broadcast multiplies, the gates' row sums, ``select`` backward's zero
fills and copies), all of them passes over ``[B, H, N, D]`` tensors: at 8k tokens they cost more GPU
time than one of the branches' attention kernels. Here each program holds ``BLOCK_N`` tokens of one
(batch, head) for every branch:

* forward: ``out = sum_g sigmoid(z_g) * o_g`` (float32 accumulation), written token-major
  (``[B, N, H, D]`` memory) so the output projection's ``transpose(1, 2).reshape`` is a view;
* backward: ``d o_g = sigmoid(z_g) * d out`` and ``d z_g = s_g (1 - s_g) * rowsum(d out * o_g)``.

``G`` (the number of branches, at most 4) is a constexpr; unused branch pointers are dummies.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program_tile(H, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head), token rows and feature columns, and their masks."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < N
    return pid_bh // H, pid_bh % H, rows, cols, rm, rm[:, None] & (cols[None, :] < D)


@triton.jit
def _branch_tile(O, b, h, rows, cols, mask, s_b, s_h, s_n):
    ptr = O + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + rows.to(tl.int64)[:, None] * s_n + cols[None, :]
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gate(Z, b, h, g, rows, rm, sz_b, sz_n, sz_g, sz_h):
    z = tl.load(Z + b.to(tl.int64) * sz_b + rows.to(tl.int64) * sz_n + g * sz_g + h * sz_h, mask=rm, other=0.0)
    return tl.sigmoid(z.to(tl.float32))


@triton.jit
def _gated_sum_fwd_kernel(Z, O0, O1, O2, O3, Out,
                          sz_b, sz_n, sz_g, sz_h, so_b, so_h, so_n, sout_b, sout_h, sout_n,
                          H, N, D, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Branch tensors share strides ``so_*`` (last axis contiguous); one program per BLOCK_N tokens of one (b, h)."""
    b, h, rows, cols, rm, mask = _program_tile(H, N, D, BLOCK_N, BLOCK_D)
    acc = _gate(Z, b, h, 0, rows, rm, sz_b, sz_n, sz_g, sz_h)[:, None] * \
        _branch_tile(O0, b, h, rows, cols, mask, so_b, so_h, so_n)
    if G > 1:
        acc += _gate(Z, b, h, 1, rows, rm, sz_b, sz_n, sz_g, sz_h)[:, None] * \
            _branch_tile(O1, b, h, rows, cols, mask, so_b, so_h, so_n)
    if G > 2:
        acc += _gate(Z, b, h, 2, rows, rm, sz_b, sz_n, sz_g, sz_h)[:, None] * \
            _branch_tile(O2, b, h, rows, cols, mask, so_b, so_h, so_n)
    if G > 3:
        acc += _gate(Z, b, h, 3, rows, rm, sz_b, sz_n, sz_g, sz_h)[:, None] * \
            _branch_tile(O3, b, h, rows, cols, mask, so_b, so_h, so_n)
    out_ptr = Out + b.to(tl.int64) * sout_b + h.to(tl.int64) * sout_h + rows.to(tl.int64)[:, None] * sout_n + \
        cols[None, :]
    tl.store(out_ptr, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _branch_grads(Z, DZ, O, DO, dout, b, h, g, rows, cols, rm, mask, sz_b, sz_n, sz_g, sz_h,
                  sdz_b, sdz_n, sdz_g, sdz_h, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n):
    s = _gate(Z, b, h, g, rows, rm, sz_b, sz_n, sz_g, sz_h)
    o = _branch_tile(O, b, h, rows, cols, mask, so_b, so_h, so_n)
    dz = s * (1.0 - s) * tl.sum(dout * o, axis=1)
    tl.store(DZ + b.to(tl.int64) * sdz_b + rows.to(tl.int64) * sdz_n + g * sdz_g + h * sdz_h,
             dz.to(DZ.dtype.element_ty), mask=rm)
    do_ptr = DO + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h + rows.to(tl.int64)[:, None] * sdo_n + \
        cols[None, :]
    tl.store(do_ptr, (s[:, None] * dout).to(DO.dtype.element_ty), mask=mask)


@triton.jit
def _gated_sum_bwd_kernel(Z, O0, O1, O2, O3, DOut, DZ, DO0, DO1, DO2, DO3,
                          sz_b, sz_n, sz_g, sz_h, so_b, so_h, so_n, sdout_b, sdout_h, sdout_n,
                          sdz_b, sdz_n, sdz_g, sdz_h, sdo_b, sdo_h, sdo_n,
                          H, N, D, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DZ`` like ``Z``; the branch gradients ``DO*`` share strides ``sdo_*``."""
    b, h, rows, cols, rm, mask = _program_tile(H, N, D, BLOCK_N, BLOCK_D)
    dout = _branch_tile(DOut, b, h, rows, cols, mask, sdout_b, sdout_h, sdout_n)
    _branch_grads(Z, DZ, O0, DO0, dout, b, h, 0, rows, cols, rm, mask, sz_b, sz_n, sz_g, sz_h,
                  sdz_b, sdz_n, sdz_g, sdz_h, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n)
    if G > 1:
        _branch_grads(Z, DZ, O1, DO1, dout, b, h, 1, rows, cols, rm, mask, sz_b, sz_n, sz_g, sz_h,
                      sdz_b, sdz_n, sdz_g, sdz_h, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n)
    if G > 2:
        _branch_grads(Z, DZ, O2, DO2, dout, b, h, 2, rows, cols, rm, mask, sz_b, sz_n, sz_g, sz_h,
                      sdz_b, sdz_n, sdz_g, sdz_h, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n)
    if G > 3:
        _branch_grads(Z, DZ, O3, DO3, dout, b, h, 3, rows, cols, rm, mask, sz_b, sz_n, sz_g, sz_h,
                      sdz_b, sdz_n, sdz_g, sdz_h, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n)
