"""Triton kernels of the k-means router's per-token work (:mod:`routed.routers.kmeans`).

One pass over the vectors replaces PyTorch's chain for a training call of the router: the float32 unit
vectors ``x / |x|`` (a full-size copy), their ``[B, H, N, C]`` similarities to every centroid (a float32
GEMM and a tensor of ``C`` floats per token), the argmax, the gathered ``[B, H, N, D]`` float32 centroid
of every token (kept for the commitment loss's backward), the cosine to it, and the per-cluster sums of
the unit vectors for the EMA step (``index_add_``). The kernels keep ``x`` in its own dtype and strides
and write only ``[B, H, N]`` numbers (and the ``[H, C, D]`` sums); the backward of the commitment loss
gathers each token's centroid again from the ``[H, C, D]`` table instead of saving ``[B, H, N, D]``.
"""

import triton
import triton.language as tl


@triton.jit
def _load_rows(X, stride_xb, stride_xh, stride_xg, stride_xn, n_heads, n_groups, seq_len, dim,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's ``(b, h, g)``, row and column offsets, and its ``[BLOCK_N, BLOCK_D]`` rows of
    ``x [B, H, G, N, D]`` in float32 (zeros past the ends); grid ``(row tiles, B * H * G)``."""
    pid = tl.program_id(1)
    g = (pid % n_groups).to(tl.int64)
    h = ((pid // n_groups) % n_heads).to(tl.int64)
    b = (pid // (n_groups * n_heads)).to(tl.int64)
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(X + b * stride_xb + h * stride_xh + g * stride_xg + offs_n[:, None] * stride_xn + offs_d[None, :],
                mask=(offs_n < seq_len)[:, None] & (offs_d < dim)[None, :], other=0.0).to(tl.float32)
    return b, h, g, offs_n, offs_d, x


@triton.jit
def _centroid_fwd_kernel(X, Cent, A, Norm, Cos, Sums,
                         stride_xb, stride_xh, stride_xg, stride_xn,
                         stride_ab, stride_ah, stride_an,
                         stride_sb, stride_sh, stride_sg,
                         n_heads, n_groups, seq_len, n_clusters, dim, eps,
                         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         ASSIGN: tl.constexpr, SUMS: tl.constexpr, PRECISION: tl.constexpr):
    """Rows ``pid_n * BLOCK_N ...`` of one ``(b, h, g)`` of ``x [B, H, G, N, D]``.

    ``ASSIGN``: the nearest centroid of each row (cosine; the first one on ties, as ``argmax``; products
    at ``PRECISION``) is written to ``A [B, H, N]`` (int64); else it is read from there (``G`` rows share it). Always
    writes ``|x|`` and ``<x / max(|x|, eps), c_a>`` to ``Norm``/``Cos [B, H, G, N]`` (float32) and,
    with ``SUMS``, adds each unit row to ``Sums [H, C, D]`` (float32 atomics).
    """
    b, h, g, offs_n, offs_d, x = _load_rows(X, stride_xb, stride_xh, stride_xg, stride_xn, n_heads, n_groups,
                                            seq_len, dim, BLOCK_N, BLOCK_D)
    row_ok = offs_n < seq_len
    d_ok = offs_d < dim
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    xn = x / tl.maximum(norm, eps)[:, None]
    cent = Cent + h * n_clusters * dim
    a_ptrs = A + b * stride_ab + h * stride_ah + offs_n * stride_an
    if ASSIGN:
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_N,), tl.int32)
        for c0 in range(0, n_clusters, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c = tl.load(cent + offs_c[:, None] * dim + offs_d[None, :],
                        mask=(offs_c < n_clusters)[:, None] & d_ok[None, :], other=0.0)
            # products at float32 precision ("ieee": FMA) or near it ("tf32x3": three TF32 tensor-core passes):
            # plain TF32 (2^-11) would flip the choice between nearly equidistant centroids
            s = tl.dot(xn, tl.trans(c), input_precision=PRECISION)
            s = tl.where((offs_c < n_clusters)[None, :], s, float("-inf"))
            s_best = tl.max(s, axis=1)
            s_arg = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32) + c0
            take = s_best > best  # strictly: on ties the earlier chunk's (lower) index stays
            arg = tl.where(take, s_arg, arg)
            best = tl.where(take, s_best, best)
        tl.store(a_ptrs, arg.to(tl.int64), mask=row_ok)
        a = arg.to(tl.int64)
    else:
        a = tl.load(a_ptrs, mask=row_ok, other=0)
    ca = tl.load(cent + a[:, None] * dim + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    cos = tl.sum(xn * ca, axis=1)
    stat = b * stride_sb + h * stride_sh + g * stride_sg + offs_n
    tl.store(Norm + stat, norm, mask=row_ok)
    tl.store(Cos + stat, cos, mask=row_ok)
    if SUMS:
        tl.atomic_add(Sums + (h * n_clusters + a)[:, None] * dim + offs_d[None, :], xn,
                      mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def _commitment_bwd_kernel(X, Cent, A, Norm, Cos, Grad, Out,
                           stride_xb, stride_xh, stride_xg, stride_xn,
                           stride_ab, stride_ah, stride_an,
                           stride_sb, stride_sh, stride_sg,
                           stride_ob, stride_oh, stride_og, stride_on,
                           n_heads, n_groups, seq_len, n_clusters, dim, eps,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d/dx of ``g * sum(|x_hat|^2 - 2 <x_hat, c_a>)``, ``x_hat = x / max(|x|, eps)``: per row
    ``(-2 g / m) (c_a - x w / m)`` with ``m = max(|x|, eps)`` and ``w = <x_hat, c_a>`` (or 1 where
    ``|x| <= eps``, where ``|x_hat|^2`` is not constant). ``Grad``: the scalar ``g`` (float32)."""
    b, h, g, offs_n, offs_d, x = _load_rows(X, stride_xb, stride_xh, stride_xg, stride_xn, n_heads, n_groups,
                                            seq_len, dim, BLOCK_N, BLOCK_D)
    row_ok = offs_n < seq_len
    mask = row_ok[:, None] & (offs_d < dim)[None, :]
    a = tl.load(A + b * stride_ab + h * stride_ah + offs_n * stride_an, mask=row_ok, other=0)
    stat = b * stride_sb + h * stride_sh + g * stride_sg + offs_n
    norm = tl.load(Norm + stat, mask=row_ok, other=1.0)
    cos = tl.load(Cos + stat, mask=row_ok, other=0.0)
    m = tl.maximum(norm, eps)
    w = tl.where(norm <= eps, 1.0, cos) / m
    ca = tl.load(Cent + (h * n_clusters + a)[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
    scale = -2.0 * tl.load(Grad) / m
    dx = (ca - x * w[:, None]) * scale[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + g * stride_og + offs_n[:, None] * stride_on + offs_d[None, :],
             dx.to(Out.dtype.element_ty), mask=mask)
