"""Triton kernels for block-sparse attention over a BlockRoute.

FlashAttention-2 style, exp2 online softmax, float32 accumulation:

* ``_block_sparse_fwd_kernel``: one program per (query tile, batch x query head); walks the key
  blocks its query block routes to; writes ``out`` and ``lse``.
* ``_block_sparse_bwd_dq_kernel``: same walk, recomputes P and accumulates dQ (no atomics).
* ``_block_sparse_bwd_dkdv_kernel``: one program per (key tile, batch x kv head); walks the
  *transposed* route (the query blocks that route to this key block) for every query head of
  the GQA group, accumulating dK and dV in registers. Long transposed rows are cut into shares
  walked by several programs (``SHARES``: partial sums, or listed shares added by atomics). With
  ``ATOMIC_DQ`` it also adds each tile's dQ share into a float32 buffer by atomics, and the dq
  kernel is skipped.
* ``_block_sparse_decode_split_kernel``: few queries against a long route, split over its key
  tiles; ``_decode_combine_kernel`` merges the partials (or the last split to arrive does).

Blocks need not be tile multiples. A program's own block (the query block in the forward and dq
passes, the key block in dk/dv) smaller than, or not a multiple of, its tile is covered by tiles
whose rows past the block are masked (``*_TILE_ALIGNED=False``). The walked side (the routed key
blocks, or the transposed route's query blocks) is then read as one flat sequence of routed rows:
a tile gathers rows from several small blocks (``GATHER_*=True``), so regions of 4 or 16 tokens
(BiFormer's later stages) fill a tensor-core tile instead of padding every block to 16. Own blocks
that divide 16 rows are packed instead (``Q_PACK``/``KV_PACK``): one tile holds several whole blocks,
each walking its own route row, its walked rows masked to the tile rows of that block.

Masks cost only where they are needed: a tile pays for the causal/range test only when it
straddles the diagonal or the end of the sequence (or when explicit positions were given).
Scores are kept in log2 units: ``s2 = q.k * scale * log2(e)``; ``lse`` is stored in natural log.
"""

import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch, sm90+); absent in older Triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # the kernels call them only under PDL=True, which the launcher never sets then
    gdc_launch_dependents = gdc_wait = None

# Kernels may read only constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_mask(offs_n, q_pos, k_pos, q_seg, kseg_base, kv_len, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr):
    """[BLOCK_M, BLOCK_N] visibility: key inside kv_len, (causal) not after the query, and (with
    segments) in the query's segment."""
    visible = (offs_n < kv_len)[None, :]
    if CAUSAL:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    if HAS_SEG:
        k_seg = tl.load(kseg_base + offs_n, mask=offs_n < kv_len, other=-1)
        visible = visible & (k_seg[None, :] == q_seg[:, None])
    return visible


@triton.jit
def _load_rows(base, offs_rows, stride_rows, offs_cols, n_rows, N_COLS: tl.constexpr, MASK_ROWS: tl.constexpr,
               EVEN_COLS: tl.constexpr):
    """A [rows, cols] tile of a row-major (last stride 1) tensor; masks only what may be out of range."""
    ptrs = base + offs_rows[:, None] * stride_rows + offs_cols[None, :]
    if MASK_ROWS:
        if EVEN_COLS:
            return tl.load(ptrs, mask=(offs_rows < n_rows)[:, None], other=0.0)
        return tl.load(ptrs, mask=(offs_rows < n_rows)[:, None] & (offs_cols < N_COLS)[None, :], other=0.0)
    if EVEN_COLS:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(offs_cols < N_COLS)[None, :], other=0.0)


@triton.jit
def _own_rows(pid, length, BLOCK: tl.constexpr, TILE: tl.constexpr, ALIGNED: tl.constexpr, PACK: tl.constexpr):
    """The rows program ``pid`` owns: ``(block, offs, ok)``. Aligned: tile ``pid`` of the sequence
    (tiles divide the blocks). ``PACK > 1``: tile ``pid`` holds ``PACK`` whole blocks, the first is
    returned. Otherwise ``ceil(BLOCK / TILE)`` tiles per block; rows past the block belong to the
    next one and are masked."""
    # int64 rows: they multiply row strides of H * D elements for token-major tensors
    if PACK > 1:
        offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
        return pid * PACK, offs, offs < length
    if ALIGNED:
        offs = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
        return (pid * TILE) // BLOCK, offs, offs < length
    N_SUB: tl.constexpr = (BLOCK + TILE - 1) // TILE
    blk = pid // N_SUB
    in_blk = (pid % N_SUB) * TILE + tl.arange(0, TILE)
    offs = blk.to(tl.int64) * BLOCK + in_blk
    return blk, offs, (in_blk < BLOCK) & (offs < length)


