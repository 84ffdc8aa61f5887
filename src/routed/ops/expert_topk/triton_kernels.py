"""Triton kernels of the token-choice expert router: gate, top-k and the expert-sorted order.

The PyTorch route builder is ~25 small launches (softmax, top-k, gather, renormalise, a radix sort
of the slot keys, counts, offsets, the inverse permutation); for a layer of 8k tokens they cost
~0.8 ms of host time and ~0.15 ms of GPU time (H200), more than a third of the whole MoE forward.
Here the same route comes from two kernels and one prefix sum:

* ``_expert_topk_fwd_kernel``: one program per tile of ``BLOCK_T`` tokens holds the tile's
  ``[BLOCK_T, E]`` logits, writes the softmax (float32), picks the top ``K`` experts by repeated
  argmax (the lowest expert id among ties), writes their ids and weights, and the tile's
  per-expert slot counts ``hist[tile, e]``.
* one ``cumsum`` over the expert-major ``hist [E, tiles]`` gives, less ``hist`` itself, where each
  tile's first slot of expert ``e`` lands in the expert-sorted order.
* ``_expert_sort_kernel``: one program per tile ranks each slot among the tile's earlier slots of
  the same expert (a prefix sum of a one-hot ``[slots, E]`` tile) and writes ``order[base + rank]``
  and its inverse ``slot_rows[slot]``; its first program writes the per-expert counts and offsets. The order equals a stable sort of the slots by expert, so
  dispatch (and its weight gradients) stay deterministic.
* ``_expert_topk_bwd_kernel``: the gradient of the weights (and of the returned softmax, e.g.
  from the Switch loss) back to the logits, per tile.

Modes (``MODE``): 0 softmax over all experts then top-k, weights the chosen probabilities
(renormalised when ``NORMALIZE``: Mixtral, Qwen-MoE); 1 top-k logits then a softmax over those
``K`` (Switch-style); 2 the input already is a distribution (the mixing routers' ``probs``): top-k
of it, weights as in mode 0.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_indices(pid, T, E, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """A tile's token rows (and as int64 for addresses), expert and slot columns, and their masks."""
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    rm = rows < T
    cm = cols < E
    return rows, rows.to(tl.int64), cols, tl.arange(0, K_PAD), rm, cm, rm[:, None] & cm[None, :]


