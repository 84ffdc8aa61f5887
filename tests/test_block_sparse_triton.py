"""Triton block-sparse kernels against float64 dense masked attention, forward and backward.

On a CPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on
small awkward shapes. Outputs are poisoned (NaN) before every run, so an unwritten element fails.
The interpreter's bf16 tl.dot is broken (it returns garbage even for a bare 16x16 product), so
bf16 is covered on the GPU only (``gpu`` marker, benchmarks/block_sparse.py and
benchmarks/check_small_blocks.py).
"""

import json

import pytest
import torch

from routed import BlockRoute, random_block_route, routed_attention
from routed.testing import (assert_close_rel, block_route_token_mask, dense_attention_f64, poisoned_outputs,
                            random_mask_route, random_qkv)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(*args, **kwargs):
    return random_qkv(*args, device=DEVICE, **kwargs)


def _mask_route(*args, **kwargs):
    return random_mask_route(*args, device=DEVICE, **kwargs)


def check_against_f64(q, k, v, route, *, lse_grad=False, factor=3.0):
    """Forward, lse and (dq, dk, dv) of the Triton kernels vs float64, tolerance relative to
    plain PyTorch computing the same masked attention in the inputs' dtype."""
    scale = q.shape[-1] ** -0.5
    mask = block_route_token_mask(route)
    with poisoned_outputs():
        out, lse = routed_attention(q, k, v, route, backend="triton", return_lse=True)
    ref, ref_lse = dense_attention_f64(q, k, v, mask, scale)
    base, base_lse = dense_attention_f64(q, k, v, mask, scale, dtype=q.dtype)
    assert_close_rel(out, ref, base, factor=factor, what="out")
    assert_close_rel(lse, ref_lse, base_lse.float(), factor=factor, what="lse")

    g = torch.Generator().manual_seed(1234)
    do = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    dl = torch.randn(lse.shape, generator=g).to(lse.device) if lse_grad else None

    def loss_grads(o, l, inputs):  # noqa: E741
        terms = [(o.to(do.dtype) * do).sum()]
        if lse_grad:
            terms.append((torch.where(torch.isfinite(l), l, 0) * dl.to(l.dtype)).sum())
        return torch.autograd.grad(sum(terms), inputs)

    with poisoned_outputs():
        got = loss_grads(out, lse, (q, k, v))
    want = loss_grads(ref, ref_lse, (q, k, v))
    plain = loss_grads(base, base_lse, (q, k, v))
    for name, x, r, b in zip(("dq", "dk", "dv"), got, want, plain):
        assert_close_rel(x, r, b, factor=factor, what=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 63, 200])
def test_matches_f64(causal, group, n):
    q, k, v = _inputs(2, group, 1, n, n, 32, torch.float32, seed=n * group)
    route = _mask_route(2, 1, n, n, 32, 32, causal, density=0.5, seed=n)
    check_against_f64(q, k, v, route)


@pytest.mark.parametrize("bq,bk,nq,causal", [(4, 4, 70, False), (4, 4, 70, True), (4, 16, 70, True),
                                              (16, 4, 70, False), (12, 9, 70, True), (49, 49, 70, False),
                                              (64, 8, 70, True), (1, 2, 70, False), (4, 4, 3, True)])
def test_blocks_smaller_than_a_tile(bq, bk, nq, causal):
    """Blocks below 16 rows or not a multiple of 16 (BiFormer regions of 2x2, 4x4, 7x7 tokens):
    partial own tiles and key/query rows gathered from several routed blocks into one tile."""
    q, k, v = _inputs(2, 4, 2, nq, 75, 16, torch.float32, seed=bq * 7 + bk + causal)
    check_against_f64(q, k, v, _mask_route(2, 2, nq, 75, bq, bk, causal, 0.4, seed=bq + bk))


class _LaunchSpy:
    """Stands in for a Triton kernel and records the pack constexprs of every launch."""

    def __init__(self, kernel, seen: list, key: str = "PACK"):
        self.kernel, self.seen, self.key = kernel, seen, key

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs.get("Q_PACK", kwargs.get("KV_PACK")) if self.key == "PACK" else kwargs[self.key])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("bq,bk,nq,causal,positions", [(4, 4, 70, False, None), (4, 16, 90, True, None),
                                                        (2, 8, 37, False, None), (8, 32, 64, True, None),
                                                        (1, 16, 50, True, None), (16, 4, 64, False, None),
                                                        (4, 4, 64, True, "batched")])
