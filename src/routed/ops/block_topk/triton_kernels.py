"""Triton kernels of the block routers: NSA's selection scores, and the fused top-k route.

NSA scores: one program per (query block, batch x KV head): the query heads of the GQA group and a tile of the
block's queries are packed into the rows of one tile (head-major, the head count padded to a
power of two with masked rows), so each compressed-key tile is loaded once for the whole group.
For every compressed key the program sums, over its rows, the compressed-attention probability
``exp(scale * q . k_cmp - lse)`` (``lse``: the compressed branch's log-sum-exp, already known), with
the causal test on the compressed blocks' end positions applied only on the key tiles that cross it
(tiles every row sees whole skip it; tiles wholly after the block's last query are skipped, zeros
written). The scores are computed transposed (keys x rows), so the sum over rows stays inside a warp
instead of crossing warps through shared memory; a query tile that holds the whole block is loaded
once, and the latest query blocks (the most work) are launched first.

Top-k route (:func:`block_topk_triton`): one program per (query block, batch x route head) holds the
whole score row, applies the causal window and the forced blocks, picks the top blocks by repeated
argmax and writes them sorted: one launch instead of the ~35 small ops (two sorts) of the PyTorch
route builder, whose launches dominated a router's time on the GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...testing import new_output
from ..compile_ops import compile_opaque

LOG2E = 1.4426950408889634


@triton.jit
def _mass_tile(kc, q, lse2, scale_log2, DOT_PRECISION: tl.constexpr):
    """``[BLOCK_N]``: one compressed-key tile's probabilities summed over a query tile's rows. The
    scores come transposed (keys x rows) so the sum runs along a tile row, inside each warp."""
    s = tl.dot(kc, tl.trans(q), input_precision=DOT_PRECISION)
    return tl.sum(tl.exp2(s * scale_log2 - lse2[None, :]), 1)


@triton.jit
def _mass_rows(q_base, l_base, qi, g, group_size, q_end, stride_qn, stride_ln, offs_d, d_ok):
    """A query tile and its ``lse`` in log2 units; rows that add nothing (padding, queries that see no
    compressed block) get ``+inf``, which turns every probability of theirs into 0."""
    row_ok = (g < group_size) & (qi < q_end)
    q = tl.load(q_base + qi[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(l_base + qi * stride_ln, mask=row_ok, other=float("-inf"))
    return q, tl.where(lse > float("-inf"), lse * 1.4426950408889634, float("inf"))


@triton.jit
def _nsa_compressed_mass_kernel(Q, KC, LSE, Out, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                                stride_lb, stride_lh, stride_ln, stride_ob, stride_oh, stride_om, n_heads_kv,
                                group_size, q_len, kv_len, num_cmp, nqb, q_block, cmp_block, cmp_stride, scale_log2,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_P: tl.constexpr,
                                TILE_Q: tl.constexpr, BLOCK_N: tl.constexpr, ONE_Q_TILE: tl.constexpr,
                                DOT_PRECISION: tl.constexpr):
    # Causal work grows with the query block: launch the latest (longest) blocks first so the short
    # ones fill the last wave.
    pid_qb = nqb - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_kv
    hkv = pid_bh % n_heads_kv
    ROWS: tl.constexpr = GROUP_P * TILE_Q
    r = tl.arange(0, ROWS)
    g = r // TILE_Q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_start = pid_qb * q_block
    q_end = tl.minimum(q_start + q_block, q_len)
    off = kv_len - q_len
    # Compressed blocks (block i ends at i * cmp_stride + cmp_block - 1) that have ended by the
    # block's first query (every row sees them: no causal mask) and by its last query.
    x_first = q_start + off - (cmp_block - 1)
    n_first = tl.where(x_first >= 0, tl.minimum(x_first // cmp_stride + 1, num_cmp), 0)
    x_last = q_end - 1 + off - (cmp_block - 1)
    n_vis = tl.where(x_last >= 0, tl.minimum(x_last // cmp_stride + 1, num_cmp), 0)
    n_full = (n_first // BLOCK_N) * BLOCK_N
    n_diag = n_full + tl.cdiv(n_vis - n_full, BLOCK_N) * BLOCK_N
    q_base = Q + b * stride_qb + (hkv * group_size + g)[:, None] * stride_qh
    l_base = LSE + b * stride_lb + (hkv * group_size + g) * stride_lh
    kc_base = KC + b * stride_kb + hkv * stride_kh
    out_base = Out + b * stride_ob + hkv * stride_oh + pid_qb * stride_om
    if ONE_Q_TILE:  # the whole block's rows in one tile: load them once
        q, lse2 = _mass_rows(q_base, l_base, q_start + r % TILE_Q, g, group_size, q_end, stride_qn, stride_ln,
                             offs_d, d_ok)
    for n0 in range(0, n_full, BLOCK_N):  # tiles every row sees whole
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kc = tl.load(kc_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        if ONE_Q_TILE:
            acc = _mass_tile(kc, q, lse2, scale_log2, DOT_PRECISION)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
            for t0 in range(q_start, q_end, TILE_Q):
                qt, lt = _mass_rows(q_base, l_base, t0 + r % TILE_Q, g, group_size, q_end, stride_qn, stride_ln,
                                    offs_d, d_ok)
                acc += _mass_tile(kc, qt, lt, scale_log2, DOT_PRECISION)
        tl.store(out_base + offs_n, acc)
    for n0 in range(n_full, n_diag, BLOCK_N):  # tiles that cross the causal edge: masked
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kc = tl.load(kc_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                     mask=(offs_n < num_cmp)[:, None] & d_ok[None, :], other=0.0)
        end_pos = tl.where(offs_n < num_cmp, offs_n * cmp_stride + cmp_block - 1, kv_len)  # kv_len: never seen
        acc = tl.zeros([BLOCK_N], tl.float32)
        for t0 in range(q_start, q_end, TILE_Q):
            qi = t0 + r % TILE_Q
            if ONE_Q_TILE:
                qt, lt = q, lse2
            else:
                qt, lt = _mass_rows(q_base, l_base, qi, g, group_size, q_end, stride_qn, stride_ln, offs_d, d_ok)
            s = tl.dot(kc, tl.trans(qt), input_precision=DOT_PRECISION)
            vis = end_pos[:, None] <= (qi + off)[None, :]
            acc += tl.sum(tl.where(vis, tl.exp2(s * scale_log2 - lt[None, :]), 0.0), 1)
        tl.store(out_base + offs_n, acc, mask=offs_n < num_cmp)
    for n0 in range(n_diag, num_cmp, BLOCK_N):  # tiles after the block's last query
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_base + offs_n, tl.zeros([BLOCK_N], tl.float32), mask=offs_n < num_cmp)


def nsa_compressed_mass_triton(q: Tensor, k_cmp: Tensor, lse: Tensor, kv_len: int, q_block_size: int,
                               compress_block: int, compress_stride: int, scale: float) -> Tensor:
    """``[B, Hkv, nqb, Nc]`` float32: per query block, the compressed-attention probability mass of
    every compressed block, summed over the block's queries and the query heads of the KV group.
    One opaque node under ``torch.compile``.

    Args:
        q: ``[B, Hq, Nq, D]`` (the last ``Nq`` of ``kv_len`` positions); k_cmp: ``[B, Hkv, Nc, D]``
            compressed keys (block ``i`` ends at position ``i * compress_stride + compress_block - 1``);
        lse: ``[B, Hq, Nq]`` the compressed branch's natural-log log-sum-exp (``-inf``: sees nothing).
    """
    return _nsa_compressed_mass_launch(q, k_cmp, lse, kv_len, q_block_size, compress_block, compress_stride,
                                       float(scale))


def _nsa_compressed_mass_fake(q: Tensor, k_cmp: Tensor, lse: Tensor, kv_len: int, q_block_size: int,
                              compress_block: int, compress_stride: int, scale: float) -> Tensor:
    return q.new_empty((q.shape[0], k_cmp.shape[1], -(-q.shape[2] // q_block_size), k_cmp.shape[2]),
                       dtype=torch.float32)


def nsa_mass_configs(group: int, q_block_size: int) -> list[dict]:
    """Launch configs of the mass kernel, the hand-chosen one first (what runs untuned: the CPU,
    ``ROUTED_AUTOTUNE=0``). A tile's rows are ``GROUP_P * TILE_Q`` (the group's heads x a run of
    the block's queries); every (key tile, query tile) pair reloads its queries and their lse, so
    taller tiles (a whole 64-query block of a 4-head group in 256 rows) and wider key tiles cut those
    reloads, at the price of registers (8 warps for the 256-row tiles)."""
    gp = triton.next_power_of_2(group)
    qp = triton.next_power_of_2(q_block_size)

    def rows(n: int) -> int:  # 16 rows at least for tl.dot; never taller than the block needs
        return max(16 // gp, min(n // gp, qp), 1)

    configs = []
    for tile_rows, block_n, warps in ((64, 64, 4), (128, 64, 4), (256, 64, 4), (256, 64, 8), (128, 128, 4),
                                      (256, 128, 8)):
        cfg = dict(TILE_Q=rows(tile_rows), BLOCK_N=block_n, num_warps=warps)
        if cfg not in configs:
            configs.append(cfg)
    return configs


def nsa_mass_launch_with(cfg: dict, q: Tensor, k_cmp: Tensor, lse: Tensor, out: Tensor, kv_len: int,
                         q_block_size: int, compress_block: int, compress_stride: int, scale: float) -> None:
    """One launch of the mass kernel in config ``cfg`` (from :func:`nsa_mass_configs`), writing all
    of ``out [B, Hkv, nqb, Nc]``."""
    hq, nq, d = q.shape[1], q.shape[2], q.shape[3]
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    nqb = out.shape[2]
    _nsa_compressed_mass_kernel[(nqb, q.shape[0] * hkv)](
        q, k_cmp, lse, out, *q.stride()[:3], *k_cmp.stride()[:3], *lse.stride(), *out.stride()[:3], hkv, hq // hkv,
        nq, kv_len, nc, nqb, q_block_size, compress_block, compress_stride, scale * LOG2E, HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), GROUP_P=triton.next_power_of_2(hq // hkv), TILE_Q=cfg["TILE_Q"],
        BLOCK_N=cfg["BLOCK_N"], ONE_Q_TILE=cfg["TILE_Q"] >= q_block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"])


@compile_opaque("nsa_compressed_mass", _nsa_compressed_mass_fake)
def _nsa_compressed_mass_launch(q: Tensor, k_cmp: Tensor, lse: Tensor, kv_len: int, q_block_size: int,
                                compress_block: int, compress_stride: int, scale: float) -> Tensor:
    """The launch behind :func:`nsa_compressed_mass_triton`: autotuned over :func:`nsa_mass_configs`
    on the first call of each shape (on CUDA, unless ``ROUTED_AUTOTUNE=0``)."""
    from ..block_sparse.triton_ops import _autotuned

    B, hq, nq, d = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    nqb = -(-nq // q_block_size)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cmp = k_cmp.to(q.dtype)
    k_cmp = k_cmp if k_cmp.stride(-1) == 1 else k_cmp.contiguous()
    lse = lse.float()
    out = new_output((B, hkv, nqb, nc), dtype=torch.float32, device=q.device)
    if nc == 0:
        return out
    args = (q, k_cmp, lse, out, kv_len, q_block_size, compress_block, compress_stride, scale)
    key = (d, str(q.dtype), hq // hkv, q_block_size, compress_block, compress_stride, max(1, nq).bit_length(),
           nc.bit_length())
    cfg = _autotuned("nsa_compressed_mass", key, nsa_mass_configs(hq // hkv, q_block_size),
                     lambda c: nsa_mass_launch_with(c, *args), q.device)
    nsa_mass_launch_with(cfg, *args)
    return out


# The widest score row one program holds in registers (1M keys at blocks of 64); wider rows take
# the PyTorch path of routed.routers.blocks.block_topk_route.
TOPK_MAX_BLOCKS = 16384


@triton.jit
def _block_topk_kernel(S, Ids, Counts, stride_sb, stride_sh, stride_sq, stride_ib, stride_ih, stride_iq,
                       stride_cb, stride_ch, n_heads, group, nkb, q_len, kv_len, q_block, kv_block, width,
                       sink_blocks, local_blocks, n_src, spread_scale, REDUCE: tl.constexpr, RENORM: tl.constexpr,
                       NKB_P2: tl.constexpr, WIDTH_P2: tl.constexpr, SPREAD_PER: tl.constexpr,
                       SPREAD_W: tl.constexpr):
    # REDUCE: 1 = max over the group's rows (group 1: the head's own row), 2 = mean over them.
    # SPREAD_W > 0: a row holds ``n_src`` compressed-block scores (NSA, the stride dividing the compressed
    # and the key blocks), and key block j scores spread_scale * sum over t < SPREAD_PER, w < SPREAD_W of
    # row[j * SPREAD_PER + t - w]: routed.routers.blocks.spread_to_selection_blocks, read in place.
    qb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    off = kv_len - q_len
    first = (qb * q_block + off) // kv_block  # first key block the query block overlaps
    diag = (tl.minimum((qb + 1) * q_block, q_len) - 1 + off) // kv_block  # key block of its last query
    kb = tl.arange(0, NKB_P2)
    visible = kb <= diag  # (diag < nkb, so this also keeps kb in range)
    row = S + b.to(tl.int64) * stride_sb + qb.to(tl.int64) * stride_sq  # int64: score tensors may pass 2^31
    # The head's score row, or the max / mean of its group's rows (a max over one row is the row).
    if REDUCE == 2:
        s = tl.zeros([NKB_P2], tl.float32)
    else:
        s = tl.full([NKB_P2], float("-inf"), tl.float32)
    for g in range(group):
        head_row = row + (h * group + g).to(tl.int64) * stride_sh
        if SPREAD_W > 0:
            p = tl.zeros([NKB_P2], tl.float32)
            for t in tl.static_range(SPREAD_PER):
                chunk = tl.zeros([NKB_P2], tl.float32)  # the compressed blocks covering one stride of keys
                for w in tl.static_range(SPREAD_W):
                    src = kb * SPREAD_PER + (t - w)
                    chunk += tl.load(head_row + src, mask=visible & (src >= 0) & (src < n_src), other=0.0)
                p += chunk
            p = p * spread_scale
        else:
            p = tl.load(head_row + kb, mask=visible, other=0.0).to(tl.float32)
        if RENORM:  # MoBA: each head's probabilities renormalised over the blocks before the query block
            p = tl.where(kb < first, p, 0.0)
            p = p / tl.maximum(tl.sum(p, 0), 1.1754943508222875e-38)
        if REDUCE == 2:
            s = s + p
        else:
            s = tl.maximum(s, p)
    if REDUCE == 2:
        s = s / group
    forced = visible & ((kb < sink_blocks) | (kb >= tl.minimum(first, diag - local_blocks + 1)))
    key = tl.where(forced, float("inf"), s)
    key = tl.where(visible, key, float("-inf"))
    # `width` rounds of argmax (ties to the lower block id, as a stable descending sort); a block
    # scoring -inf is never kept.
    keep = kb < 0
    for _i in range(width):
        m = tl.max(key, 0)
        pick = tl.min(tl.where(key == m, kb, NKB_P2), 0)
        pick = tl.where(m > float("-inf"), pick, NKB_P2)  # nothing left to keep: match no block
        hit = kb == pick
        keep = keep | hit
        key = tl.where(hit, float("-inf"), key)
    # Compact the kept ids in increasing order, pad with -1.
    n_keep = tl.sum(keep.to(tl.int32), 0)
    slot = tl.cumsum(keep.to(tl.int32), 0) - 1
    out = Ids + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qb.to(tl.int64) * stride_iq
    tl.store(out + slot, kb.to(tl.int32), mask=keep)
    pad = tl.arange(0, WIDTH_P2)
    tl.store(out + pad, tl.full([WIDTH_P2], -1, tl.int32), mask=(pad >= n_keep) & (pad < width))
    tl.store(Counts + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + qb, n_keep)


def block_topk_triton(scores: Tensor, *, width: int, q_len: int, kv_len: int, q_block_size: int,
                      kv_block_size: int, sink_blocks: int, local_blocks: int, group: int = 1,
                      reduce: str = "none", renormalize: bool = False,
                      spread: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
    """The ``width`` best visible key blocks of every query block, sinks and the local window forced
    in, in one launch: ids ``[B, H, nqb, width]`` int32 (sorted, -1 padded) and counts ``[B, H, nqb]``.

    Args:
        scores: ``[B, H * group, nqb, nkb]`` float (higher is better; only visible entries are read).
        width: slots per row (the top-k, widened for forced blocks); see ``block_topk_route``.
        group, reduce: ``"none"`` (group 1) or ``"max"``/``"mean"`` over each head's ``group`` rows
            (MoBA's GQA group reduction) before the selection.
        renormalize: divide each row by its sum over the key blocks wholly before the query block
            (MoBA's candidates) before the reduction.
        spread: ``(compress_block, compress_stride)``: ``scores`` is ``[B, H, nqb, Nc]``, NSA's mass per
            compressed block, spread over the key blocks in the kernel as
            ``routed.routers.blocks.spread_to_selection_blocks`` does (the stride must divide
            ``compress_block`` and ``kv_block_size``).
    Semantics equal ``routed.routers.blocks.block_topk_route`` (the PyTorch reference) on the reduced
    scores: ties go to the lower block id, blocks scoring -inf are never kept (scores must not be NaN:
    the reference sorts NaN first, this kernel would skip the row's remaining picks).
    """
    B, hg, nqb, _ = scores.shape
    nkb = -(-kv_len // kv_block_size)
    if reduce not in ("none", "max", "mean") or (reduce == "none" and group != 1) or hg % group:
        raise ValueError(f"reduce={reduce!r} with group={group} does not fit scores with {hg} heads.")
    if nkb > TOPK_MAX_BLOCKS:
        raise ValueError(f"{nkb} key blocks exceed the {TOPK_MAX_BLOCKS} one program of the top-k kernel holds.")
    if spread is None and scores.shape[-1] != nkb:
        raise ValueError(f"scores have {scores.shape[-1]} columns, but kv_len={kv_len} makes {nkb} key blocks of "
                         f"{kv_block_size}.")
    compress_block, compress_stride = spread if spread is not None else (0, 0)
    if spread is not None and (compress_stride < 1 or compress_block % compress_stride
                               or kv_block_size % compress_stride):
        raise ValueError(f"spread={spread}: the stride must divide the compressed block and kv_block_size="
                         f"{kv_block_size}.")
    return _block_topk_launch(scores, width, q_len, kv_len, q_block_size, kv_block_size, sink_blocks, local_blocks,
                              group, reduce, renormalize, compress_block, compress_stride)


def _block_topk_fake(scores: Tensor, width: int, q_len: int, kv_len: int, q_block_size: int, kv_block_size: int,
                     sink_blocks: int, local_blocks: int, group: int, reduce: str, renormalize: bool,
                     compress_block: int, compress_stride: int) -> tuple[Tensor, Tensor]:
    B, hg, nqb, _ = scores.shape
    return (scores.new_empty((B, hg // group, nqb, width), dtype=torch.int32),
            scores.new_empty((B, hg // group, nqb), dtype=torch.int32))


@compile_opaque("block_topk", _block_topk_fake)
def _block_topk_launch(scores: Tensor, width: int, q_len: int, kv_len: int, q_block_size: int, kv_block_size: int,
                       sink_blocks: int, local_blocks: int, group: int, reduce: str, renormalize: bool,
                       compress_block: int, compress_stride: int) -> tuple[Tensor, Tensor]:
    """The launch behind :func:`block_topk_triton` (``compress_stride`` 0: no spread)."""
    B, hg, nqb, n_src = scores.shape
    nkb = -(-kv_len // kv_block_size)
    h = hg // group
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    ids = new_output((B, h, nqb, width), dtype=torch.int32, device=scores.device)
    counts = new_output((B, h, nqb), dtype=torch.int32, device=scores.device)
    nkb_p2 = triton.next_power_of_2(nkb)
    _block_topk_kernel[(nqb, B * h)](
        scores, ids, counts, *scores.stride()[:3], *ids.stride()[:3], *counts.stride()[:2], h, group, nkb, q_len,
        kv_len, q_block_size, kv_block_size, width, sink_blocks, local_blocks, n_src,
        compress_stride / compress_block if compress_stride else 1.0, REDUCE=2 if reduce == "mean" else 1,
        RENORM=renormalize, NKB_P2=nkb_p2, WIDTH_P2=triton.next_power_of_2(width),
        SPREAD_PER=kv_block_size // compress_stride if compress_stride else 1,
        SPREAD_W=compress_block // compress_stride if compress_stride else 0, num_warps=max(1, min(16, nkb_p2 // 256)))
    return ids, counts