@triton.jit
def _expert_topk_fwd_kernel(X, BIAS, PROBS, IDS, W, HIST, T, E, stride_x, num_tiles,
                            MODE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    rows, rows64, cols, kcols, rm, cm, m2 = _tile_indices(pid, T, E, K_PAD, E_PAD, BLOCK_T)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
    if MODE == 2:
        p = tl.where(m2, x, 0.0)
    else:
        mx = tl.where(rm, tl.max(x, axis=1), 0.0)  # x is -inf off the tile (its load's `other`)
        ex = tl.where(m2, tl.exp(x - mx[:, None]), 0.0)
        p = ex / tl.maximum(tl.sum(ex, axis=1), 1e-30)[:, None]
        tl.store(PROBS + rows64[:, None] * E + cols[None, :], p, mask=m2)
    # Scores the choice is made on; the selection bias steers the choice only, never the weights.
    if MODE == 1:
        scores = x
    else:
        scores = p
    if HAS_BIAS:
        scores = scores + tl.load(BIAS + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    scores = tl.where(m2, scores, float("-inf"))
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    vals = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    hist = tl.zeros([E_PAD], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(scores, axis=1)
        idx = tl.min(tl.where(scores == best[:, None], cols[None, :], E_PAD), axis=1)
        idx = tl.minimum(idx, E - 1)  # NaN scores match nothing: keep the id in range (memory safety)
        sel = cols[None, :] == idx[:, None]
        if MODE == 1:
            v = tl.sum(tl.where(sel, x, 0.0), axis=1)
        else:
            v = tl.sum(tl.where(sel, p, 0.0), axis=1)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        vals = tl.where(kcols[None, :] == j, v[:, None], vals)
        scores = tl.where(sel, float("-inf"), scores)
        hist += tl.sum(tl.where(sel & rm[:, None], 1, 0), axis=0).to(tl.int32)
    km = kcols[None, :] < K
    if MODE == 1:
        vals = tl.where(rm[:, None], vals, 0.0)  # rows past T chose -inf logits
        vm = tl.max(tl.where(km, vals, float("-inf")), axis=1)
        ev = tl.where(km, tl.exp(vals - vm[:, None]), 0.0)
        w = ev / tl.sum(ev, axis=1)[:, None]
    elif NORMALIZE:
        w = vals / tl.maximum(tl.sum(tl.where(km, vals, 0.0), axis=1), 1.1754943508222875e-38)[:, None]
    else:
        w = vals
    om = rm[:, None] & km
    tl.store(IDS + rows64[:, None] * K + kcols[None, :], ids, mask=om)
    tl.store(W + rows64[:, None] * K + kcols[None, :], w, mask=om)
    tl.store(HIST + cols * num_tiles + pid, hist, mask=cm)  # expert-major: [E, tiles]


@triton.jit
def _expert_sort_kernel(IDS, HIST, CUM, ORDER, SLOT_ROWS, COUNTS, OFFSETS, T, E, num_tiles,
                        K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    _rows, rows64, cols, kcols, rm, cm, _m2 = _tile_indices(pid, T, E, K_PAD, E_PAD, BLOCK_T)
    if pid == 0:  # the per-expert totals: the inclusive sum at each expert's last tile
        end = tl.load(CUM + cols * num_tiles + num_tiles - 1, mask=cm, other=0)
        start = tl.load(CUM + cols * num_tiles - 1, mask=cm & (cols > 0), other=0)
        tl.store(COUNTS + cols, end - start, mask=cm)
        tl.store(OFFSETS + 1 + cols, end, mask=cm)
        tl.store(OFFSETS + cols, 0, mask=cols == 0)
    S: tl.constexpr = BLOCK_T * K_PAD
    valid2 = rm[:, None] & (kcols < K)[None, :]
    slot2 = rows64[:, None] * K + kcols[None, :]
    ids2 = tl.load(IDS + slot2, mask=valid2, other=0)
    # Flatten row-major: slots in token order, then slot order, as a stable sort by expert keeps them.
    ids = tl.reshape(ids2, [S])
    valid = tl.reshape(valid2, [S])
    slot = tl.reshape(slot2, [S])
    onehot = ((ids[:, None] == cols[None, :]) & valid[:, None]).to(tl.int32)
    rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1  # earlier same-expert slots of the tile
    # The tile's first sorted row of each of its experts: the exclusive prefix sum over (expert, tile).
    at = ids.to(tl.int64) * num_tiles + pid
    base = tl.load(CUM + at, mask=valid, other=0) - tl.load(HIST + at, mask=valid, other=0)
    pos = (base + rank).to(tl.int64)
    tl.store(ORDER + pos, slot, mask=valid)
    tl.store(SLOT_ROWS + slot, pos, mask=valid)


@triton.jit
def _expert_topk_bwd_kernel(PROBS, X, IDS, W, DW, DPROBS, DX, T, E, stride_x, stride_dx,
                            MODE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_DPROBS: tl.constexpr,
                            K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    rows, rows64, cols, kcols, rm, cm, m2 = _tile_indices(pid, T, E, K_PAD, E_PAD, BLOCK_T)
    km = rm[:, None] & (kcols[None, :] < K)
    ids = tl.load(IDS + rows64[:, None] * K + kcols[None, :], mask=km, other=-1)
    w = tl.load(W + rows64[:, None] * K + kcols[None, :], mask=km, other=0.0)
    dw = tl.load(DW + rows64[:, None] * K + kcols[None, :], mask=km, other=0.0).to(tl.float32)
    if MODE == 2:
        p = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        p = tl.load(PROBS + rows64[:, None] * E + cols[None, :], mask=m2, other=0.0)
    # d(weights)/d(chosen values): renormalised weights w = v / sum(v) and the top-k softmax
    # w = softmax(v) share the form dv_j = c_j * (dw_j - sum_i dw_i w_i), c = 1 / sum(v) or w_j.
    wdw = tl.sum(w * dw, axis=1)
    if MODE == 1:
        dv = w * (dw - wdw[:, None])
    elif NORMALIZE:
        vsum = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(K):
            idj = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
            vsum += tl.sum(tl.where(cols[None, :] == idj[:, None], p, 0.0), axis=1)
        dv = (dw - wdw[:, None]) / tl.maximum(vsum, 1.1754943508222875e-38)[:, None]
    else:
        dv = dw
    # Scatter the K values' gradients onto their experts' columns.
    d = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for j in tl.static_range(K):
        idj = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        dvj = tl.sum(tl.where(kcols[None, :] == j, dv, 0.0), axis=1)
        d += tl.where(cols[None, :] == idj[:, None], dvj[:, None], 0.0)
    if MODE == 2:
        dx = d  # the input was the distribution itself
    else:
        dp = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
        if MODE == 0:
            dp += d
        if HAS_DPROBS:  # the returned softmax's own gradient (the Switch loss reads it)
            dp += tl.load(DPROBS + rows64[:, None] * E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dx = p * (dp - tl.sum(dp * p, axis=1)[:, None])  # softmax backward
        if MODE == 1:
            dx += d  # the chosen logits' own top-k softmax
    tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m2)