def test_small_blocks_packed_into_one_tile(bq, bk, nq, causal, positions, monkeypatch):
    """Blocks below 16 rows on a program's own side: forward and dq tiles hold 16 // bq whole query
    blocks, dk/dv tiles 16 // bk whole key blocks (each walked row masked to its own block's rows)
    instead of one padded block; ragged last tiles, routes of uneven counts (dead slots), GQA, causal
    and explicit positions. Equal to float64, and to the unpacked kernels (ROUTED_BLOCK_PACK=0)."""
    from routed.ops.block_sparse import triton_ops

    monkeypatch.setattr(triton_ops, "_num_sms", lambda device: 1)  # dk/dv rows unshared: packing applies
    seen = {name: [] for name in ("fwd", "dq", "dkdv")}
    for name in seen:
        attr = f"_block_sparse_{'fwd' if name == 'fwd' else 'bwd_' + name}_kernel"
        monkeypatch.setattr(triton_ops, attr, _LaunchSpy(getattr(triton_ops, attr), seen[name]))
    q, k, v = _inputs(2, 4, 2, nq, 75, 16, torch.float32, seed=bq + bk + nq)
    route = _mask_route(2, 2, nq, 75, bq, bk, causal, 0.5, seed=bq * bk, positions=positions)
    check_against_f64(q, k, v, route)
    want = {"fwd": max(1, 16 // bq), "dq": max(1, 16 // bq), "dkdv": max(1, 16 // bk)}
    assert {n: set(v) for n, v in seen.items()} == {n: {w} for n, w in want.items()}, seen

    def fwd_bwd():
        with poisoned_outputs():
            out = routed_attention(q, k, v, route, backend="triton")
            return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    packed = fwd_bwd()
    monkeypatch.setenv("ROUTED_BLOCK_PACK", "0")
    for v_ in seen.values():
        v_.clear()
    plain = fwd_bwd()
    assert {n: set(v) for n, v in seen.items()} == {n: {1} for n in seen}, seen
    for a, b in zip(packed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("ROUTED_BLOCK_PACK", "yes")
    with pytest.raises(ValueError, match="ROUTED_BLOCK_PACK must be 0 or 1"):
        routed_attention(q, k, v, route, backend="triton")


@pytest.mark.parametrize("tma", [False, True])
def test_packed_tiles_over_whole_key_blocks(tma, monkeypatch):
    """Packed 4-row query blocks against key blocks of 64 (the walk steps through whole blocks, one
    route slot per key tile, instead of gathering rows), with tensor-descriptor loads forced in the
    forward and dq passes (the interpreter reads descriptors too); and dk/dv rows shared between
    programs, where the key side falls back to one block per tile."""
    import os

    from routed.ops.block_sparse import triton_ops

    if tma:
        real = triton_ops._with_tma
        monkeypatch.setattr(triton_ops, "_tma_why_not", lambda *a: None)

        def forced(name, *a, **kw):
            os.environ["ROUTED_TMA"] = "only" if name in ("the forward", "the dq pass") else "1"
            try:
                return real(name, *a, **kw)
            finally:
                os.environ.pop("ROUTED_TMA")
        monkeypatch.setattr(triton_ops, "_with_tma", forced)
    packs, tmas = [], []
    for name, kernel in (("fwd", "_block_sparse_fwd_kernel"), ("dq", "_block_sparse_bwd_dq_kernel")):
        spy = _LaunchSpy(_LaunchSpy(getattr(triton_ops, kernel), packs), tmas, "USE_TMA")
        monkeypatch.setattr(triton_ops, kernel, spy)
    q, k, v = _inputs(2, 4, 2, 90, 200, 16, torch.float32, seed=31)
    check_against_f64(q, k, v, _mask_route(2, 2, 90, 200, 4, 64, True, 0.6, seed=31))
    assert packs == [4, 4] and tmas == [tma, tma], (packs, tmas)
    monkeypatch.undo()
    # few key tiles, long transposed rows: shared (SHARES=2), so dk/dv takes KV_PACK=1
    used = []
    split = triton_ops.dkdv_work_split
    monkeypatch.setattr(triton_ops, "dkdv_work_split", lambda *a: used.append(split(*a)) or used[-1])
    q, k, v = _inputs(1, 2, 1, 400, 24, 16, torch.float32, seed=32)
    check_against_f64(q, k, v, _mask_route(1, 1, 400, 24, 16, 4, False, 0.8, seed=32))
    assert used[0][0] == 2 and used[-1][0] == 2, used


def test_small_blocks_with_segments_and_shared_route():
    """Region-major images: one route shared by every head, padding tokens in a segment of their own."""
    q, k, v = _inputs(2, 3, 3, 64, 64, 16, torch.float32, seed=77)
    seg = (torch.arange(64) % 16 >= 13).to(torch.int32)  # the last 3 tokens of every 16-token region pad
    route = _mask_route(2, 1, 64, 64, 4, 4, False, 0.5, seed=77)
    check_against_f64(q, k, v, route.with_segments(seg.to(DEVICE)))


@pytest.mark.parametrize("bq,bk", [(16, 16), (64, 32), (32, 64), (48, 80)])
def test_block_sizes_and_ragged_lengths(bq, bk):
    q, k, v = _inputs(1, 4, 2, 150, 170, 16, torch.float32, seed=bq + bk)
    check_against_f64(q, k, v, _mask_route(1, 4, 150, 170, bq, bk, True, 0.6, seed=bq))


@pytest.mark.parametrize("route_heads", [1, 2, 6])
def test_route_head_layouts_and_batch_broadcast(route_heads):
    q, k, v = _inputs(2, 6, 2, 96, 96, 16, torch.float32, seed=route_heads)
    check_against_f64(q, k, v, _mask_route(1, route_heads, 96, 96, 16, 16, True, 0.5, seed=route_heads))
    check_against_f64(q, k, v, _mask_route(2, route_heads, 96, 96, 16, 16, False, 0.5, seed=route_heads + 1))


@pytest.mark.parametrize("nq,nk", [(1, 130), (17, 130), (130, 40)])
def test_cross_lengths_kv_cache_alignment(nq, nk):
    q, k, v = _inputs(1, 2, 1, nq, nk, 16, torch.float32, seed=nq)
    for causal in (False, True):
        check_against_f64(q, k, v, _mask_route(1, 1, nq, nk, 16, 16, causal, 0.7, seed=nk))


@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("nq", [1, 4, 16])
@pytest.mark.parametrize("route_heads", [1, 8])
def test_decode_split_path(nq, route_heads, fused_merge, monkeypatch):
    """Few queries against many routed key blocks: split over programs, GQA heads packed, merged by
    the split that arrives last (fused) or by a second launch."""
    from routed.ops.block_sparse import triton_ops

    monkeypatch.setattr(triton_ops, "DECODE_FUSED_MERGE", fused_merge)
    q, k, v = _inputs(1, 8, 1, nq, 300, 16, torch.float32, seed=nq)
    for causal in (False, True):
        check_against_f64(q, k, v, _mask_route(1, route_heads, nq, 300, 16, 16, causal, 0.8, seed=nq + causal))
    check_against_f64(q, k, v, _mask_route(1, route_heads, nq, 300, 16, 16, True, 0.8, seed=1, positions="permuted"))


def _decode_configs():
    from routed.ops.block_sparse.triton_ops import DECODE_CANDIDATES

    return DECODE_CANDIDATES


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("cfg", _decode_configs())
def test_decode_launch_configs(cfg, use_tma, monkeypatch):
    """Every decode config the autotuner may pick (splits per SM, key tile, warps, stages; plain or
    tensor-descriptor loads), forced."""
    from routed.ops.block_sparse import triton_ops

    pps, n, w, st = cfg
    monkeypatch.setattr(triton_ops, "_decode_candidates", lambda sub_max, *_: (
        dict(programs_per_sm=pps, BLOCK_N=min(n, sub_max), num_warps=w, num_stages=st, USE_TMA=use_tma),))
    q, k, v = _inputs(1, 8, 2, 3, 700, 16, torch.float32, seed=pps)
    check_against_f64(q, k, v, _mask_route(1, 2, 3, 700, 16, 64, True, 0.8, seed=n))
    check_against_f64(q, k, v, _mask_route(1, 8, 3, 700, 16, 128, False, 0.8, seed=n + 1))


@pytest.mark.parametrize("positions", ["permuted", "batched"])
def test_permuted_positions(positions):
    q, k, v = _inputs(2, 4, 2, 100, 100, 16, torch.float32, seed=3)
    check_against_f64(q, k, v, _mask_route(2, 2, 100, 100, 16, 32, True, 0.7, seed=3, positions=positions))


def test_head_dims_and_value_dim():
    for d, dv in ((8, 8), (40, 24), (64, 128)):
        q, k, v = _inputs(1, 2, 2, 70, 70, d, torch.float32, seed=d, dv=dv)
        check_against_f64(q, k, v, _mask_route(1, 2, 70, 70, 16, 16, True, 0.5, seed=d))


def test_lse_gradient():
    q, k, v = _inputs(1, 3, 1, 80, 80, 16, torch.float32, seed=9)
    check_against_f64(q, k, v, _mask_route(1, 1, 80, 80, 16, 16, True, 0.5, seed=9), lse_grad=True)


def test_gradient_through_lse_alone():
    """Only lse used (out's gradient arrives as None, not zeros), against float64."""
    q, k, v = _inputs(1, 2, 1, 50, 50, 16, torch.float32, seed=10)
    route = _mask_route(1, 1, 50, 50, 16, 16, True, 0.6, seed=10)
    _, lse = routed_attention(q, k, v, route, backend="triton", return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, ref = dense_attention_f64(q64, k64, v64, block_route_token_mask(route), 16 ** -0.5)
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((torch.where(torch.isfinite(lse), lse, 0).double() * w).sum(), (q, k, v))
    want = torch.autograd.grad((torch.where(torch.isfinite(ref), ref, 0) * w).sum(), (q64, k64))
    for g_, r_ in zip(got, want):
        torch.testing.assert_close(g_.double(), r_, rtol=1e-4, atol=1e-5)
    assert float(got[0].abs().max()) > 0 and bool((got[2] == 0).all())  # lse does not depend on v


def test_empty_and_partially_empty_routes():
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, torch.float32, seed=5)
    empty = BlockRoute(torch.full((1, 2, 4, 3), -1, dtype=torch.int32), torch.zeros(1, 2, 4, dtype=torch.int32),
                       64, 64, 16, 16, causal=True).to(DEVICE)
    with poisoned_outputs():
        out, lse = routed_attention(q, k, v, empty, backend="triton", return_lse=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    for gr in grads:
        assert torch.equal(gr, torch.zeros_like(gr))
    check_against_f64(q, k, v, _mask_route(1, 2, 64, 64, 16, 16, True, 0.3, seed=5))


@pytest.mark.parametrize("nq,block", [(1, 16), (40, 16), (40, 4)])
def test_route_of_width_zero(nq, block):
    """A route whose id axis has width 0 (nothing routed anywhere), main and decode paths, and packed
    small blocks (a packed walk of 0 slots)."""
    q, k, v = _inputs(1, 2, 1, nq, 40, 16, torch.float32, seed=nq)
    nqb = -(-nq // block)
    route = BlockRoute(torch.zeros(1, 1, nqb, 0, dtype=torch.int32), torch.zeros(1, 1, nqb, dtype=torch.int32),
                       nq, 40, block, block, causal=True).to(DEVICE)
    with poisoned_outputs():
        out, lse = routed_attention(q, k, v, route, backend="triton", return_lse=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    for gr in grads:
        assert torch.equal(gr, torch.zeros_like(gr))


ATOMIC_DQ_CASES = {
    "gqa3_causal_ragged": lambda: ((_inputs(2, 3, 1, 63, 63, 32, torch.float32, seed=5)),
                                   _mask_route(2, 1, 63, 63, 32, 32, True, 0.5, seed=5), {}),
    "gqa8_full": lambda: (_inputs(1, 8, 1, 100, 100, 16, torch.float32, seed=6),
                          _mask_route(1, 1, 100, 100, 16, 16, False, 0.5, seed=6), {}),
    "gathered_small_blocks": lambda: (_inputs(2, 4, 2, 70, 75, 16, torch.float32, seed=7),
                                      _mask_route(2, 2, 70, 75, 4, 4, True, 0.4, seed=7), {}),
    "blocks_12_9": lambda: (_inputs(2, 4, 2, 70, 75, 16, torch.float32, seed=8),
                            _mask_route(2, 2, 70, 75, 12, 9, True, 0.4, seed=8), {}),
    "permuted_positions": lambda: (_inputs(2, 4, 2, 100, 100, 16, torch.float32, seed=9),
                                   _mask_route(2, 2, 100, 100, 16, 32, True, 0.7, seed=9, positions="batched"), {}),
    "head_dims_40_24_lse_grad": lambda: (_inputs(1, 2, 2, 70, 70, 40, torch.float32, seed=10, dv=24),
                                         _mask_route(1, 2, 70, 70, 16, 16, True, 0.5, seed=10), {"lse_grad": True}),
    "one_query": lambda: (_inputs(1, 8, 1, 1, 130, 16, torch.float32, seed=11),
                          _mask_route(1, 1, 1, 130, 16, 16, True, 0.8, seed=11), {}),
    "float16": lambda: (_inputs(1, 4, 2, 100, 100, 32, torch.float16, seed=12),
                        _mask_route(1, 2, 100, 100, 16, 16, True, 0.5, seed=12), {}),
}


@pytest.mark.parametrize("case", sorted(ATOMIC_DQ_CASES))
def test_backward_with_atomic_dq(case, monkeypatch):
    """ROUTED_BWD=atomic: dQ added by the dk/dv kernel with atomics (no dq kernel) equals float64."""
    monkeypatch.setenv("ROUTED_BWD", "atomic")
    (q, k, v), route, kw = ATOMIC_DQ_CASES[case]()
    check_against_f64(q, k, v, route, **kw)


def test_backward_with_atomic_dq_and_segments(monkeypatch):
    monkeypatch.setenv("ROUTED_BWD", "atomic")
    q, k, v = _inputs(2, 3, 3, 64, 64, 16, torch.float32, seed=77)
    seg = (torch.arange(64) % 16 >= 13).to(torch.int32)
    check_against_f64(q, k, v, _mask_route(2, 1, 64, 64, 4, 4, False, 0.5, seed=77).with_segments(seg.to(DEVICE)))


@pytest.mark.parametrize("faster", ["split", "atomic"])
def test_backward_auto_mode_times_both_and_keeps_the_faster(faster, monkeypatch):
    """ROUTED_BWD=auto where configs are tuned (faked here: a timer that runs each variant once and
    reports a fixed time) runs both variants, keeps the faster for the shape, and its gradients are right."""
    import triton.testing

    from routed.ops.block_sparse import triton_ops

    timed = []

    def fake_bench(fn, **_):
        fn()
        timed.append(fn)
        is_atomic = getattr(fn, "__name__", "") == "run_atomic"
        return 1.0 if is_atomic == (faster == "atomic") else 2.0

    monkeypatch.setattr(triton_ops, "_tuning", lambda device: True)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton_ops, "_TUNED", {})
    monkeypatch.setattr(triton_ops, "_disk_cache_path", lambda device: None)
    monkeypatch.setenv("ROUTED_AUTOTUNE", "full")
    monkeypatch.delenv("ROUTED_BWD", raising=False)
    q, k, v = _inputs(1, 4, 2, 70, 70, 16, torch.float32, seed=41)
    check_against_f64(q, k, v, _mask_route(1, 2, 70, 70, 16, 16, True, 0.5, seed=41))
    chosen = [m for key, m in triton_ops._TUNED.items() if key[0] == "bwd_mode"]
    assert chosen == [faster]
    assert {getattr(f, "__name__", "") for f in timed} >= {"run_split", "run_atomic"}


def test_quick_autotuning_times_the_short_lists_and_remembers_on_disk(tmp_path, monkeypatch):
    """ROUTED_AUTOTUNE=quick (the default): only the QUICK configs are timed, the backward keeps
    the dq kernel, and the choices persist: a new process (here: an emptied in-memory table) reads
    them from the cache file and times nothing."""
    import triton.testing

    from routed.ops.block_sparse import triton_ops

    timed = []

    def fake_bench(fn, **_):
        fn()
        timed.append(fn)
        return 1.0 + len(timed) % 3  # some order; the first of the fastest wins

    path = tmp_path / "autotune.json"
    monkeypatch.setattr(triton_ops, "_tuning", lambda device: True)
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton_ops, "_TUNED", {})
    monkeypatch.setattr(triton_ops, "_DISK", {})
    monkeypatch.setattr(triton_ops, "_disk_cache_path", lambda device: path)
    monkeypatch.delenv("ROUTED_AUTOTUNE", raising=False)
    monkeypatch.delenv("ROUTED_BWD", raising=False)
    q, k, v = _inputs(1, 4, 2, 130, 130, 16, torch.float32, seed=43)
    route = _mask_route(1, 2, 130, 130, 64, 64, True, 0.5, seed=43)
    check_against_f64(q, k, v, route)
    names = {key[0] for key in triton_ops._TUNED}
    assert names == {"fwd", "bwd_dq", "bwd_dkdv"}  # no atomic variant, no bwd_mode timing
    n_timed = len(timed)
    assert 0 < n_timed <= 2 * sum(len(triton_ops.QUICK[x]) for x in ("fwd", "dq", "dkdv"))
    first = dict(triton_ops._TUNED)
    assert path.exists() and len(json.loads(path.read_text())) == len(first)

    monkeypatch.setattr(triton_ops, "_TUNED", {})
    monkeypatch.setattr(triton_ops, "_DISK", {})
    check_against_f64(q, k, v, route)
    assert len(timed) == n_timed, "the cached choices were timed again"
    assert triton_ops._TUNED == first


def test_decode_pdl_requests_are_checked(monkeypatch):
    from routed.ops.block_sparse.triton_ops import decode_pdl

    monkeypatch.setenv("ROUTED_DECODE_PDL", "yes")
    with pytest.raises(ValueError, match="ROUTED_DECODE_PDL must be 0 or 1"):
        decode_pdl(torch.device(DEVICE))
    monkeypatch.setenv("ROUTED_DECODE_PDL", "0")
    assert decode_pdl(torch.device(DEVICE)) is False
    monkeypatch.setenv("ROUTED_DECODE_PDL", "1")
    assert decode_pdl(torch.device("cpu")) is False  # the interpreter has no grid dependency control


def test_autotune_mode_is_checked(monkeypatch):
    from routed.ops.block_sparse import triton_ops

    monkeypatch.setenv("ROUTED_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="ROUTED_AUTOTUNE must be one of"):
        triton_ops.autotune_mode()
    monkeypatch.setenv("ROUTED_AUTOTUNE", "1")
    assert triton_ops.autotune_mode() == "quick"


def test_backward_mode_requests_are_checked(monkeypatch):
    q, k, v = _inputs(1, 2, 1, 32, 32, 16, torch.float32, seed=0)
    route = _mask_route(1, 1, 32, 32, 16, 16, True, 1.0, seed=0)
    monkeypatch.setenv("ROUTED_BWD", "fused")
    with pytest.raises(ValueError, match="ROUTED_BWD must be one of"):
        routed_attention(q, k, v, route, backend="triton").sum().backward()
    monkeypatch.setenv("ROUTED_BWD", "atomic")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            routed_attention(q, k, v, route, backend="triton").sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("route_heads,atomic", [(1, False), (2, False), (2, True)])
def test_group_major_program_order(route_heads, atomic, monkeypatch):
    """The forward and dq passes in group-major program order (the GQA heads that share a route run
    side by side; offered to the autotuner, forced here) equal float64, both ways of getting dQ."""
    from routed.ops.block_sparse import triton_ops

    offer = triton_ops._with_group_order
    forced = []

    def group_major_only(candidates, group, route_heads, n_heads_kv):
        cands, key = offer(candidates, group, route_heads, n_heads_kv)
        forced.append(key[0])
        return [c for c in cands if c["GROUP_MAJOR"]], key

    monkeypatch.setattr(triton_ops, "_with_group_order", group_major_only)
    monkeypatch.setenv("ROUTED_BWD", "atomic" if atomic else "split")
    q, k, v = _inputs(2, 6, 2, 90, 90, 16, torch.float32, seed=route_heads)
    check_against_f64(q, k, v, _mask_route(2, route_heads, 90, 90, 16, 32, True, 0.5, seed=route_heads))
    assert forced and all(forced)  # the order was offered (and so forced) in every pass


def test_float16():
    q, k, v = _inputs(1, 4, 2, 100, 100, 32, torch.float16, seed=11)
    check_against_f64(q, k, v, _mask_route(1, 2, 100, 100, 16, 16, True, 0.5, seed=11))


def test_random_benchmark_route_shape():
    q, k, v = _inputs(1, 4, 1, 256, 256, 32, torch.float32, seed=12)
    route = random_block_route(256, block_size=64, blocks=2, heads=1, causal=True,
                               generator=torch.Generator().manual_seed(0)).to(DEVICE)
    check_against_f64(q, k, v, route)


def test_transposed_route():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 7, 5, generator=g) < 0.4
    r = BlockRoute.from_block_mask(mask, q_len=7 * 16, kv_len=5 * 16, q_block_size=16)
    t_ids, t_counts = r.transposed()
    assert r.transposed()[0] is t_ids  # computed once per route
    assert torch.equal(t_counts, mask.sum(-2).int())
    for b in range(2):
        for h in range(3):
            for j in range(5):
                n = int(t_counts[b, h, j])
                assert t_ids[b, h, j, :n].tolist() == mask[b, h, :, j].nonzero().flatten().tolist()
                assert bool((t_ids[b, h, j, n:] == -1).all())


@pytest.mark.parametrize("shape,nkb", [((2, 3, 7, 4), 5), ((1, 1, 1, 1), 1), ((2, 1, 300, 6), 40), ((1, 2, 5, 0), 3),
                                       ((3, 1, 49, 16), 49)])
def test_transpose_kernel_equals_sorting_transpose(shape, nkb):
    """The one-launch Triton transpose (small routes rebuilt every call) equals the sort-based one,
    padding (-1) and empty rows included."""
    from routed.ops.block_sparse.triton_ops import transpose_block_ids_triton
    from routed.route import transpose_block_ids

    br, hr, nqb, width = shape
    g = torch.Generator().manual_seed(nqb + nkb)
    ids = torch.stack([torch.randperm(nkb, generator=g)[:width] for _ in range(br * hr * nqb)]).view(shape)
    ids = torch.where(torch.rand(shape, generator=g) < 0.25, -1, ids)  # some padding slots
    ids = torch.where(ids < 0, nkb + 1, ids).sort(-1).values  # a route row: sorted, -1 at the end
    ids = torch.where(ids > nkb, -1, ids).to(torch.int32).to(DEVICE)
    got_ids, got_counts = transpose_block_ids_triton(ids, nkb)
    want_ids, want_counts = transpose_block_ids(ids, nkb)
    assert torch.equal(got_counts, want_counts)
    width_t = want_ids.shape[-1]
    assert torch.equal(got_ids[..., :width_t], want_ids) and bool((got_ids[..., width_t:] == -1).all())


@pytest.mark.parametrize("q_len,kv_len,qbs,kbs,causal", [(100, 100, 16, 16, True), (37, 100, 16, 32, True),
                                                     (70, 75, 32, 16, False), (64, 64, 16, 16, False),
                                                     (1, 90, 16, 16, True), (50, 300, 4, 8, True),
                                                     (600, 600, 4, 4, True)])  # rows of >64 ids: smaller tiles
@pytest.mark.parametrize("all_masked", [False, True])
def test_mask_split_counts_kernels_equal_pytorch(q_len, kv_len, qbs, kbs, causal, all_masked):
    """The clean-block counts (one launch) and the masked query-block counts (from the transpose
    launch) equal their PyTorch forms, outputs poisoned."""
    from routed.ops.block_sparse import triton_ops
    from routed.route import transpose_block_ids

    route = _mask_route(2, 3, q_len, kv_len, qbs, kbs, causal, 0.4, seed=q_len + kbs)
    ids, counts = route.kv_block_ids, route.kv_block_counts
    with poisoned_outputs():
        clean = triton_ops.clean_block_counts(ids, counts, q_len, kv_len, qbs, kbs, causal, all_masked)
        t_ids, t_counts, _, t_masked = triton_ops._transposed(ids, route.num_kv_blocks,
                                                              (q_len, kv_len, qbs, kbs, causal, all_masked))
    want_clean = (torch.zeros_like(counts) if all_masked else
                  triton_ops._clean_block_counts_torch(ids, counts, q_len, kv_len, qbs, kbs, causal))
    assert torch.equal(clean, want_clean)
    w_ids, w_counts = transpose_block_ids(ids, route.num_kv_blocks)
    want_masked = (w_counts if all_masked else
                   triton_ops.masked_query_counts(w_ids, w_counts, q_len, kv_len, qbs, kbs, causal, False))
    assert torch.equal(t_counts, w_counts) and torch.equal(t_masked, want_masked)
    if not all_masked and causal:
        assert 0 < int(clean.sum()) < int(counts.sum())  # both branches of the split occur


@pytest.mark.parametrize("shape,nkb", [((2, 3, 7, 4), 5), ((1, 1, 1, 1), 1), ((2, 1, 300, 6), 40), ((1, 2, 5, 0), 3),
                                       ((3, 1, 49, 16), 49)])
def test_compact_transpose_equals_padded(shape, nkb):
    """The compact transposed route (one list per row, key-block starts) holds the padded one's
    rows, in order, and nothing else."""
    from routed.route import transpose_block_ids, transpose_block_ids_compact

    br, hr, nqb, width = shape
    g = torch.Generator().manual_seed(nqb * 3 + nkb)
    ids = torch.stack([torch.randperm(nkb, generator=g)[:width] for _ in range(br * hr * nqb)]).view(shape)
    ids = torch.where(torch.rand(shape, generator=g) < 0.25, -1, ids)
    ids = torch.where(ids < 0, nkb + 1, ids).sort(-1).values
    ids = torch.where(ids > nkb, -1, ids).to(torch.int32)
    want_ids, want_counts = transpose_block_ids(ids, nkb)
    got_ids, got_offsets, got_counts = transpose_block_ids_compact(ids, nkb)
    assert got_ids.shape == (br, hr, nqb * width)  # O(routed blocks), whatever the counts
    assert torch.equal(got_counts, want_counts)
    for b in range(br):
        for h in range(hr):
            for j in range(nkb):
                n, o = int(got_counts[b, h, j]), int(got_offsets[b, h, j])
                assert torch.equal(got_ids[b, h, o:o + n], want_ids[b, h, j, :n])
            assert bool((got_ids[b, h, int(got_counts[b, h].sum()):] == -1).all())


COMPACT_CASES = {
    "causal_gqa_ragged": lambda: (_inputs(2, 4, 2, 150, 170, 16, torch.float32, seed=51),
                                  _mask_route(2, 2, 150, 170, 32, 32, True, 0.5, seed=51), {}),
    "small_blocks_gathered": lambda: (_inputs(1, 4, 2, 70, 75, 16, torch.float32, seed=52),
                                      _mask_route(1, 2, 70, 75, 4, 16, True, 0.4, seed=52), {}),
    "shared_route_lse_grad": lambda: (_inputs(2, 3, 3, 100, 100, 16, torch.float32, seed=53),
                                      _mask_route(1, 1, 100, 100, 16, 16, False, 0.6, seed=53), {"lse_grad": True}),
    "permuted_positions": lambda: (_inputs(1, 2, 1, 96, 96, 16, torch.float32, seed=54),
                                   _mask_route(1, 1, 96, 96, 16, 16, True, 0.5, seed=54, positions="permuted"), {}),
}


@pytest.mark.parametrize("mode", ["split", "atomic"])
@pytest.mark.parametrize("case", sorted(COMPACT_CASES))
def test_backward_over_the_compact_transposed_route(case, mode, monkeypatch):
    """Routes too large for the one-launch transpose take the compact form (forced here for every
    route): dK and dV walk it and equal float64."""
    from routed.ops.block_sparse import triton_ops

    monkeypatch.setattr(triton_ops, "TRANSPOSE_KERNEL_MAX_CHECKS", -1)
    monkeypatch.setenv("ROUTED_BWD", mode)
    (q, k, v), route, kw = COMPACT_CASES[case]()
    check_against_f64(q, k, v, route, **kw)
    assert route._cache["kernel_transposed"][2] is not None, "the compact form was not used"


def _nsa_like_compressed(nq):
    """NSA's compressed-branch geometry: many query blocks, few key blocks each seen by most of them,
    explicit causal positions (the keys' block ends)."""
    from routed.layers.nsa import _compressed_route, num_compressed_blocks

    nc = num_compressed_blocks(nq, 32, 16)
    return _compressed_route(nq, nc, nq, 16, 32, 16, torch.device(DEVICE)), nc


def _sink_and_diagonal(n, block):
    """Every query block keeps key block 0 (a sink) and its own: the sink's transposed row is as long as
    the sequence's block count, every other row holds one block."""
    nb = -(-n // block)
    mask = torch.eye(nb, dtype=torch.bool)
    mask[:, 0] = True
    return BlockRoute.from_block_mask(mask[None, None], q_len=n, kv_len=n, q_block_size=block, kv_block_size=block,
                                      causal=True).to(DEVICE)


SPLIT_ROW_CASES = {  # (inputs, route): few key tiles or a hot key block, long transposed rows
    "nsa_compressed_gqa": lambda: ((lambda r: (_inputs(1, 4, 1, 512, r[1], 16, torch.float32, seed=61), r[0]))(
        _nsa_like_compressed(512))),
    "cross_ragged_keys": lambda: (_inputs(1, 2, 1, 600, 70, 16, torch.float32, seed=62),
                                  _mask_route(1, 1, 600, 70, 16, 32, False, 0.7, seed=62)),
    "gathered_small_query_blocks": lambda: (_inputs(1, 2, 1, 300, 40, 16, torch.float32, seed=63),
                                            _mask_route(1, 1, 300, 40, 4, 16, False, 0.8, seed=63)),
    "sink_gqa_ragged": lambda: (_inputs(1, 2, 1, 1100, 1100, 16, torch.float32, seed=64), _sink_and_diagonal(1100, 16)),
}


@pytest.mark.parametrize("mode,deterministic", [("split", False), ("atomic", False), ("split", True)])
@pytest.mark.parametrize("case", sorted(SPLIT_ROW_CASES))
def test_dkdv_shares_long_transposed_rows_between_programs(case, mode, deterministic, monkeypatch):
    """Long transposed rows are walked in shares by several dk/dv programs (the interpreter counts 4
    SMs): shares of a fixed size, the further ones listed on the device, whose tiles add by atomics and
    are copied out by the combine kernel; or, deterministic, equal shares summed from float32 partials
    while the key tiles do not fill the GPU. Both equal float64."""
    from routed.ops.block_sparse import triton_ops

    used = []
    real = triton_ops.dkdv_work_split
    monkeypatch.setattr(triton_ops, "dkdv_work_split", lambda *a: used.append(real(*a)) or used[-1])
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    monkeypatch.setattr(triton_ops, "_num_sms", lambda device: 4)  # the interpreter's count, on a GPU too
    monkeypatch.setenv("ROUTED_BWD", mode)
    (q, k, v), route = SPLIT_ROW_CASES[case]()
    check_against_f64(q, k, v, route)
    shares = {u[0] for u in used}
    if deterministic:  # the sink case's 69 key tiles fill the interpreter's 4 SMs: one program per tile
        want = {0} if case == "sink_gqa_ragged" else {1}
    else:
        want = {2}
    assert shares == want, f"dk/dv work split {used}, wanted SHARES in {want}"


def test_dkdv_listed_shares_keep_sums_for_shared_tiles_only(monkeypatch):
    """The listed shares' float32 atomic sums take room for the shared tiles only (here the sink's),
    not a float32 copy of all of K and V; the result still equals float64."""
    from routed.ops.block_sparse import triton_ops

    used, zeros = [], []
    real_split, real_zeros = triton_ops.dkdv_work_split, torch.zeros
    monkeypatch.setattr(triton_ops, "dkdv_work_split", lambda *a: used.append(real_split(*a)) or used[-1])
    monkeypatch.setattr(triton_ops, "_num_sms", lambda device: 4)
    monkeypatch.setenv("ROUTED_BWD", "split")

    def recording_zeros(*size, **kw):
        out = real_zeros(*size, **kw)
        if out.dtype == torch.float32:
            zeros.append(out.numel())
        return out

    monkeypatch.setattr(triton_ops.torch, "zeros", recording_zeros)
    (q, k, v), route = SPLIT_ROW_CASES["sink_gqa_ragged"]()
    check_against_f64(q, k, v, route)
    assert {u[0] for u in used} == {2}, f"dk/dv work split {used}: the listed shares did not run"
    assert zeros and max(zeros) < k.numel() + v.numel(), f"float32 sums of {max(zeros, default=0)} elements"


def _brute_position_splits(route):
    ids, QB, KB = route.kv_block_ids, route.q_block_size, route.kv_block_size
    qpos, kpos = route.resolved_q_positions(), route.resolved_kv_positions()
    Br, Hr, nqb, W = ids.shape
    nkb = route.num_kv_blocks
    clean = torch.zeros(Br, Hr, nqb, dtype=torch.int32)
    t_masked = torch.zeros(Br, Hr, nkb, dtype=torch.int32)
    for b in range(Br):
        rows = range(qpos.shape[0]) if Br == 1 else [min(b, qpos.shape[0] - 1)]  # a shared route: every row
        for h in range(Hr):
            need = {}
            for i in range(nqb):
                run = True
                for w in range(W):
                    j = int(ids[b, h, i, w])
                    if j < 0:
                        run = False
                        continue
                    ok = (j + 1) * KB <= route.kv_len
                    if route.causal:
                        for r in rows:
                            k_last, q_first = kpos[r, j * KB:(j + 1) * KB].max(), qpos[r, i * QB:(i + 1) * QB].min()
                            ok = ok and int(k_last) <= int(q_first)
                    run = run and ok
                    clean[b, h, i] += int(run)
                    need.setdefault(j, []).append((i, not ok))
            for j, pairs in need.items():
                masked = [n for n, (_, m) in enumerate(sorted(pairs)) if m]
                t_masked[b, h, j] = masked[-1] + 1 if masked else 0
    return clean, t_masked


@pytest.mark.parametrize("positions", ["monotone_gaps", "permuted", "batched", "nsa_compressed"])
@pytest.mark.parametrize("causal", [True, False])
def test_position_mask_splits_equal_their_definition(positions, causal):
    from routed.ops.block_sparse.triton_ops import position_mask_splits

    g = torch.Generator().manual_seed(7)
    if positions == "nsa_compressed":
        route, _ = _nsa_like_compressed(300)
        if not causal:
            route = BlockRoute(route.kv_block_ids, route.kv_block_counts, route.q_len, route.kv_len,
                               route.q_block_size, route.kv_block_size, causal=False,
                               q_positions=route.q_positions, kv_positions=route.kv_positions)
    else:
        nq = nk = 150
        mask = torch.rand(2, 2, 10, 10, generator=g) < 0.6
        if positions == "monotone_gaps":  # increasing, with gaps: many pairs are wholly visible
            kp = torch.cumsum(torch.randint(1, 4, (nk,), generator=g), 0).to(torch.int32)
            qp = kp
        elif positions == "permuted":
            kp = qp = torch.randperm(nk, generator=g).to(torch.int32)
        else:
            kp = qp = torch.stack([torch.cumsum(torch.randint(1, 4, (nk,), generator=g), 0) for _ in range(2)]).to(
                torch.int32)
            mask = mask[:1]  # one route shared by both batch rows
        route = BlockRoute.from_block_mask(mask, q_len=nq, kv_len=nk, q_block_size=16, kv_block_size=16,
                                           causal=causal, q_positions=qp, kv_positions=kp)
    clean, t_masked = position_mask_splits(route)
    want_clean, want_masked = _brute_position_splits(route)
    assert torch.equal(clean, want_clean)
    assert torch.equal(t_masked, want_masked)
    if positions in ("monotone_gaps", "nsa_compressed"):
        assert int(clean.sum()) > 0, "no pair came out clean: the test checks nothing"


@pytest.mark.parametrize("positions", ["permuted", "batched", "nsa_compressed"])
def test_reused_position_routes_take_exact_mask_splits(positions, monkeypatch):
    """A route with explicit positions used again gets its mask splits from the positions: the
    kernels skip masks on its clean pairs, forward and backward, and still equal float64."""
    from routed.ops.block_sparse import triton_ops

    monkeypatch.setattr(triton_ops, "POSITION_SPLITS_AFTER_USES", 1)
    if positions == "nsa_compressed":
        route, nc = _nsa_like_compressed(512)
        q, k, v = _inputs(1, 4, 2, 512, nc, 16, torch.float32, seed=71)
    else:
        q, k, v = _inputs(2, 4, 2, 100, 100, 16, torch.float32, seed=72)
        route = _mask_route(2, 2, 100, 100, 16, 16, True, 0.7, seed=72, positions=positions)
    check_against_f64(q, k, v, route)
    assert route._cache.get("position_splits") is True
    if positions == "nsa_compressed":
        assert int(route._cache["clean"].sum()) > 0 and int(route._cache["t_masked"].sum()) < int(
            route._cache["kernel_transposed"][1].sum())


def test_dkdv_work_split_heuristics():
    from routed.ops.block_sparse.triton_ops import dkdv_splits, dkdv_work_split

    assert dkdv_splits(132, 512, 132) == 1  # the key tiles fill the GPU
    assert dkdv_splits(16, 12, 132) == 1  # short rows: partial sums would cost more than they save
    assert dkdv_splits(128, 512, 132) == 9  # NSA's compressed branch at 32k: ~8 programs per SM
    assert dkdv_splits(1, 40, 132) == 5  # at least 8 query blocks per share
    # NSA's selected blocks at 32k (1024 key tiles, 8 blocks per row on average, a sink row of 512):
    # shares of 32 query blocks
    assert dkdv_work_split(1024, 512, 8, 132, False) == (2, 1, 32)
    assert dkdv_work_split(1024, 512, 8, 132, True) == (0, 1, 0)  # no atomics: one program per row
    assert dkdv_work_split(64, 48, 40, 132, True) == (1, 5, 0)  # no atomics: equal shares, partial sums
    assert dkdv_work_split(8192, 1024, 1, 132, False) == (2, 1, 32)  # BRA stage 1 at 1024 px
    assert dkdv_work_split(64, 12, 12, 132, False) == (0, 1, 0)  # no row can exceed one share


def _token_major_inputs(b, hq, hkv, nq, nk, d, seed):
    """q, k, v as a projection hands them over: ``[B, N, H, d]`` memory seen as ``[B, H, N, d]``."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(b, n, h, d, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()  # noqa: E731
    return mk(hq, nq), mk(hkv, nk), mk(hkv, nk)


@pytest.mark.parametrize("case", ["split", "atomic", "partial_sums", "listed_shares", "decode"])
def test_token_major_inputs_give_token_major_outputs(case, monkeypatch):
    """Inputs laid out [B, N, H, d] (a projection's transposed view) give out, dq, dk and dv in the
    same layout, so ``out.transpose(1, 2).reshape(B, N, H * d)`` is a view and no gradient needs a
    copy; every backward variant writes through those strides and equals float64."""
    from routed.ops.block_sparse import triton_ops

    monkeypatch.setenv("ROUTED_BWD", "atomic" if case == "atomic" else "split")
    monkeypatch.setattr(triton_ops, "_num_sms", lambda device: 4)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: case == "partial_sums")
    used = []
    real = triton_ops.dkdv_work_split
    monkeypatch.setattr(triton_ops, "dkdv_work_split", lambda *a: used.append(real(*a)) or used[-1])
    if case in ("partial_sums", "listed_shares"):  # few key tiles, long transposed rows: shared between programs
        q, k, v = _token_major_inputs(1, 4, 2, 400, 24, 16, seed=21)
        route = _mask_route(1, 2, 400, 24, 16, 32, False, 0.7, seed=21)
    else:
        nq = 2 if case == "decode" else 96
        q, k, v = _token_major_inputs(2, 4, 2, nq, 160, 16, seed=21)
        route = _mask_route(2, 2, nq, 160, 16, 16, True, 0.9, seed=21)
    check_against_f64(q, k, v, route)
    want = {"partial_sums": {1}, "listed_shares": {2}, "decode": {0}}.get(case, {0})
    assert {u[0] for u in used} == want, f"dk/dv work split {used}, wanted SHARES in {want}"
    with poisoned_outputs():
        out = routed_attention(q, k, v, route, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert t.transpose(1, 2).is_contiguous(), f"{name} strides {t.stride()} are not token-major"


def test_compiles_without_graph_breaks():
    q, k, v = _inputs(1, 4, 2, 64, 64, 16, torch.float32, seed=13)
    route = _mask_route(1, 2, 64, 64, 16, 16, True, 0.5, seed=13)

    def f(q, k, v):
        out = routed_attention(q, k, v, route, backend="triton")
        # traced as a view or a copy by the fake strides: a fake that promises a view of a real output
        # laid out otherwise fails here
        return out.transpose(1, 2).reshape(*out.shape[::2], -1).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for inputs in ((q, k, v), _token_major_inputs(1, 4, 2, 64, 64, 16, seed=13)):  # fake strides as real ones
        loss = compiled(*inputs)
        got = torch.autograd.grad(loss, inputs)
        eager = f(*inputs)
        want = torch.autograd.grad(eager, inputs)
        torch.testing.assert_close(loss, eager)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
            assert a.stride() == b.stride()


def test_automatic_choice_explains_itself():
    from routed import explain_backends

    q, k, v = _inputs(1, 2, 2, 32, 32, 16, torch.float32, seed=0)
    route = _mask_route(1, 2, 32, 32, 16, 16, True, 1.0, seed=0)
    reasons = dict(explain_backends(q, k, v, route))
    assert reasons["reference"] is None
    if DEVICE == "cpu":
        assert "interpreter" in reasons["triton"]
    from routed import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="float64 is not supported"):
        routed_attention(q.double(), k.double(), v.double(), route, backend="triton")


@pytest.mark.gpu
def test_bfloat16_on_gpu():
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 128, torch.bfloat16, seed=21)
    check_against_f64(q, k, v, _mask_route(1, 2, 1000, 1000, 64, 64, True, 0.3, seed=21))
    check_against_f64(q, k, v, _mask_route(2, 8, 1000, 1000, 128, 128, False, 0.3, seed=22))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_blocks_causal_on_gpu(dtype):
    """Blocks of 16 and 32, causal, default positions, GQA: wrong on the H200 before the
    explicit-position workaround (benchmarks/results/h200/small_blocks_before_fix.json)."""
    for b in (16, 32):
        q, k, v = _inputs(1, 4, 2, 257, 257, 64, dtype, seed=b)
        check_against_f64(q, k, v, random_block_route(257, block_size=b, blocks=3, heads=2, device=DEVICE))


@pytest.mark.gpu
def test_tma_kernels_on_gpu(monkeypatch):
    """The tensor-descriptor (TMA) kernels, forced, forward and backward, on Hopper."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.fail("the TMA forward needs a Hopper GPU; run this test on one")
    monkeypatch.setenv("ROUTED_TMA", "only")
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 128, torch.bfloat16, seed=23)
    check_against_f64(q, k, v, _mask_route(1, 2, 1000, 1000, 128, 128, True, 0.3, seed=23))
    check_against_f64(q, k, v, _mask_route(2, 8, 1000, 1000, 64, 64, False, 0.3, seed=24))
    check_against_f64(q, k, v, _mask_route(2, 2, 1000, 1000, 64, 128, True, 0.3, seed=25, positions="batched"))


@pytest.mark.gpu
@pytest.mark.parametrize("fused_merge,tma", [(True, "0"), (False, "0"), (False, "only")])
def test_decode_on_gpu(fused_merge, tma, monkeypatch):
    """One query and four against 128 routed key blocks of 128 (bf16, GQA 8/2): the merge by the last
    split to arrive reads what other SMs wrote (atomic counter, .cg loads), repeated to catch races;
    K/V read by plain loads and by tensor descriptors (``ROUTED_TMA=only`` raises where it cannot)."""
    from routed.ops.block_sparse import triton_ops

    if tma == "only" and torch.cuda.get_device_capability()[0] < 9:
        pytest.fail("tensor-descriptor loads need a Hopper GPU; run this test on one")
    monkeypatch.setattr(triton_ops, "DECODE_FUSED_MERGE", fused_merge)
    monkeypatch.setenv("ROUTED_TMA", tma)
    for nq in (1, 4):
        q, k, v = _inputs(2, 8, 2, nq, 32768, 128, torch.bfloat16, seed=40 + nq)
        route = _mask_route(2, 2, nq, 32768, 128, 128, True, 0.5, seed=40 + nq)
        check_against_f64(q, k, v, route)
        first = routed_attention(q, k, v, route, backend="triton")
        for _ in range(20):
            assert torch.equal(routed_attention(q, k, v, route, backend="triton"), first)


@pytest.mark.gpu
@pytest.mark.parametrize("case,deterministic", [("sink", False), ("nsa_compressed", False), ("nsa_compressed", True)])
def test_dkdv_row_shares_on_gpu(case, deterministic, monkeypatch):
    """The dk/dv row shares at GPU scale (bf16, GQA, the GPU's own SM count): a sink row and NSA's
    compressed branch cut into listed shares added by atomics, and NSA's compressed branch split into
    equal shares with partial sums in deterministic mode; NSA's route with its position-exact mask
    splits (the kernels skip the masks of its clean pairs)."""
    from routed.layers.nsa import _compressed_route, num_compressed_blocks
    from routed.ops.block_sparse import triton_ops

    used = []
    real = triton_ops.dkdv_work_split
    monkeypatch.setattr(triton_ops, "dkdv_work_split", lambda *a: used.append(real(*a)) or used[-1])
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    monkeypatch.setattr(triton_ops, "POSITION_SPLITS_AFTER_USES", 1)
    if case == "sink":
        q, k, v = _inputs(1, 8, 2, 4096, 4096, 128, torch.bfloat16, seed=31)
        route = _sink_and_diagonal(4096, 64)
    else:
        nc = num_compressed_blocks(8192, 32, 16)
        q, k, v = _inputs(1, 8, 2, 8192, nc, 64, torch.bfloat16, seed=32)
        route = _compressed_route(8192, nc, 8192, 64, 32, 16, torch.device(DEVICE))
    check_against_f64(q, k, v, route)
    assert {u[0] for u in used} == ({1} if deterministic else {2}), f"dk/dv work split {used}"
    if case == "nsa_compressed":
        assert int(route._cache["clean"].sum()) > 0, "the position-exact mask splits were not used"


def test_packed_varlen_equals_separate_sequences():
    """Three sequences packed into one row (cu_seqlens) with a dense causal route and segment ids:
    each sequence's output equals its own dense causal attention, computed alone."""
    from routed import causal_dense_route, segment_ids_from_cu_seqlens

    lengths = [37, 100, 63]
    cu = torch.tensor([0, 37, 137, 200], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = _inputs(1, 4, 2, total, total, 16, torch.float32, seed=31)
    seg = segment_ids_from_cu_seqlens(cu).to(DEVICE)
    assert seg.tolist() == [0] * 37 + [1] * 100 + [2] * 63
    route = causal_dense_route(total, block_size=32, device=DEVICE).with_segments(seg)
    with poisoned_outputs():
        out = routed_attention(q, k, v, route, backend="triton")
    for start, n in zip(cu[:-1].tolist(), lengths):
        sl = slice(start, start + n)
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl].double(), k[:, :, sl].double().repeat_interleave(2, 1),
            v[:, :, sl].double().repeat_interleave(2, 1), is_causal=True)
        torch.testing.assert_close(out[:, :, sl].double(), alone, rtol=1e-5, atol=1e-5)
    check_against_f64(q, k, v, route)


@pytest.mark.parametrize("nq", [1, 150])
def test_segments_with_sparse_routes(nq):
    """Random routes, per-batch segment ids (padding as its own segment), forward and backward,
    through the main and the decode path."""
    g = torch.Generator().manual_seed(nq)
    q, k, v = _inputs(2, 4, 2, nq, 150, 16, torch.float32, seed=nq)
    route = _mask_route(2, 2, nq, 150, 16, 32, True, 0.7, seed=nq)
    kseg = torch.sort(torch.randint(0, 3, (2, 150), generator=g), dim=-1).values.to(torch.int32).to(DEVICE)
    check_against_f64(q, k, v, route.with_segments(kseg[:, 150 - nq:], kseg))


def test_blocks_of_64_at_small_head_dims_start_with_the_small_tile_configs(monkeypatch):
    """The untuned choice for blocks of 64 at head dims <= 64 is SMALL_BLOCK_FIRST's config (moved to the
    front of the list, which keeps every candidate); other shapes, and a list forced to one config
    (benchmarks/forced_configs.py), keep their order."""
    from routed.ops.block_sparse import triton_ops

    monkeypatch.setenv("ROUTED_AUTOTUNE", "0")
    for name in ("fwd", "dq", "dkdv"):
        quick = triton_ops.QUICK[name]
        first = triton_ops.SMALL_BLOCK_FIRST[name]
        got = triton_ops._candidates([], name, 64, 64)
        assert got[0] == first and sorted(got) == sorted(quick)
        assert triton_ops._candidates([], name, 192, 32)[0] == first  # 64 is 192's largest power-of-two divisor
        assert triton_ops._candidates([], name, 128, 64) == quick
        assert triton_ops._candidates([], name, 64, 128) == quick
        monkeypatch.setitem(triton_ops.QUICK, name, [(128, 64, 8, 3)])
        assert triton_ops._candidates([], name, 64, 64) == [(128, 64, 8, 3)]
