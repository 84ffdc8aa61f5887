"""The reference backend against float64 dense masked attention, forward and backward."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routed import BlockRoute, TokenRoute, routed_attention
from routed.testing import (assert_close_rel, block_route_token_mask, dense_attention_f64,
                            token_route_dense_f64)


def _qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return mk(hq, nq), mk(hkv, nk), mk(hkv, nk)


def _random_block_route(b, h, nq, nk, bq, bk, causal, density=0.4, seed=0, positions=None):
    g = torch.Generator().manual_seed(seed + 1)
    nqb, nkb = math.ceil(nq / bq), math.ceil(nk / bk)
    mask = torch.rand(b, h, nqb, nkb, generator=g) < density
    qp = kp = None
    if positions == "permuted":
        perm = torch.randperm(nk, generator=g)
        kp = perm.to(torch.int32)
        qp = perm[nk - nq:].to(torch.int32) if nq <= nk else None
    return BlockRoute.from_block_mask(mask, q_len=nq, kv_len=nk, q_block_size=bq, kv_block_size=bk,
                                      causal=causal, q_positions=qp, kv_positions=kp)


def _grads(out, inputs, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, do, allow_unused=False), do


def _check_block(q, k, v, route, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = routed_attention(q, k, v, route, backend="reference", return_lse=True, scale=scale)
    ref, ref_lse = dense_attention_f64(q, k, v, block_route_token_mask(route), scale)
    # Baseline: the same masked attention computed by plain PyTorch in q's dtype.
    base, base_lse = dense_attention_f64(q, k, v, block_route_token_mask(route), scale, dtype=q.dtype)
    assert_close_rel(out, ref, base, what="out")
    assert_close_rel(lse, ref_lse, base_lse, what="lse")
    (dq, dk, dv), do = _grads(out, (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), do.double())
    bq_, bk_, bv_ = torch.autograd.grad(base, (q, k, v), do)
    for name, x, r, b in (("dq", dq, rq, bq_), ("dk", dk, rk, bk_), ("dv", dv, rv, bv_)):
        assert_close_rel(x, r, b, what=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 63, 200])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_block_route_matches_dense(causal, group, n, block):
    q, k, v = _qkv(2, group * 1, 1, n, n, 16, seed=n + block)
    route = _random_block_route(2, group, n, n, block, block, causal, seed=group)
    _check_block(q, k, v, route)


@pytest.mark.parametrize("route_heads", ["q", "kv", "shared"])
def test_block_route_head_layouts(route_heads):
    q, k, v = _qkv(2, 6, 2, 70, 90, 8, seed=3)
    h = {"q": 6, "kv": 2, "shared": 1}[route_heads]
    route = _random_block_route(1, h, 70, 90, 16, 32, causal=True, seed=5)
    _check_block(q, k, v, route)


def test_block_route_float64_is_exact():
    q, k, v = _qkv(1, 4, 2, 100, 100, 16, dtype=torch.float64, seed=11)
    route = _random_block_route(1, 4, 100, 100, 32, 16, causal=True, seed=11)
    out, lse = routed_attention(q, k, v, route, return_lse=True)
    ref, ref_lse = dense_attention_f64(q, k, v, block_route_token_mask(route), 0.25)
    assert_close_rel(out, ref, floor=1e-12)
    assert_close_rel(lse, ref_lse, floor=1e-12)


@pytest.mark.parametrize("nq,nk", [(1, 200), (37, 200), (200, 37)])
def test_block_route_cross_lengths(nq, nk):
    """Queries are the last nq positions (KV-cache prefill/decode) when causal."""
    q, k, v = _qkv(1, 3, 3, nq, nk, 16, seed=nq)
    for causal in (False, True):
        _check_block(q, k, v, _random_block_route(1, 3, nq, nk, 16, 32, causal, seed=nk, density=0.6))


@pytest.mark.parametrize("n", [63, 200])
def test_block_route_permuted_positions(n):
    q, k, v = _qkv(2, 4, 2, n, n, 16, seed=n)
    route = _random_block_route(1, 2, n, n, 16, 16, causal=True, density=0.7, positions="permuted")
    # The causal test must use the given positions: it differs from the default order.
    assert not torch.equal(block_route_token_mask(route), block_route_token_mask(
        BlockRoute.from_block_mask(route.to_block_mask(), q_len=n, kv_len=n, q_block_size=16, causal=True)))
    _check_block(q, k, v, route)


@pytest.mark.parametrize("chunk_elements", [1, 4000])
@pytest.mark.parametrize("layout", ["causal", "permuted", "segments", "shared_heads"])
def test_block_route_in_query_block_chunks(chunk_elements, layout, monkeypatch):
    """With a small memory budget the reference runs query blocks in chunks (down to one block),
    each gathering only up to its widest row: same output, lse and gradients as float64."""
    import routed.ops.block_sparse.reference as reference

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk_elements)
    q, k, v = _qkv(2, 4, 2, 150, 170, 16, seed=len(layout))
    route = _random_block_route(2, 1 if layout == "shared_heads" else 2, 150, 170, 16, 32, causal=True,
                                density=0.5, seed=3, positions="permuted" if layout == "permuted" else None)
    if layout == "segments":
        seg = torch.sort(torch.randint(0, 3, (2, 170), generator=torch.Generator().manual_seed(1)), -1).values
        route = route.with_segments(seg[:, 20:], seg)
    calls = []
    attend = reference._attend_query_blocks
    monkeypatch.setattr(reference, "_attend_query_blocks", lambda *a: calls.append(a[3].shape[-1]) or attend(*a))
    _check_block(q, k, v, route)
    assert len(calls) > 1 and max(calls) <= route.max_blocks  # chunked, each no wider than the route


@pytest.mark.parametrize("kind", ["block", "token"])
def test_empty_route_gives_zeros_not_nan(kind):
    q, k, v = _qkv(1, 2, 1, 50, 50, 8)
    if kind == "block":
        route = BlockRoute(torch.full((1, 1, 4, 2), -1, dtype=torch.int32), torch.zeros(1, 1, 4, dtype=torch.int32),
                           50, 50, 16, 16, causal=True)
    else:
        route = TokenRoute(torch.full((1, 1, 3, 5), -1, dtype=torch.int32), 50, causal=True)
    out, lse = routed_attention(q, k, v, route, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert bool((lse == float("-inf")).all())
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for gr in grads:
        assert torch.equal(gr, torch.zeros_like(gr))


def test_partially_empty_block_route():
    """Rows with no blocks give zeros while their neighbours are computed normally."""
    q, k, v = _qkv(1, 2, 2, 64, 64, 8, seed=2)
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, :2] = True
    mask[0, 1, 3, 3] = True
    route = BlockRoute.from_block_mask(mask, q_len=64, kv_len=64, q_block_size=16, causal=False)
    out = routed_attention(q, k, v, route)
    assert torch.equal(out[0, 0, :16], torch.zeros(16, 8))
    assert not bool((out[0, 0, 16:32] == 0).all())
    _check_block(q, k, v, route)


# ---------------------------------------------------------------------------------------------- token


def _random_token_route(b, h, n, groups, size, causal, seed=0, weighted=False, fill=0.8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n, generator=g)[:size] for _ in range(b * h * groups)]).view(b, h, groups, -1)
    ids = ids.to(torch.int32)
    if ids.shape[-1] < size:  # fewer tokens than the group size: pad
        ids = torch.cat([ids, ids.new_full((b, h, groups, size - ids.shape[-1]), -1)], -1)
    drop = torch.rand(ids.shape, generator=g) > fill
    ids = torch.where(drop, torch.full_like(ids, -1), ids)
    w = torch.rand(ids.shape, generator=g, dtype=torch.float32) if weighted else None
    return TokenRoute(ids, n, weights=w, causal=causal)


def _check_token(q, k, v, route):
    scale = q.shape[-1] ** -0.5
    out = routed_attention(q, k, v, route, backend="reference")
    ref = token_route_dense_f64(q, k, v, route, scale)
    # Baseline: the same definition computed by plain PyTorch in q's dtype.
    base = token_route_dense_f64(q, k, v, route, scale, dtype=q.dtype)
    assert_close_rel(out, ref, base, what="out")
    (dq, dk, dv), do = _grads(out, (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), do.double())
    bq_, bk_, bv_ = torch.autograd.grad(base, (q, k, v), do)
    for name, x, r, b in (("dq", dq, rq, bq_), ("dk", dk, rk, bk_), ("dv", dv, rv, bv_)):
        assert_close_rel(x, r, b, what=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 63, 200])
@pytest.mark.parametrize("weighted", [False, True])
def test_token_route_matches_dense(causal, group, n, weighted):
    q, k, v = _qkv(2, group, 1, n, n, 16, seed=n)
    route = _random_token_route(2, group, n, groups=3, size=min(n, 24), causal=causal, seed=group, weighted=weighted)
    _check_token(q, k, v, route)


def test_token_route_shared_heads_and_gqa():
    q, k, v = _qkv(1, 6, 2, 90, 90, 8, seed=4)
    for h in (1, 2, 6):
        _check_token(q, k, v, _random_token_route(1, h, 90, groups=4, size=30, causal=True, seed=h))


# ---------------------------------------------------------------------------------------------- property


@st.composite
def block_problems(draw):
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3, 8]))
    nq = draw(st.integers(1, 130))
    nk = draw(st.integers(1, 130))
    bq = draw(st.sampled_from([16, 32, 64]))
    bk = draw(st.sampled_from([16, 32, 64]))
    causal = draw(st.booleans())
    route_heads = draw(st.sampled_from([1, hkv, hkv * group]))
    density = draw(st.floats(0.0, 1.0))
    permuted = draw(st.booleans()) and causal
    segments = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return hkv, group, nq, nk, bq, bk, causal, route_heads, density, permuted, segments, seed


@settings(max_examples=40, deadline=None)
@given(block_problems())
def test_block_route_property(problem):
    hkv, group, nq, nk, bq, bk, causal, hr, density, permuted, segments, seed = problem
    q, k, v = _qkv(2, hkv * group, hkv, nq, nk, 8, seed=seed)
    route = _random_block_route(2, hr, nq, nk, bq, bk, causal, density=density, seed=seed,
                                positions="permuted" if permuted else None)
    if segments:  # per-batch sorted segment ids, as packed sequences have
        g = torch.Generator().manual_seed(seed)
        kv_seg = torch.sort(torch.randint(0, 3, (2, nk), generator=g), dim=-1).values.to(torch.int32)
        q_seg = kv_seg[:, nk - nq:] if nq <= nk else torch.randint(0, 3, (2, nq), generator=g).to(torch.int32)
        route = route.with_segments(q_seg, kv_seg)
    _check_block(q, k, v, route)
