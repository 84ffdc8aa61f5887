"""Triton kernel of the rotary embedding: one pass that reads ``x`` (any head/token strides, last axis
contiguous) and ``cos``/``sin`` and writes the rotated rows, in float32, instead of PyTorch's five
passes (two products, the ``cat`` of ``rotate_half``, a sum) forward and as many backward. The
backward is the same kernel with the transposed rotation."""

import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(X, Cos, Sin, Out, stride_xb, stride_xh, stride_xn, stride_cb, stride_cn, stride_ob, stride_oh,
                   stride_on, n_heads, seq_len, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                   BACKWARD: tl.constexpr):
    """Rows ``pid_n * BLOCK_N ...`` of one ``(b, h)``: ``out1 = x1 c1 - x2 s1``, ``out2 = x2 c2 + x1 s2``
    (halves of the head dim); ``BACKWARD``: ``dx1 = g1 c1 + g2 s2``, ``dx2 = g2 c2 - g1 s1``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_H)
    mask = (offs_n < seq_len)[:, None] & (offs_d < HALF)[None, :]
    cs = b * stride_cb + offs_n[:, None] * stride_cn + offs_d[None, :]
    c1 = tl.load(Cos + cs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + cs + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + cs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + cs + HALF, mask=mask, other=0.0).to(tl.float32)
    xs = X + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :]
    x1 = tl.load(xs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xs + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    os = Out + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :]
    tl.store(os, y1.to(Out.dtype.element_ty), mask=mask)
    tl.store(os + HALF, y2.to(Out.dtype.element_ty), mask=mask)
