"""Triton kernels for attention within gathered token groups (TokenRoute), rows read in place.

Every program owns a tile of one group's slots for one (batch, query head) and reads the rows of
``q``, ``k``, ``v`` (and ``dout``) through the group's token ids: no gathered copies of the inputs.
Results come out in the group-major layout (``[B, Hq, groups, group_size, ...]``) and the host
scatters them back (a token may sit in several groups).

* ``_tg_fwd_kernel``: online softmax over the group's key tiles; writes the group output and lse.
* ``_tg_bwd_delta_kernel``: ``dout[token] . o_group`` per slot (the softmax backward's row term,
  and the gradient of the route's weights).
* ``_tg_bwd_dq_kernel`` / ``_tg_bwd_dkdv_kernel``: recompute P per tile; dQ per query tile, dK and
  dV per key tile (no atomics; the host sums the query heads of a GQA group).

Scores are kept in log2 units (``exp2``), ``lse`` is stored in natural log; padding slots (id
``-1``) are never visible and their rows give zeros and ``lse = -inf``.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _program(n_heads_q, route_head_div, group_size, si_b, si_h, si_g, S):
    """Where the program works (grid axes: slot tile, group, batch x query head): ``(b, hq, hkv,
    route_off, row0)``, ``route_off`` being the offset of its group in the ids (and in ``W``, which
    shares their layout) and ``row0`` its first row in the group-layout outputs."""
    g = tl.program_id(1).to(tl.int64)
    pid_bh = tl.program_id(2)
    b = (pid_bh // n_heads_q).to(tl.int64)
    hq = (pid_bh % n_heads_q).to(tl.int64)
    route_off = b * si_b + (hq // route_head_div) * si_h + g * si_g
    row0 = ((b * n_heads_q + hq) * tl.num_programs(1) + g) * S
    return b, hq, hq // group_size, route_off, row0


@triton.jit
def _rows(base, ids, live, stride_n, offs_d, D: tl.constexpr):
    """``[len(ids), BLOCK_D]`` rows ``ids`` of a ``[N, D]`` matrix (zeros where not live)."""
    ptrs = base + ids.to(tl.int64)[:, None] * stride_n + offs_d[None, :]
    return tl.load(ptrs, mask=live[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _visible(q_ids, k_ids, CAUSAL: tl.constexpr):
    vis = (q_ids >= 0)[:, None] & (k_ids >= 0)[None, :]
    if CAUSAL:
        vis = vis & (k_ids[None, :] <= q_ids[:, None])
    return vis


@triton.jit
def _key_rows(k_base, v_base, ids_base, offs_n, S, sk_n, sv_n, offs_d, offs_dv, HEAD_DIM: tl.constexpr,
              HEAD_DIM_V: tl.constexpr):
    """Key slots ``offs_n`` of a group: their ids and K, V rows."""
    k_ids = tl.load(ids_base + offs_n, mask=offs_n < S, other=-1)
    k_live = k_ids >= 0
    return k_ids, _rows(k_base, k_ids, k_live, sk_n, offs_d, HEAD_DIM), _rows(v_base, k_ids, k_live, sv_n, offs_dv,
                                                                               HEAD_DIM_V)


@triton.jit
def _tg_fwd_kernel(Q, K, V, Ids, Og, Lse, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, si_b, si_h, si_g,
                   n_heads_q, route_head_div, group_size, S, scale_log2,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    b, hq, hkv, route_off, row0 = _program(n_heads_q, route_head_div, group_size, si_b, si_h, si_g, S)
    ids_base = Ids + route_off
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ids = tl.load(ids_base + offs_m, mask=offs_m < S, other=-1)
    q = _rows(Q + b * sq_b + hq * sq_h, q_ids, q_ids >= 0, sq_n, offs_d, HEAD_DIM)
    k_base = K + b * sk_b + hkv * sk_h
    v_base = V + b * sv_b + hkv * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ids, k, v = _key_rows(k_base, v_base, ids_base, offs_n, S, sk_n, sv_n, offs_d, offs_dv, HEAD_DIM,
                                HEAD_DIM_V)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(_visible(q_ids, k_ids, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    row = row0 + offs_m
    tl.store(Og + row.to(tl.int64)[:, None] * HEAD_DIM_V + offs_dv[None, :], o.to(Og.dtype.element_ty),
             mask=(offs_m < S)[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    tl.store(Lse + row, lse, mask=offs_m < S)


@triton.jit
def _tg_bwd_delta_kernel(DO, Og, Ids, Delta, sd_b, sd_h, sd_n, si_b, si_h, si_g, n_heads_q, route_head_div, S,
                         BLOCK_M: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    b, hq, hkv, route_off, row0 = _program(n_heads_q, route_head_div, 1, si_b, si_h, si_g, S)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ids = tl.load(Ids + route_off + offs_m, mask=offs_m < S, other=-1)
    do = _rows(DO + b * sd_b + hq * sd_h, q_ids, q_ids >= 0, sd_n, offs_dv, HEAD_DIM_V).to(tl.float32)
    row = row0 + offs_m
    o = tl.load(Og + row.to(tl.int64)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                mask=(offs_m < S)[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0).to(tl.float32)
    tl.store(Delta + row, tl.sum(do * o, 1), mask=offs_m < S)


@triton.jit
def _bwd_query_rows(q_base, do_base, ids_base, w_base, Lse, Delta, row0, offs_m, S, sq_n, sd_n, offs_d, offs_dv,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr):
    """What the backward needs of query slots ``offs_m``: ids, Q rows, weighted dO rows, lse in log2
    units (0 where a query sees nothing) and the row term ``Delta``."""
    q_ids = tl.load(ids_base + offs_m, mask=offs_m < S, other=-1)
    q_live = q_ids >= 0
    q = _rows(q_base, q_ids, q_live, sq_n, offs_d, HEAD_DIM)
    w = tl.load(w_base + offs_m, mask=offs_m < S, other=0.0)
    do = (_rows(do_base, q_ids, q_live, sd_n, offs_dv, HEAD_DIM_V).to(tl.float32) * w[:, None]).to(q.dtype)
    lse = tl.load(Lse + row0 + offs_m, mask=offs_m < S, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(Delta + row0 + offs_m, mask=offs_m < S, other=0.0)
    return q_ids, q, do, lse2, delta


@triton.jit
def _tg_bwd_dq_kernel(Q, K, V, DO, Ids, W, Lse, Delta, DQg, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                      sd_b, sd_h, sd_n, si_b, si_h, si_g, n_heads_q, route_head_div, group_size, S, scale_log2, scale,
                      CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """``W``: the route's weights times liveness, in the ids' layout (``dout`` of a slot is
    ``w * dout[token]``); ``Delta``: ``w * (dout[token] . o)`` per slot."""
    b, hq, hkv, route_off, row0 = _program(n_heads_q, route_head_div, group_size, si_b, si_h, si_g, S)
    ids_base = Ids + route_off
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ids, q, do, lse2, delta = _bwd_query_rows(Q + b * sq_b + hq * sq_h, DO + b * sd_b + hq * sd_h, ids_base,
                                                W + route_off, Lse, Delta, row0, offs_m, S, sq_n, sd_n, offs_d,
                                                offs_dv, HEAD_DIM, HEAD_DIM_V)
    row = row0 + offs_m
    k_base = K + b * sk_b + hkv * sk_h
    v_base = V + b * sv_b + hkv * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, S, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ids, k, v = _key_rows(k_base, v_base, ids_base, offs_n, S, sk_n, sv_n, offs_d, offs_dv, HEAD_DIM,
                                HEAD_DIM_V)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        p = tl.where(_visible(q_ids, k_ids, CAUSAL), tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQg + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], dq * scale,
             mask=(offs_m < S)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _tg_bwd_dkdv_kernel(Q, K, V, DO, Ids, W, Lse, Delta, DKg, DVg, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h,
                        sv_n, sd_b, sd_h, sd_n, si_b, si_h, si_g, n_heads_q, route_head_div, group_size, S,
                        scale_log2, scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                        BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of one key tile of a group from one query head (the host sums a GQA group's heads)."""
    b, hq, hkv, route_off, row0 = _program(n_heads_q, route_head_div, group_size, si_b, si_h, si_g, S)
    ids_base = Ids + route_off
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ids, k, v = _key_rows(K + b * sk_b + hkv * sk_h, V + b * sv_b + hkv * sv_h, ids_base, offs_n, S, sk_n, sv_n,
                            offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V)
    q_base = Q + b * sq_b + hq * sq_h
    do_base = DO + b * sd_b + hq * sd_h
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, S, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_ids, q, do, lse2, delta = _bwd_query_rows(q_base, do_base, ids_base, W + route_off, Lse, Delta, row0,
                                                    offs_m, S, sq_n, sd_n, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        p = tl.where(_visible(q_ids, k_ids, CAUSAL), tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    rows = (row0 + offs_n).to(tl.int64)
    tl.store(DKg + rows[:, None] * HEAD_DIM + offs_d[None, :], dk * scale,
             mask=(offs_n < S)[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(DVg + rows[:, None] * HEAD_DIM_V + offs_dv[None, :], dv,
             mask=(offs_n < S)[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