@triton.jit
def _query_tile(Q, QPos, QSeg, Ids, Counts, CleanCounts, stride_qb, stride_qh, stride_qn, stride_ib, stride_ih,
                stride_iq, stride_cb, stride_ch, stride_qpb, stride_qsb, n_heads_q, group_size, route_head_div,
                q_len, pos_offset, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_POS: tl.constexpr, HAS_SEG: tl.constexpr, Q_TILE_ALIGNED: tl.constexpr,
                GROUP_MAJOR: tl.constexpr, Q_PACK: tl.constexpr):
    """What a program over (query tile, batch x query head) starts from: its indices, its Q tile,
    the tile's positions and segments, and its route row (ids, count, clean count).
    ``GROUP_MAJOR``: the grid is (query tile x GQA group member, batch x kv head), so the query heads
    of a group that read the same routed K/V tiles run next to each other (L2 reuse).
    ``Q_PACK > 1``: the tile holds ``Q_PACK`` whole query blocks (``BLOCK_M = Q_PACK * Q_BLOCK``); the
    route row returned is the first block's (:func:`_packed_rows` walks all of them)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if GROUP_MAJOR:
        n_heads_kv = n_heads_q // group_size
        b = (pid_bh // n_heads_kv).to(tl.int64)
        hq = ((pid_bh % n_heads_kv) * group_size + pid_m % group_size).to(tl.int64)
        pid_m = pid_m // group_size
    else:
        b = (pid_bh // n_heads_q).to(tl.int64)
        hq = (pid_bh % n_heads_q).to(tl.int64)
    hr = hq // route_head_div
    qblk, offs_m, row_ok = _own_rows(pid_m, q_len, Q_BLOCK, BLOCK_M, Q_TILE_ALIGNED, Q_PACK)
    q = _load_rows(Q + b * stride_qb + hq * stride_qh, offs_m, stride_qn, tl.arange(0, BLOCK_D), q_len, HEAD_DIM,
                   True, BLOCK_D == HEAD_DIM)
    if HAS_POS:
        q_pos = tl.load(QPos + b * stride_qpb + offs_m, mask=row_ok, other=0)
    else:
        q_pos = offs_m + pos_offset
    q_seg = tl.load(QSeg + b * stride_qsb + offs_m, mask=row_ok, other=-2) if HAS_SEG else offs_m
    ids_base = Ids + b * stride_ib + hr * stride_ih + qblk * stride_iq
    count_off = b * stride_cb + hr * stride_ch + qblk
    count = tl.load(Counts + count_off)
    n_clean = tl.load(CleanCounts + count_off)
    return b, hq, hq // group_size, offs_m, row_ok, q, q_pos, q_seg, ids_base, count, n_clean, qblk, count_off


@triton.jit
def _walk_bounds(j_lo, j_hi, BLOCK: tl.constexpr, TILE: tl.constexpr, GATHER: tl.constexpr):
    """Loop bounds over routed blocks ``j_lo .. j_hi``: tiles of a block (aligned), or tiles of the
    flat sequence of routed rows (gather)."""
    if GATHER:
        return 0, ((j_hi - j_lo) * BLOCK + TILE - 1) // TILE
    SUBS: tl.constexpr = BLOCK // TILE
    return j_lo * SUBS, j_hi * SUBS


@triton.jit
def _walked_rows(it, ids_base, stride_i, j_lo, j_hi, BLOCK: tl.constexpr, TILE: tl.constexpr,
                 GATHER: tl.constexpr):
    """Rows of walk step ``it``: ``(row0, offs, live)``. Aligned: tile ``it % SUBS`` of routed
    block ``it // SUBS`` (contiguous rows from ``row0``; ``live`` all true). Gather: rows
    ``it * TILE ..`` of the concatenated routed blocks, each row read through its block id;
    ``live`` marks rows inside the walked range."""
    if GATHER:
        flat = j_lo * BLOCK + it * TILE + tl.arange(0, TILE)
        live = flat < j_hi * BLOCK
        blk = tl.load(ids_base + (flat // BLOCK) * stride_i, mask=live, other=0)
        # multiple_of(.., 1): Triton 3.6 infers these rows divisible by BLOCK (false: they step by 1
        # inside a block), so the causal test against a 16-aligned query position looked equal down
        # whole row groups and was computed once per thread: rows lost keys on the GPU (NOTES.md).
        return 0, tl.multiple_of(blk.to(tl.int64) * BLOCK + flat % BLOCK, 1), live
    SUBS: tl.constexpr = BLOCK // TILE
    blk = tl.load(ids_base + (it // SUBS) * stride_i)
    row0 = blk * BLOCK + (it % SUBS) * TILE
    return row0, row0.to(tl.int64) + tl.arange(0, TILE), tl.full([TILE], 1, tl.int1)


@triton.jit
def _packed_rows(it, ids_base, stride_iq, stride_ik, counts_base, n_subs, width, BLOCK: tl.constexpr,
                 TILE: tl.constexpr, GATHER: tl.constexpr):
    """Rows of walk step ``it`` over a packed tile's route: the ``width`` slots of each of its query
    blocks one after another (slot ``j`` is block ``j // width``'s entry ``j % width``). Returns
    ``(row0, offs, live, sub)``: ``live`` marks rows of a routed entry (inside its block's count, of a
    block inside the sequence), ``sub`` the query block (0 .. Q_PACK-1) each row belongs to. A dead
    slot reads row 0 (a valid address) and is masked by ``live``."""
    if GATHER:
        flat = it * TILE + tl.arange(0, TILE)
        slot = flat // BLOCK
        in_blk = flat % BLOCK
        tile0 = 0
    else:
        SUBS: tl.constexpr = BLOCK // TILE
        slot = (it // SUBS) + tl.zeros([TILE], dtype=tl.int32)
        tile0 = (it % SUBS) * TILE
        in_blk = tile0 + tl.arange(0, TILE)
    sub = slot // width
    entry = slot % width
    count = tl.load(counts_base + sub, mask=sub < n_subs, other=0)
    live = entry < count
    blk = tl.load(ids_base + sub * stride_iq + entry * stride_ik, mask=live, other=0)
    offs = tl.multiple_of(blk.to(tl.int64) * BLOCK + in_blk, 1)  # (see _walked_rows)
    # aligned: one slot per tile, so every row holds the same block (0 for a dead slot)
    return tl.max(blk, 0) * BLOCK + tile0, offs, live, sub


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base, stride_ik, stride_kn,
               stride_vn, j_lo, j_hi, kv_len, scale_log2, k_desc, v_desc, b32, hkv32, stride_iq, counts_base, n_subs,
               width, sub_r,
               KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_POS: tl.constexpr,
               HAS_SEG: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
               GATHER_KV: tl.constexpr, Q_PACK: tl.constexpr):
    """Online softmax over routed key blocks ``j_lo .. j_hi`` of one query tile, as one flat loop
    over (block, sub-tile) so Triton can software-pipeline it. ``MASKED=False`` is the hot path:
    blocks wholly visible to every query of the tile, no mask at all. ``USE_TMA`` reads K/V tiles
    through Hopper tensor descriptors (rows past the sequence arrive as zeros). ``Q_PACK > 1``
    (with ``MASKED``): the tile's query blocks' routes one after another (:func:`_packed_rows`), each
    key row seen by the rows of its own query block only (``sub_r``: each row's block in the tile)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    it_lo, it_hi = _walk_bounds(j_lo, j_hi, KV_BLOCK, BLOCK_N, GATHER_KV)
    for it in range(it_lo, it_hi):
        if Q_PACK > 1:
            row0, offs_n, live, sub_n = _packed_rows(it, ids_base, stride_iq, stride_ik, counts_base, n_subs, width,
                                                     KV_BLOCK, BLOCK_N, GATHER_KV)
        else:
            row0, offs_n, live = _walked_rows(it, ids_base, stride_ik, j_lo, j_hi, KV_BLOCK, BLOCK_N, GATHER_KV)
        if USE_TMA:
            k = tl.trans(k_desc.load([b32, hkv32, row0, 0]).reshape(BLOCK_N, BLOCK_D))
            v = v_desc.load([b32, hkv32, row0, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = tl.trans(_load_rows(k_base, offs_n, stride_kn, offs_d, kv_len, HEAD_DIM, MASKED or GATHER_KV,
                                    BLOCK_D == HEAD_DIM))
            v = _load_rows(v_base, offs_n, stride_vn, offs_dv, kv_len, HEAD_DIM_V, MASKED or GATHER_KV,
                           BLOCK_DV == HEAD_DIM_V)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        if Q_PACK > 1:  # dead slots, and key rows routed for another query block of the tile
            s = tl.where(live[None, :] & (sub_n[None, :] == sub_r[:, None]), s, float("-inf"))
        elif GATHER_KV:  # rows past the walked range (every tile holds at least one live row)
            s = tl.where(live[None, :], s, float("-inf"))
        if MASKED:
            if HAS_POS:
                k_pos = tl.load(kpos_base + offs_n, mask=offs_n < kv_len, other=0)
            else:
                k_pos = offs_n
            s = tl.where(_tile_mask(offs_n, q_pos, k_pos, q_seg, kseg_base, kv_len, CAUSAL, HAS_SEG), s,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, Ids, Counts, CleanCounts, QPos, KPos, QSeg, KSeg, KDesc, VDesc,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch,
    stride_qpb, stride_kpb, stride_qsb, stride_ksb,
    n_heads_q, group_size, route_head_div,
    q_len, kv_len, pos_offset, scale_log2, route_width, n_q_blocks,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, Q_TILE_ALIGNED: tl.constexpr, GATHER_KV: tl.constexpr, GROUP_MAJOR: tl.constexpr,
    Q_PACK: tl.constexpr,
):
    """All tensors have a contiguous last axis; ``Counts``/``CleanCounts`` share strides. Of each
    route row, the first ``CleanCounts`` blocks need no mask (ids are sorted, so they lead).
    ``KDesc``/``VDesc`` are ``[B, Hkv, N, D]`` tensor descriptors when ``USE_TMA``."""
    b, hq, hkv, offs_m, row_ok, q, q_pos, q_seg, ids_base, count, n_clean, qblk, count_off = _query_tile(
        Q, QPos, QSeg, Ids, Counts, CleanCounts, stride_qb, stride_qh, stride_qn, stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch, stride_qpb, stride_qsb, n_heads_q, group_size, route_head_div, q_len, pos_offset,
        Q_BLOCK, BLOCK_M, HEAD_DIM, BLOCK_D, HAS_POS, HAS_SEG, Q_TILE_ALIGNED, GROUP_MAJOR, Q_PACK)
    sub_r = tl.arange(0, BLOCK_M) // Q_BLOCK  # Q_PACK > 1: each row's query block in the tile
    n_subs = n_q_blocks - qblk
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    kpos_base = KPos + b * stride_kpb
    kseg_base = KSeg + b * stride_ksb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b32, hkv32 = b.to(tl.int32), hkv.to(tl.int32)
    if Q_PACK > 1:  # one masked walk over the tile's query blocks' routes
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base,
                                   stride_ik, stride_kn, stride_vn, 0, Q_PACK * route_width, kv_len, scale_log2, KDesc,
                                   VDesc, b32, hkv32, stride_iq, Counts + count_off, n_subs, route_width, sub_r,
                                   KV_BLOCK, BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS,
                                   HAS_SEG, True, DOT_PRECISION, USE_TMA, GATHER_KV, Q_PACK)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base,
                                   stride_ik, stride_kn, stride_vn, 0, n_clean, kv_len, scale_log2, KDesc, VDesc, b32,
                                   hkv32, stride_iq, Counts + count_off, n_subs, route_width, sub_r, KV_BLOCK,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS, HAS_SEG, False,
                                   DOT_PRECISION, USE_TMA, GATHER_KV, 1)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base,
                                   stride_ik, stride_kn, stride_vn, n_clean, count, kv_len, scale_log2, KDesc, VDesc,
                                   b32, hkv32, stride_iq, Counts + count_off, n_subs, route_width, sub_r, KV_BLOCK,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS, HAS_SEG, True,
                                   DOT_PRECISION, USE_TMA, GATHER_KV, 1)

    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Out + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :],
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    tl.store(Lse + b * stride_lb + hq * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(Out, DO, Delta, stride_ob, stride_oh, stride_on, stride_od,
                           stride_dob, stride_doh, stride_don, stride_dod, n_heads_q, q_len,
                           HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[b, h, n] = sum_d out * dout (float32), laid out [B, Hq, q_len] contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads_q).to(tl.int64)
    hq = (pid_bh % n_heads_q).to(tl.int64)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m < q_len)[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    o = tl.load(Out + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + hq * stride_doh + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * q_len + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base, stride_ik,
              stride_kn, stride_vn, j_lo, j_hi, kv_len, scale_log2, k_desc, v_desc, b32, hkv32, stride_iq, counts_base,
              n_subs, width, sub_r,
              KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_POS: tl.constexpr,
              HAS_SEG: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
              GATHER_KV: tl.constexpr, Q_PACK: tl.constexpr):
    """dQ over routed key blocks ``j_lo .. j_hi`` of one query tile (flat, pipelinable loop);
    ``Q_PACK`` as in :func:`_fwd_inner`."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    it_lo, it_hi = _walk_bounds(j_lo, j_hi, KV_BLOCK, BLOCK_N, GATHER_KV)
    for it in range(it_lo, it_hi):
        if Q_PACK > 1:
            row0, offs_n, live, sub_n = _packed_rows(it, ids_base, stride_iq, stride_ik, counts_base, n_subs, width,
                                                     KV_BLOCK, BLOCK_N, GATHER_KV)
        else:
            row0, offs_n, live = _walked_rows(it, ids_base, stride_ik, j_lo, j_hi, KV_BLOCK, BLOCK_N, GATHER_KV)
        if USE_TMA:
            k = k_desc.load([b32, hkv32, row0, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_desc.load([b32, hkv32, row0, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = _load_rows(k_base, offs_n, stride_kn, offs_d, kv_len, HEAD_DIM, MASKED or GATHER_KV,
                           BLOCK_D == HEAD_DIM)
            v = _load_rows(v_base, offs_n, stride_vn, offs_dv, kv_len, HEAD_DIM_V, MASKED or GATHER_KV,
                           BLOCK_DV == HEAD_DIM_V)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        if Q_PACK > 1:
            s = tl.where(live[None, :] & (sub_n[None, :] == sub_r[:, None]), s, float("-inf"))
        elif GATHER_KV:
            s = tl.where(live[None, :], s, float("-inf"))
        if MASKED:
            if HAS_POS:
                k_pos = tl.load(kpos_base + offs_n, mask=offs_n < kv_len, other=0)
            else:
                k_pos = offs_n
            s = tl.where(_tile_mask(offs_n, q_pos, k_pos, q_seg, kseg_base, kv_len, CAUSAL, HAS_SEG), s,
                         float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _block_sparse_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Ids, Counts, CleanCounts, QPos, KPos, QSeg, KSeg, KDesc, VDesc,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch,
    stride_qpb, stride_kpb, stride_qsb, stride_ksb,
    n_heads_q, group_size, route_head_div,
    q_len, kv_len, pos_offset, scale, scale_log2, route_width, n_q_blocks,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, Q_TILE_ALIGNED: tl.constexpr, GATHER_KV: tl.constexpr, GROUP_MAJOR: tl.constexpr,
    Q_PACK: tl.constexpr,
):
    """``Lse`` and ``Delta`` are contiguous ``[B, Hq, q_len]`` float32."""
    b, hq, hkv, offs_m, row_ok, q, q_pos, q_seg, ids_base, count, n_clean, qblk, count_off = _query_tile(
        Q, QPos, QSeg, Ids, Counts, CleanCounts, stride_qb, stride_qh, stride_qn, stride_ib, stride_ih, stride_iq,
        stride_cb, stride_ch, stride_qpb, stride_qsb, n_heads_q, group_size, route_head_div, q_len, pos_offset,
        Q_BLOCK, BLOCK_M, HEAD_DIM, BLOCK_D, HAS_POS, HAS_SEG, Q_TILE_ALIGNED, GROUP_MAJOR, Q_PACK)
    sub_r = tl.arange(0, BLOCK_M) // Q_BLOCK  # Q_PACK > 1: each row's query block in the tile
    n_subs = n_q_blocks - qblk
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    do = _load_rows(DO + b * stride_dob + hq * stride_doh, offs_m, stride_don, offs_dv, q_len, HEAD_DIM_V, True,
                    BLOCK_DV == HEAD_DIM_V)
    row_base = (b * n_heads_q + hq) * q_len
    lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
    # Rows that saw nothing (lse = -inf) must get P = 0: shift them by +inf instead.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    kpos_base = KPos + b * stride_kpb
    kseg_base = KSeg + b * stride_ksb

    b32, hkv32 = b.to(tl.int32), hkv.to(tl.int32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if Q_PACK > 1:
        dq = _dq_inner(dq, q, do, lse2, delta, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base,
                       stride_ik, stride_kn, stride_vn, 0, Q_PACK * route_width, kv_len, scale_log2, KDesc, VDesc, b32,
                       hkv32, stride_iq, Counts + count_off, n_subs, route_width, sub_r, KV_BLOCK, BLOCK_N, HEAD_DIM,
                       BLOCK_D, HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS, HAS_SEG, True, DOT_PRECISION, USE_TMA,
                       GATHER_KV, Q_PACK)
    else:
        dq = _dq_inner(dq, q, do, lse2, delta, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base,
                       stride_ik, stride_kn, stride_vn, 0, n_clean, kv_len, scale_log2, KDesc, VDesc, b32, hkv32,
                       stride_iq, Counts + count_off, n_subs, route_width, sub_r, KV_BLOCK, BLOCK_N, HEAD_DIM, BLOCK_D,
                       HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS, HAS_SEG, False, DOT_PRECISION, USE_TMA, GATHER_KV, 1)
        dq = _dq_inner(dq, q, do, lse2, delta, q_pos, q_seg, k_base, v_base, ids_base, kpos_base, kseg_base,
                       stride_ik, stride_kn, stride_vn, n_clean, count, kv_len, scale_log2, KDesc, VDesc, b32, hkv32,
                       stride_iq, Counts + count_off, n_subs, route_width, sub_r, KV_BLOCK, BLOCK_N, HEAD_DIM, BLOCK_D,
                       HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS, HAS_SEG, True, DOT_PRECISION, USE_TMA, GATHER_KV, 1)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + hq * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _dkdv_inner(dk, dv, k, v, k_pos, k_seg, offs_n, q_base, do_base, row_base, Lse, Delta, DQAcc, qpos_base,
                qseg_base, t_base, stride_tq, stride_qn, stride_don, i_lo, i_hi, q_len, kv_len, pos_offset, scale,
                scale_log2, q_desc, do_desc, b32, hq32, key_sel,
                Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_POS: tl.constexpr,
                HAS_SEG: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                GATHER_Q: tl.constexpr, ATOMIC_DQ: tl.constexpr, KV_PACK: tl.constexpr):
    """dK, dV of one key tile from the query blocks ``i_lo .. i_hi`` of its transposed route.
    Query rows outside the walked range load lse = +inf, so their P is 0: no extra mask.
    ``KV_PACK > 1`` (with ``MASKED``): the tile holds several key blocks and this walk is one block's
    transposed row: only the key rows ``key_sel`` see it.
    ``ATOMIC_DQ``: also add this tile's share of dQ (``scale * dS K``) into the float32 ``DQAcc``
    with atomics, FlashAttention-2 style, so no separate dQ pass recomputes P (5 matrix products
    per tile pair instead of 3 + 4)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    it_lo, it_hi = _walk_bounds(i_lo, i_hi, Q_BLOCK, BLOCK_M, GATHER_Q)
    for it in range(it_lo, it_hi):
        row0, offs_m, live = _walked_rows(it, t_base, stride_tq, i_lo, i_hi, Q_BLOCK, BLOCK_M, GATHER_Q)
        row_ok = live & (offs_m < q_len)
        if USE_TMA:  # rows past q_len arrive as zeros
            q = q_desc.load([b32, hq32, row0, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_desc.load([b32, hq32, row0, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
            do_ptrs = do_base + offs_m[:, None] * stride_don + offs_dv[None, :]
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
        lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_N, BLOCK_M]
        if MASKED:
            if HAS_POS:
                q_pos = tl.load(qpos_base + offs_m, mask=row_ok, other=0)
            else:
                q_pos = offs_m + pos_offset
            visible = (offs_n < kv_len)[:, None]
            if CAUSAL:
                visible = visible & (k_pos[:, None] <= q_pos[None, :])
            if HAS_SEG:
                q_seg = tl.load(qseg_base + offs_m, mask=row_ok, other=-2)
                visible = visible & (k_seg[:, None] == q_seg[None, :])
            if KV_PACK > 1:
                visible = visible & key_sel[:, None]
            st = tl.where(visible, st, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq_part = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(DQAcc + (row_base + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], dq_part,
                          mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _block_sparse_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DQAcc, DKAcc, DVAcc, ShareOffsets, TIds, TCounts, TMaskedCounts, TOffsets, QPos,
    KPos, QSeg, KSeg, QDesc, DODesc,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_tb, stride_th, stride_tk, stride_tq,
    stride_tcb, stride_tch,
    stride_qpb, stride_kpb, stride_qsb, stride_ksb,
    n_heads_q, n_heads_kv, group_size, route_head_div,
    q_len, kv_len, pos_offset, scale, scale_log2, stride_dks, stride_dvs, n_splits, chunk, n_tiles, n_main, log_rows,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, KV_TILE_ALIGNED: tl.constexpr, GATHER_Q: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    T_COMPACT: tl.constexpr, SHARES: tl.constexpr, KV_PACK: tl.constexpr,
):
    """One key tile of one kv head, over every query head of its GQA group. Of each transposed
    row, the first ``TMaskedCounts`` query blocks need a mask (they straddle the diagonal).
    ``T_COMPACT``: the transposed route is one list per (batch, route head), each key block's query
    blocks starting at ``TOffsets`` (same strides as ``TCounts``); else ``[.., key block, width]``.
    ``DQAcc`` (``ATOMIC_DQ`` only): contiguous float32 ``[B, Hq, q_len, HEAD_DIM]``, zeroed.
    Long transposed rows (a sink block every query block keeps, NSA's compressed branch) would leave a
    few long programs running on an idle GPU, so grid axis 2 may share each row between programs:
    ``SHARES == 1``: program ``s`` walks the ``s``-th of ``n_splits`` equal shares of every row and stores
    its partial dK, dV at ``DK/DV + s * stride_dks/dvs`` (float32, summed by the caller; deterministic).
    ``SHARES == 2`` (a 1-D grid, :func:`_listed_share`): shares of ``chunk`` query blocks, one program per
    tile for its first share and one per further share; a tile whose GQA group's longest row fits one
    share stores dK, dV as usual, else every share adds into the zeroed float32 ``DKAcc/DVAcc [slots *
    BLOCK_N, D]`` by atomics, in its tile's slot (``_share_offsets_kernel``; ``_dkdv_shares_combine_kernel``
    copies those tiles out). ``KV_PACK > 1`` (``SHARES == 0``): the tile holds ``KV_PACK`` whole key blocks
    smaller than 16 rows (``BLOCK_N = KV_PACK * KV_BLOCK``), each walking its own transposed row."""
    if SHARES == 2:
        pid_n, pid_bh, pid_s, listed = _listed_share(ShareOffsets, n_tiles, n_main, log_rows)
    else:
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
    b = (pid_bh // n_heads_kv).to(tl.int64)
    hkv = (pid_bh % n_heads_kv).to(tl.int64)
    kblk, offs_n, key_ok = _own_rows(pid_n, kv_len, KV_BLOCK, BLOCK_N, KV_TILE_ALIGNED, KV_PACK)
    sub_n = tl.arange(0, BLOCK_N) // KV_BLOCK  # KV_PACK > 1: each key row's block in the tile
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    loaded_len = kv_len
    n_shares = 1  # SHARES != 2: one program per (tile, share), each stores its own dK, dV
    if SHARES == 2:
        n_shares = _tile_shares(ShareOffsets, pid_bh * n_tiles + pid_n)
        active = listed & (pid_s < n_shares)
        loaded_len = tl.where(active, kv_len, 0)  # a program past the list loads (and stores) no row
        key_ok = key_ok & active
    k = _load_rows(K + b * stride_kb + hkv * stride_kh, offs_n, stride_kn, offs_d, loaded_len, HEAD_DIM, True,
                   BLOCK_D == HEAD_DIM)
    v = _load_rows(V + b * stride_vb + hkv * stride_vh, offs_n, stride_vn, offs_dv, loaded_len, HEAD_DIM_V, True,
                   BLOCK_DV == HEAD_DIM_V)
    if ATOMIC_DQ and not KV_TILE_ALIGNED:  # rows of the next key block must add nothing to dQ
        k = tl.where(key_ok[:, None], k, tl.zeros_like(k))
    if HAS_POS:
        k_pos = tl.load(KPos + b * stride_kpb + offs_n, mask=key_ok, other=0)
    else:
        k_pos = offs_n
    qpos_base = QPos + b * stride_qpb
    qseg_base = QSeg + b * stride_qsb
    k_seg = tl.load(KSeg + b * stride_ksb + offs_n, mask=key_ok, other=-1) if HAS_SEG else offs_n

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(group_size):
        hq = hkv * group_size + g
        hr = hq // route_head_div
        q_base = Q + b * stride_qb + hq * stride_qh
        do_base = DO + b * stride_dob + hq * stride_doh
        row_base = (b * n_heads_q + hq) * q_len
        b32, hq32 = b.to(tl.int32), hq.to(tl.int32)
        if KV_PACK > 1:  # each key block of the tile walks its own transposed row, masked to its rows
            n_kv_blocks = (kv_len + KV_BLOCK - 1) // KV_BLOCK
            for j in range(KV_PACK):
                inside = kblk + j < n_kv_blocks
                count_off = b * stride_tcb + hr * stride_tch + kblk + j
                if T_COMPACT:
                    t_base = TIds + b * stride_tb + hr * stride_th + tl.load(TOffsets + count_off, mask=inside,
                                                                             other=0)
                else:
                    t_base = TIds + b * stride_tb + hr * stride_th + (kblk + j) * stride_tk
                count = tl.load(TCounts + count_off, mask=inside, other=0)
                dk, dv = _dkdv_inner(dk, dv, k, v, k_pos, k_seg, offs_n, q_base, do_base, row_base, Lse, Delta,
                                     DQAcc, qpos_base, qseg_base, t_base, stride_tq, stride_qn, stride_don, 0, count,
                                     q_len, kv_len, pos_offset, scale, scale_log2, QDesc, DODesc, b32, hq32,
                                     sub_n == j, Q_BLOCK, BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, CAUSAL,
                                     HAS_POS, HAS_SEG, True, DOT_PRECISION, USE_TMA, GATHER_Q, ATOMIC_DQ, KV_PACK)
        else:
            count_off = b * stride_tcb + hr * stride_tch + kblk
            if T_COMPACT:
                t_base = TIds + b * stride_tb + hr * stride_th + tl.load(TOffsets + count_off)
            else:
                t_base = TIds + b * stride_tb + hr * stride_th + kblk * stride_tk
            count = tl.load(TCounts + count_off)
            n_masked = tl.load(TMaskedCounts + count_off)
            share = chunk if SHARES == 2 else (count + n_splits - 1) // n_splits
            lo = tl.minimum(pid_s * share, count)
            hi = tl.minimum(lo + share, count)
            masked_hi = tl.minimum(hi, n_masked)
            clean_lo = tl.maximum(lo, n_masked)
            dk, dv = _dkdv_inner(dk, dv, k, v, k_pos, k_seg, offs_n, q_base, do_base, row_base, Lse, Delta, DQAcc,
                                 qpos_base, qseg_base, t_base, stride_tq, stride_qn, stride_don, lo, masked_hi, q_len,
                                 kv_len, pos_offset, scale, scale_log2, QDesc, DODesc, b32, hq32, key_ok, Q_BLOCK,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS, HAS_SEG, True,
                                 DOT_PRECISION, USE_TMA, GATHER_Q, ATOMIC_DQ, 1)
            dk, dv = _dkdv_inner(dk, dv, k, v, k_pos, k_seg, offs_n, q_base, do_base, row_base, Lse, Delta, DQAcc,
                                 qpos_base, qseg_base, t_base, stride_tq, stride_qn, stride_don, clean_lo, hi, q_len,
                                 kv_len, pos_offset, scale, scale_log2, QDesc, DODesc, b32, hq32, key_ok, Q_BLOCK,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, CAUSAL, HAS_POS, HAS_SEG, False,
                                 DOT_PRECISION, USE_TMA, GATHER_Q, ATOMIC_DQ, 1)
    dk = dk * scale
    k_ok = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    v_ok = key_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    dk_ptrs = DK + pid_s.to(tl.int64) * stride_dks + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn
    dv_ptrs = DV + pid_s.to(tl.int64) * stride_dvs + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn
    if n_shares > 1:  # SHARES == 2, a shared tile: the combine kernel writes it from the sums in its slot
        acc_row = _shared_slot(ShareOffsets, n_main, pid_bh * n_tiles + pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.atomic_add(DKAcc + acc_row[:, None] * HEAD_DIM + offs_d[None, :], dk, mask=k_ok, sem="relaxed")
        tl.atomic_add(DVAcc + acc_row[:, None] * HEAD_DIM_V + offs_dv[None, :], dv, mask=v_ok, sem="relaxed")
    else:
        tl.store(dk_ptrs + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=k_ok)
        tl.store(dv_ptrs + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=v_ok)


@triton.jit
def _listed_share(ShareOffsets, n_tiles, n_main, log_rows):
    """``SHARES == 2``: ``(tile, batch x kv head, share, listed)`` of this program. Programs below
    ``n_main`` (= tiles x batch x kv heads) take a tile's first share; the others take the further shares,
    listed by the first ``n_main + 1`` entries of ``ShareOffsets``, the exclusive prefix sum of every tile's
    further shares (binary search over ``log_rows`` steps); ``listed`` is False past the list's end."""
    pid = tl.program_id(0)
    if pid < n_main:
        row = pid
        share = pid * 0
        listed = pid < n_main
    else:
        w = pid - n_main
        lo = pid * 0
        hi = lo + n_main - 1
        for _ in range(log_rows):  # the last row whose offset is <= w holds item w
            mid = (lo + hi + 1) // 2
            go = tl.load(ShareOffsets + mid) <= w
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        row = lo
        share = 1 + w - tl.load(ShareOffsets + row)
        listed = w < tl.load(ShareOffsets + n_main)
    return row % n_tiles, row // n_tiles, share, listed


@triton.jit
def _share_offsets_kernel(TCounts, ShareOffsets, stride_tcb, stride_tch, n_heads_kv, group_size, route_head_div,
                          n_tiles, n_main, chunk, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                          KV_TILE_ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program: ``ShareOffsets[0] = 0``, ``ShareOffsets[r + 1]`` = further shares (beyond the first)
    of the tiles before and at row ``r = (batch x kv head) * n_tiles + tile``; and after those
    ``n_main + 1`` entries, ``ShareOffsets[n_main + 1 + r]`` = how many tiles before row ``r`` have
    further shares: the slot of row ``r``'s float32 sums, so the sums take room for the shared tiles
    only (not two float32 copies of K and V)."""
    tl.store(ShareOffsets, 0)
    slots = ShareOffsets + n_main + 1
    carry = 0
    carry_slots = 0
    for start in range(0, n_main, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = r < n_main
        t = r % n_tiles
        bh = r // n_tiles
        b = (bh // n_heads_kv).to(tl.int64)
        hkv = bh % n_heads_kv
        if KV_TILE_ALIGNED:
            kblk = (t * BLOCK_N) // KV_BLOCK
        else:
            kblk = t // ((KV_BLOCK + BLOCK_N - 1) // BLOCK_N)
        longest = tl.zeros([BLOCK_R], dtype=tl.int32)
        for g in range(group_size):
            hr = (hkv * group_size + g) // route_head_div
            longest = tl.maximum(longest, tl.load(TCounts + b * stride_tcb + hr * stride_tch + kblk, mask=ok, other=0))
        extra = tl.where(ok, tl.maximum((longest + chunk - 1) // chunk, 1) - 1, 0)
        tl.store(ShareOffsets + 1 + r, tl.cumsum(extra, 0) + carry, mask=ok)
        carry += tl.sum(extra, 0)
        shared = (extra > 0).to(tl.int32)
        tl.store(slots + r, tl.cumsum(shared, 0) - shared + carry_slots, mask=ok)
        carry_slots += tl.sum(shared, 0)


@triton.jit
def _tile_shares(ShareOffsets, row):
    """Shares the tile of ``row = (batch x kv head) * n_tiles + tile`` has (at least 1: an empty row
    still writes zeros), read from the list ``_share_offsets_kernel`` wrote."""
    return 1 + tl.load(ShareOffsets + row + 1) - tl.load(ShareOffsets + row)


@triton.jit
def _shared_slot(ShareOffsets, n_main, row):
    """The slot of a shared tile's float32 sums (``_share_offsets_kernel``): rows ``slot * BLOCK_N ..``."""
    return tl.load(ShareOffsets + n_main + 1 + row).to(tl.int64)


@triton.jit
def _dkdv_shares_combine_kernel(DK, DV, DKAcc, DVAcc, ShareOffsets, stride_dkb, stride_dkh, stride_dkn, stride_dvb,
                                stride_dvh, stride_dvn, n_heads_kv, n_tiles, kv_len, KV_BLOCK: tl.constexpr,
                                BLOCK_N: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                                BLOCK_DV: tl.constexpr, KV_TILE_ALIGNED: tl.constexpr):
    """``SHARES == 2``: the key tiles whose rows were shared get dK, dV from the float32 sums (cast)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads_kv).to(tl.int64)
    hkv = (pid_bh % n_heads_kv).to(tl.int64)
    _, offs_n, key_ok = _own_rows(pid_n, kv_len, KV_BLOCK, BLOCK_N, KV_TILE_ALIGNED, 1)
    key_ok = key_ok & (_tile_shares(ShareOffsets, pid_bh * n_tiles + pid_n) > 1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_main = n_tiles * tl.num_programs(1)
    acc_row = _shared_slot(ShareOffsets, n_main, pid_bh * n_tiles + pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = key_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    v_ok = key_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    dk = tl.load(DKAcc + acc_row[:, None] * HEAD_DIM + offs_d[None, :], mask=k_ok, other=0.0)
    dv = tl.load(DVAcc + acc_row[:, None] * HEAD_DIM_V + offs_dv[None, :], mask=v_ok, other=0.0)
    tl.store(DK + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=k_ok)
    tl.store(DV + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=v_ok)


@triton.jit
def _block_sparse_decode_split_kernel(
    Q, K, V, PartOut, PartLse, Ids, Counts, QPos, KPos, QSeg, KSeg, Out, Lse, Arrivals, KDesc, VDesc,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_ik,
    stride_cb, stride_ch,
    stride_qpb, stride_kpb, stride_qsb, stride_ksb,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    n_prog_heads, g_pack, group_size, route_head_div, tiles_per_split,
    q_len, kv_len, pos_offset, scale_log2,
    KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_MERGE: tl.constexpr, BLOCK_S: tl.constexpr, USE_TMA: tl.constexpr, PDL: tl.constexpr,
):
    """Few queries (all in query block 0) against many routed key blocks: program (split, b*hp)
    takes ``tiles_per_split`` consecutive key tiles of ``BLOCK_N`` rows of the route (the route's
    blocks cut into ``KV_BLOCK // BLOCK_N`` tiles each, walked as one flat loop so Triton pipelines
    the loads across block boundaries). The ``g_pack`` query heads of a GQA group that share the
    route are packed into the rows of one tile, so each K/V tile is read once for the whole group.
    The visibility mask is applied on every tile (a few compares: the kernel is bound by its loads,
    and a branch per tile would stop the pipelining). ``USE_TMA`` reads K/V through the tensor
    descriptors ``KDesc``/``VDesc`` (``[B, Hkv, N, D]``, tiles of ``BLOCK_N`` rows).
    Writes a normalised partial output and its lse for the live rows; ``_decode_combine_kernel``
    merges them, or with ``FUSED_MERGE`` the split that arrives last (counted in the zeroed
    ``Arrivals [B * hp]``) merges them into ``Out``/``Lse`` itself: one launch, no gap between two."""
    if PDL:  # the combine launch may start now: it waits for this grid's writes before reading them
        gdc_launch_dependents()
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_splits = tl.num_programs(0)
    b = (pid_bh // n_prog_heads).to(tl.int64)
    hp = (pid_bh % n_prog_heads).to(tl.int64)
    hq0 = hp * g_pack
    hkv = hq0 // group_size
    hr = hq0 // route_head_div

    offs_r = tl.arange(0, BLOCK_M)
    g = offs_r // q_len
    t = offs_r % q_len
    row_ok = offs_r < g_pack * q_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + (hq0 + g)[:, None] * stride_qh + t[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if HAS_POS:
        q_pos = tl.load(QPos + b * stride_qpb + t, mask=row_ok, other=0)
    else:
        q_pos = t + pos_offset

    q_seg = tl.load(QSeg + b * stride_qsb + t, mask=row_ok, other=-2) if HAS_SEG else t
    kseg_base = KSeg + b * stride_ksb
    ids_base = Ids + b * stride_ib + hr * stride_ih
    SUBS: tl.constexpr = KV_BLOCK // BLOCK_N
    n_tiles = tl.load(Counts + b * stride_cb + hr * stride_ch) * SUBS
    it_lo = pid_s * tiles_per_split
    it_hi = tl.minimum(it_lo + tiles_per_split, n_tiles)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    b32 = b.to(tl.int32)
    hkv32 = hkv.to(tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for it in range(it_lo, it_hi):
        kblk = tl.load(ids_base + (it // SUBS) * stride_ik)
        row0 = kblk * KV_BLOCK + (it % SUBS) * BLOCK_N
        offs_n = row0.to(tl.int64) + tl.arange(0, BLOCK_N)
        if USE_TMA:  # rows past the sequence arrive as zeros (and are masked below)
            k = tl.trans(KDesc.load([b32, hkv32, row0, 0]).reshape(BLOCK_N, BLOCK_D))
            v = VDesc.load([b32, hkv32, row0, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=(offs_n < kv_len)[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=(offs_n < kv_len)[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        if HAS_POS:
            k_pos = tl.load(KPos + b * stride_kpb + offs_n, mask=offs_n < kv_len, other=0)
        else:
            k_pos = offs_n
        s = tl.where(_tile_mask(offs_n, q_pos, k_pos, q_seg, kseg_base, kv_len, CAUSAL, HAS_SEG), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part = pid_bh.to(tl.int64) * n_splits + pid_s
    # Only the live rows: the merges read no others, and at one query the padding rows of the
    # 16-row tile would be 15/16 of what is written.
    tl.store(PartOut + (part * BLOCK_M + offs_r)[:, None] * BLOCK_DV + offs_dv[None, :], acc, mask=row_ok[:, None])
    tl.store(PartLse + part * BLOCK_M + offs_r, lse2, mask=row_ok)
    if FUSED_MERGE:
        tl.debug_barrier()  # all of this program's partial is written before its arrival counts
        if tl.atomic_add(Arrivals + pid_bh, 1, sem="acq_rel") == n_splits - 1:
            # Row by row (g_pack * q_len rows: 1-16), each row's splits loaded together.
            for r in range(0, g_pack * q_len):
                _merge_decode_row(PartOut, PartLse, Out, Lse, part - pid_s, n_splits, r, b, hq0 + r // q_len,
                                  r % q_len, stride_ob, stride_oh, stride_on, stride_od, stride_lb, stride_lh,
                                  stride_ln, BLOCK_M, HEAD_DIM_V, BLOCK_DV, BLOCK_S, ".cg")


@triton.jit
def _merge_decode_row(PartOut, PartLse, Out, Lse, part0, n_splits, r, b, hq, t,
                      stride_ob, stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln,
                      BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                      BLOCK_S: tl.constexpr, CACHE: tl.constexpr):
    """Row ``r`` of the ``n_splits`` partials from ``part0`` merged into ``Out[b, hq, t]`` and its
    natural-log ``Lse``: all splits are loaded as one [BLOCK_S, BLOCK_DV] tile (their loads in flight
    together), weighted by exp(lse_s - max) and summed in a fixed order (the same bits whichever
    program merges). ``CACHE``: the loads' cache modifier (".cg", past L1, when other SMs wrote the
    partials in this launch; "" otherwise)."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = offs_s < n_splits
    part = part0 + offs_s
    lse_s = tl.load(PartLse + part * BLOCK_M + r, mask=split_ok, other=float("-inf"), cache_modifier=CACHE)
    o = tl.load(PartOut + (part * BLOCK_M + r)[:, None] * BLOCK_DV + offs_dv[None, :], mask=split_ok[:, None],
                other=0.0, cache_modifier=CACHE)
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_safe)
    l = tl.sum(w, 0)  # noqa: E741
    acc = tl.sum(w[:, None] * o, 0) / tl.where(l > 0, l, 1.0)
    lse = tl.where(l > 0, (m_safe + tl.math.log2(tl.where(l > 0, l, 1.0))) * LN2, float("-inf"))
    tl.store(Out + b * stride_ob + hq * stride_oh + t * stride_on + offs_dv * stride_od,
             acc.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Lse + b * stride_lb + hq * stride_lh + t * stride_ln, lse)


@triton.jit
def _decode_combine_kernel(
    PartOut, PartLse, Out, Lse,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    n_prog_heads, g_pack, q_len, n_splits,
    BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    """Merge the split partials of one output row (program (b*hp, row)), as ``_merge_decode_row``.
    ``PDL``: launched as a programmatic dependent of the split kernel, so it waits for its writes."""
    if PDL:
        gdc_wait()
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b = (pid_bh // n_prog_heads).to(tl.int64)
    hp = (pid_bh % n_prog_heads).to(tl.int64)
    _merge_decode_row(PartOut, PartLse, Out, Lse, pid_bh.to(tl.int64) * n_splits, n_splits, r, b,
                      hp * g_pack + r // q_len, r % q_len, stride_ob, stride_oh, stride_on, stride_od,
                      stride_lb, stride_lh, stride_ln, BLOCK_M, HEAD_DIM_V, BLOCK_DV, BLOCK_S, "")


@triton.jit
def _transpose_route_kernel(Ids, TIds, TCounts, TMasked, n_q_blocks, n_kv_blocks, width, q_block, kv_block,
                            kv_len, pos_offset, CAUSAL: tl.constexpr, ALL_MASKED: tl.constexpr,
                            BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The transposed route in one launch: program (key block j, route row r) scans the route rows
    ``Ids [R, n_q_blocks, width]`` (contiguous, -1 padded) in query-block order and writes the query
    blocks that route to ``j``, sorted, into ``TIds [R, n_kv_blocks, n_q_blocks]`` (-1 padded) and
    their number into ``TCounts [R, n_kv_blocks]``, and into ``TMasked [R, n_kv_blocks]`` how many of
    them need a mask (``masked_query_counts``; default positions, or every one when ``ALL_MASKED``).
    ``O(n_q_blocks * width)`` reads per program: for the small routes that are rebuilt every call
    (BiFormer regions, MoBA), where a sort and its dozens of small launches would cost more host time
    than the kernels they feed."""
    j = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    ids_base = Ids + r * n_q_blocks * width
    out_base = TIds + (r * n_kv_blocks + j) * n_q_blocks
    k_last = (j + 1) * kv_block - 1  # the key block's last position
    count = 0
    masked = 0
    for q0 in range(0, n_q_blocks, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        tile = tl.load(ids_base + offs_q[:, None] * width + offs_k[None, :],
                       mask=(offs_q < n_q_blocks)[:, None] & (offs_k < width)[None, :], other=-1)
        hit = tl.max((tile == j).to(tl.int32), axis=1)  # [BLOCK_Q]: ids are unique within a row
        slot = count + tl.cumsum(hit, axis=0) - 1
        tl.store(out_base + slot, offs_q.to(tl.int32), mask=hit > 0)
        count += tl.sum(hit, axis=0)
        if ALL_MASKED:
            masked += tl.sum(hit, axis=0)
        else:
            need = k_last >= kv_len  # a partial last key block
            if CAUSAL:
                need = need | (k_last > offs_q * q_block + pos_offset)  # keys after the block's first query
            masked += tl.sum(tl.where(need, hit, 0), axis=0)
    for q0 in range(0, n_q_blocks, BLOCK_Q):  # -1 past the count
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        tl.store(out_base + offs_q, tl.full([BLOCK_Q], -1, tl.int32), mask=(offs_q >= count) & (offs_q < n_q_blocks))
    tl.store(TCounts + r * n_kv_blocks + j, count.to(tl.int32))
    tl.store(TMasked + r * n_kv_blocks + j, masked.to(tl.int32))


@triton.jit
def _clean_counts_kernel(Ids, Counts, Clean, n_flat, n_q_blocks, width, q_block, kv_block, kv_len, pos_offset,
                         CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``clean_block_counts`` in one launch: for the ``n_flat`` rows of ``Ids [R * n_q_blocks, width]``
    (contiguous; row i is query block ``i % n_q_blocks``), how many live key blocks are whole and,
    when causal, wholly at or before the query block's first query."""
    flat = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = flat < n_flat
    qb = flat % n_q_blocks
    offs_k = tl.arange(0, BLOCK_K)
    cnt = tl.load(Counts + flat, mask=row_ok, other=0)
    live = row_ok[:, None] & (offs_k[None, :] < cnt[:, None]) & (offs_k[None, :] < width)
    ids = tl.load(Ids + flat[:, None] * width + offs_k[None, :], mask=live, other=0)
    k_last = (ids.to(tl.int64) + 1) * kv_block - 1
    clean = live & (k_last < kv_len)
    if CAUSAL:
        clean = clean & (k_last <= (qb * q_block + pos_offset)[:, None])
    tl.store(Clean + flat, tl.sum(clean.to(tl.int32), axis=1), mask=row_ok)
