"""Triton kernels for block-importance estimates, and their host launchers.

Both kernels pack the query heads of a GQA group into one tile (rows ordered head-major, the
head count padded to a power of two with masked rows), so a key tile is loaded once for the
whole group and the reduction over the group's heads happens in registers. Each runs two passes
over the keys a tile may see: the first finds every row's softmax max and normaliser (exp2,
online), the second turns scores into probabilities and reduces them per key block. Nothing of
size ``q_len x kv_len`` is ever written: the output is one number per (row group, key block).

* ``_pooled_block_probs_kernel``: rows are mean-pooled query blocks, columns mean-pooled key
  blocks (with ``log2(tokens in the block)`` added: a block of ``n`` equal keys holds ``n`` times
  the mass of one).
* ``_sampled_block_mass_kernel``: rows are sampled queries, columns the real keys; a key tile is
  one key block, so the per-block mass is a row sum.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...testing import new_output
from ..compile_ops import compile_opaque

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
MAX_TILE_ROWS = 128  # rows (heads x query rows) per program


@triton.jit
def _online_softmax_step(m_i, l_i, s):
    """One key tile of the first pass: running row max ``m_i`` and normaliser ``l_i`` (log2 units;
    rows with nothing visible yet keep ``m_i = -inf`` and ``l_i = 0`` without NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
    return m_new, l_i


@triton.jit
def _softmax_finish(m_i, l_i):
    """What the second pass needs: a finite row max and ``1 / l`` (0 for rows that see nothing)."""
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    return m_safe, inv_l


@triton.jit
def _pooled_block_probs_kernel(PQ, PK, Out, stride_pqb, stride_pqh, stride_pqn, stride_pkb, stride_pkh, stride_pkn,
                               stride_ob, stride_oh, stride_om, n_heads_kv, group_size, nqb, nkb, q_len, kv_len,
                               block_size, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               GROUP_P: tl.constexpr, TILE_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, REDUCE: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_kv
    hkv = pid_bh % n_heads_kv
    ROWS: tl.constexpr = GROUP_P * TILE_Q
    r = tl.arange(0, ROWS)
    g = r // TILE_Q
    qb = pid_t * TILE_Q + r % TILE_Q
    row_ok = (g < group_size) & (qb < nqb)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    pq = tl.load(PQ + b * stride_pqb + (hkv * group_size + g)[:, None] * stride_pqh + qb[:, None] * stride_pqn
                 + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Position of the last query of each row's block (queries are the last q_len positions).
    qmax = tl.minimum((qb + 1) * block_size, q_len) - 1 + (kv_len - q_len)
    last_qb = tl.minimum(pid_t * TILE_Q + TILE_Q, nqb) - 1
    hi_pos = tl.minimum((last_qb + 1) * block_size, q_len) - 1 + (kv_len - q_len)
    n_hi = tl.minimum(hi_pos // block_size + 1, nkb)  # key blocks this tile may see

    pk_base = PK + b * stride_pkb + hkv * stride_pkh
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        pk = tl.load(pk_base + offs_n[:, None] * stride_pkn + offs_d[None, :],
                     mask=(offs_n < nkb)[:, None] & d_ok[None, :], other=0.0)
        cnt = tl.maximum(tl.minimum(kv_len - offs_n * block_size, block_size), 1).to(tl.float32)
        s = tl.dot(pq, tl.trans(pk), input_precision=DOT_PRECISION) * scale_log2 + tl.log2(cnt)[None, :]
        vis = (offs_n[None, :] * block_size <= qmax[:, None]) & (offs_n < nkb)[None, :] & row_ok[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_i, l_i = _online_softmax_step(m_i, l_i, s)
    m_safe, inv_l = _softmax_finish(m_i, l_i)

    offs_t = pid_t * TILE_Q + tl.arange(0, TILE_Q)
    out_base = Out + b * stride_ob + hkv * stride_oh + offs_t[:, None] * stride_om
    for start in range(0, nkb, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if start < n_hi:
            pk = tl.load(pk_base + offs_n[:, None] * stride_pkn + offs_d[None, :],
                         mask=(offs_n < nkb)[:, None] & d_ok[None, :], other=0.0)
            cnt = tl.maximum(tl.minimum(kv_len - offs_n * block_size, block_size), 1).to(tl.float32)
            s = tl.dot(pq, tl.trans(pk), input_precision=DOT_PRECISION) * scale_log2 + tl.log2(cnt)[None, :]
            vis = (offs_n[None, :] * block_size <= qmax[:, None]) & (offs_n < nkb)[None, :] & row_ok[:, None]
            p = tl.where(vis, tl.exp2(s - m_safe[:, None]) * inv_l[:, None], 0.0)
        else:
            p = tl.zeros([ROWS, BLOCK_N], tl.float32)
        if REDUCE == 2:  # per query head
            tl.store(Out + b * stride_ob + (hkv * group_size + g)[:, None] * stride_oh + qb[:, None] * stride_om
                     + offs_n[None, :], p, mask=row_ok[:, None] & (offs_n < nkb)[None, :])
        else:
            p3 = tl.reshape(p, (GROUP_P, TILE_Q, BLOCK_N))
            if REDUCE == 1:
                agg = tl.max(p3, 0)
            else:
                agg = tl.sum(p3, 0) / group_size
            tl.store(out_base + offs_n[None, :], agg, mask=(offs_t < nqb)[:, None] & (offs_n < nkb)[None, :])


@triton.jit
def _sampled_block_mass_kernel(Q, K, Rows, Out, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                               stride_ob, stride_oh, stride_og, n_heads_kv, group_size, num_groups, q_len, kv_len,
                               nkb, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               GROUP_P: tl.constexpr, TILE_G: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, REDUCE: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_kv
    hkv = pid_bh % n_heads_kv
    ROWS: tl.constexpr = GROUP_P * TILE_G * R
    r = tl.arange(0, ROWS)
    g = r // (TILE_G * R)
    grp = pid_t * TILE_G + (r // R) % TILE_G
    grp_ok = grp < num_groups
    row_ok = (g < group_size) & grp_ok
    qidx = tl.load(Rows + grp * R + r % R, mask=grp_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + (hkv * group_size + g)[:, None] * stride_qh + qidx[:, None] * stride_qn
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = qidx + (kv_len - q_len)
    hi = tl.max(tl.where(row_ok, qpos, 0), 0) + 1  # keys [0, hi) hold every visible one

    k_base = K + b * stride_kb + hkv * stride_kh
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=(offs_n < kv_len)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        vis = (offs_n[None, :] <= qpos[:, None]) & row_ok[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_i, l_i = _online_softmax_step(m_i, l_i, s)
    m_safe, inv_l = _softmax_finish(m_i, l_i)

    offs_t = pid_t * TILE_G + tl.arange(0, TILE_G)
    out_ptrs = Out + b * stride_ob + hkv * stride_oh + offs_t * stride_og
    for j in range(0, nkb):
        start = j * BLOCK_N
        if start < hi:
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=(offs_n < kv_len)[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            vis = (offs_n[None, :] <= qpos[:, None]) & row_ok[:, None]
            p = tl.where(vis, tl.exp2(s - m_safe[:, None]) * inv_l[:, None], 0.0)
            per_row = tl.reshape(tl.sum(p, 1), (GROUP_P, TILE_G, R))
            per_group = tl.sum(per_row, 2) / R  # [GROUP_P, TILE_G]
        else:
            per_group = tl.zeros([GROUP_P, TILE_G], tl.float32)
        if REDUCE == 2:  # per query head
            offs_g = tl.arange(0, GROUP_P)
            tl.store(Out + b * stride_ob + (hkv * group_size + offs_g)[:, None] * stride_oh
                     + offs_t[None, :] * stride_og + j, per_group,
                     mask=(offs_g < group_size)[:, None] & (offs_t < num_groups)[None, :])
        else:
            if REDUCE == 1:
                agg = tl.max(per_group, 0)
            else:
                agg = tl.sum(per_group, 0) / group_size
            tl.store(out_ptrs + j, agg, mask=offs_t < num_groups)


# ------------------------------------------------------------------------------------------------
# Host launchers


@triton.jit
def _block_means_kernel(X, Out, stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_on, n_heads, seq_len,
                        block_size, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (block j, batch x head): the float32 mean of the block's rows (the last block: of the
    rows it has), written in ``Out``'s dtype."""
    j = tl.program_id(0)
    b = tl.program_id(1) // n_heads
    h = tl.program_id(1) % n_heads
    offs_d = tl.arange(0, BLOCK_D)
    start = j * block_size
    end = tl.minimum(start + block_size, seq_len)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    acc = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        x = tl.load(base + rows.to(tl.int64)[:, None] * stride_xn + offs_d[None, :],
                    mask=(rows < end)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    mean = acc / (end - start).to(tl.float32)
    tl.store(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + j * stride_on + offs_d,
             mean.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


def block_means_triton(x: Tensor, block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`~routed.ops.block_scores.reference.block_means` in one launch (instead of the ~5 small
    ops of the PyTorch form), the result in ``dtype``: ``[B, H, N, D]`` -> ``[B, H, ceil(N / block_size), D]``."""
    B, H, n, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    nb = -(-n // block_size)
    out = new_output((B, H, nb, d), dtype=dtype, device=x.device)
    if out.numel():
        _block_means_kernel[(nb, B * H)](x, out, *x.stride()[:3], *out.stride()[:3], H, n, block_size, HEAD_DIM=d,
                                         BLOCK_D=triton.next_power_of_2(d),
                                         BLOCK_R=min(64, triton.next_power_of_2(block_size)), num_warps=4)
    return out


_REDUCE = {"mean": 0, "max": 1, "none": 2}  # over the query heads of a GQA group ("none": kept per head)


def _group_pow2(group_size: int) -> int:
    return triton.next_power_of_2(group_size)


def _pooled_block_probs_fake(q: Tensor, k: Tensor, block_size: int, scale: float, head_reduce: str) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[1] if head_reduce == "none" else k.shape[1],
                        -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)), dtype=torch.float32)


@compile_opaque("pooled_block_probs", _pooled_block_probs_fake)
def _pooled_block_probs_launch(q: Tensor, k: Tensor, block_size: int, scale: float, head_reduce: str) -> Tensor:
    """The launches behind :func:`pooled_block_probs_triton`."""
    B, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    # low-precision inputs: tensor-core dots on means rounded to that precision
    mean_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    pq, pk = block_means_triton(q, block_size, mean_dtype), block_means_triton(k, block_size, mean_dtype)
    nqb, nkb = pq.shape[2], pk.shape[2]
    gp = _group_pow2(hq // hkv)
    tile_q = max(16 // gp, min(64 // gp, 64), 1)  # 64 rows: the query tile stays in registers
    out = new_output((B, hq if head_reduce == "none" else hkv, nqb, nkb), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(nqb, tile_q), B * hkv)
    _pooled_block_probs_kernel[grid](
        pq, pk, out, *pq.stride()[:3], *pk.stride()[:3], *out.stride()[:3], hkv, hq // hkv, nqb, nkb, nq, nk,
        block_size, scale * LOG2E, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), GROUP_P=gp,
        TILE_Q=tile_q, BLOCK_N=64, DOT_PRECISION="ieee" if pq.dtype == torch.float32 else "tf32",
        REDUCE=_REDUCE[head_reduce], num_warps=4)
    return out


def pooled_block_probs_triton(q: Tensor, k: Tensor, block_size: int, scale: float,
                              head_reduce: str = "max") -> Tensor:
    """Triton version of :func:`~routed.ops.block_scores.reference.pooled_block_probs_reference`
    (same arguments, same ``[B, Hkv, nqb, nkb]`` float32 result). Pooling is one read of q and k
    (a float32 sum over a view); the scores, the softmax and the group reduction are one kernel.
    One opaque node under ``torch.compile``."""
    return _pooled_block_probs_launch(q, k, block_size, float(scale), head_reduce)


def _sampled_block_mass_fake(q: Tensor, k: Tensor, rows: Tensor, rows_per_group: int, block_size: int, scale: float,
                             head_reduce: str) -> Tensor:
    return q.new_empty((q.shape[0], q.shape[1] if head_reduce == "none" else k.shape[1],
                        rows.numel() // rows_per_group, -(-k.shape[2] // block_size)), dtype=torch.float32)


def sampled_block_mass_triton(q: Tensor, k: Tensor, rows: Tensor, rows_per_group: int, block_size: int,
                              scale: float, head_reduce: str = "max") -> Tensor:
    """Triton version of :func:`~routed.ops.block_scores.reference.sampled_block_mass_reference`
    (same arguments, same ``[B, Hkv, num_groups, nkb]`` float32 result). One opaque node under
    ``torch.compile``."""
    return _sampled_block_mass_launch(q, k, rows, rows_per_group, block_size, float(scale), head_reduce)


@compile_opaque("sampled_block_mass", _sampled_block_mass_fake)
def _sampled_block_mass_launch(q: Tensor, k: Tensor, rows: Tensor, rows_per_group: int, block_size: int,
                               scale: float, head_reduce: str) -> Tensor:
    """The launch behind :func:`sampled_block_mass_triton`."""
    B, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    rows = rows.to(device=q.device, dtype=torch.int32).contiguous()
    num_groups = rows.numel() // rows_per_group
    nkb = math.ceil(nk / block_size)
    gp = _group_pow2(hq // hkv)
    r = rows_per_group
    tile_g = max(1, MAX_TILE_ROWS // (gp * r))
    while gp * tile_g * r < 16:  # tl.dot needs at least 16 rows
        tile_g *= 2
    out = new_output((B, hq if head_reduce == "none" else hkv, num_groups, nkb), dtype=torch.float32,
                     device=q.device)
    grid = (triton.cdiv(num_groups, tile_g), B * hkv)
    _sampled_block_mass_kernel[grid](
        q, k, rows, out, *q.stride()[:3], *k.stride()[:3], *out.stride()[:3], hkv, hq // hkv, num_groups, nq, nk,
        nkb, scale * LOG2E, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), GROUP_P=gp, TILE_G=tile_g, R=r,
        BLOCK_N=block_size, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        REDUCE=_REDUCE[head_reduce], num_warps=8 if gp * tile_g * r >= 128 else 4)
    return out
