"""The CPU backend (routed blocks gathered, PyTorch's fused CPU attention kernel) against float64
dense masked attention, forward and both of its backwards (recomputed on the per-token mask path
when no gradient reaches lse, the reference's when one does), on small awkward shapes: both mask
paths (per block with a causal diagonal pass, and per token), GQA route layouts, ragged and cross
lengths, positions, segments, empty routes, chunking, reduced precision."""

import functools

import pytest
import torch

from routed import BlockRoute, TokenRoute, explain_backends, routed_attention
from routed.backends import BackendUnavailable
from routed.ops.block_sparse import cpu_gathered, reference
from routed.testing import assert_close_rel, block_route_token_mask, dense_attention_f64
from routed.testing import random_mask_route as _mask_route
from routed.testing import random_qkv as _inputs

BACKEND = "cpu_gathered"


def _spy(calls, name, real, *args, **kwargs):
    calls.append(name)
    return real(*args, **kwargs)


def check_against_f64(q, k, v, route, *, factor=3.0, path=None, monkeypatch=None):
    """Forward, lse and (dq, dk, dv) vs float64, with tolerances relative to plain PyTorch computing
    the same masked attention in the inputs' dtype; the gradients once through out alone and once
    through out and lse. With ``monkeypatch`` the calls are watched: the forward takes the ``path``
    mask path ("blockwise" or "masked"), the backward without an lse gradient recomputes on the
    per-token path and never runs the reference, the one with an lse gradient runs the reference."""
    calls = []
    if monkeypatch is not None:
        for name in ("_attend_blockwise", "_attend_masked"):
            monkeypatch.setattr(cpu_gathered, name, functools.partial(_spy, calls, name, getattr(cpu_gathered, name)))
        monkeypatch.setattr(reference, "block_sparse_attention_reference",
                            functools.partial(_spy, calls, "reference", reference.block_sparse_attention_reference))
    scale = q.shape[-1] ** -0.5
    mask = block_route_token_mask(route)
    out, lse = routed_attention(q, k, v, route, backend=BACKEND, return_lse=True)
    if path is not None:
        assert set(calls) == {f"_attend_{path}"}, calls
    ref, ref_lse = dense_attention_f64(q, k, v, mask, scale)
    base, base_lse = dense_attention_f64(q, k, v, mask, scale, dtype=q.dtype)
    assert out.dtype == q.dtype and out.shape == ref.shape and lse.shape == ref_lse.shape
    assert_close_rel(out, ref, base, factor=factor, what="out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # -inf exactly where a query sees nothing
    assert_close_rel(lse, ref_lse, base_lse.float(), factor=factor, what="lse")

    g = torch.Generator().manual_seed(1234)
    do = torch.randn(out.shape, generator=g).to(out.dtype)
    dl = torch.randn(lse.shape, generator=g)

    def loss_grads(o, l, with_lse):  # noqa: E741
        loss = (o.to(do.dtype) * do).sum()
        if with_lse:
            loss = loss + (torch.where(torch.isfinite(l), l, 0) * dl.to(l.dtype)).sum()
        return torch.autograd.grad(loss, (q, k, v), retain_graph=True)

    for with_lse in (False, True):
        calls.clear()
        got = loss_grads(out, lse, with_lse)
        if monkeypatch is not None:
            assert set(calls) == ({"reference"} if with_lse else {"_attend_masked"}), calls
        want, plain = loss_grads(ref, ref_lse, with_lse), loss_grads(base, base_lse, with_lse)
        for name, x, r, b in zip(("dq", "dk", "dv"), got, want, plain):
            assert bool(torch.isfinite(x).all()), name
            assert_close_rel(x, r, b, factor=factor, what=f"{name} ({'out and lse' if with_lse else 'out'})")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 63, 200])
def test_blockwise_path_matches_f64(causal, group, n, monkeypatch):
    q, k, v = _inputs(2, group, 1, n, n, 32, torch.float32, seed=n * group)
    route = _mask_route(2, 1, n, n, 32, 32, causal, density=0.5, seed=n)
    check_against_f64(q, k, v, route, path="blockwise", monkeypatch=monkeypatch)


@pytest.mark.parametrize("route_heads", [1, 2, 6])
def test_route_head_layouts_and_batch_broadcast(route_heads, monkeypatch):
    q, k, v = _inputs(2, 6, 2, 96, 96, 16, torch.float32, seed=route_heads)
    check_against_f64(q, k, v, _mask_route(1, route_heads, 96, 96, 16, 16, True, 0.5, seed=route_heads),
                      path="blockwise", monkeypatch=monkeypatch)
    check_against_f64(q, k, v, _mask_route(2, route_heads, 96, 96, 16, 16, False, 0.5, seed=route_heads + 1))


@pytest.mark.parametrize("bq,bk,nq,nk,causal", [(16, 32, 150, 170, True), (32, 16, 150, 170, True),
                                                (4, 4, 70, 75, True), (12, 9, 70, 75, False),
                                                (16, 16, 1, 130, True), (16, 16, 17, 130, True),
                                                (16, 16, 130, 40, True), (16, 16, 130, 40, False)])
def test_block_sizes_ragged_and_cross_lengths(bq, bk, nq, nk, causal):
    """Unequal blocks and q_len != kv_len (decode and chunked prefill: the causal mask bottom-right
    aligned) take the per-token mask, non-causal ones the per-block mask."""
    q, k, v = _inputs(1, 4, 2, nq, nk, 16, torch.float32, seed=bq * 7 + bk + nq)
    check_against_f64(q, k, v, _mask_route(1, 2, nq, nk, bq, bk, causal, 0.6, seed=bq + nk))


def test_positions_and_segments_take_the_per_token_mask(monkeypatch):
    q, k, v = _inputs(2, 4, 2, 100, 100, 16, torch.float32, seed=3)
    check_against_f64(q, k, v, _mask_route(2, 2, 100, 100, 16, 16, True, 0.7, seed=3, positions="batched"),
                      path="masked", monkeypatch=monkeypatch)
    g = torch.Generator().manual_seed(4)
    seg = torch.sort(torch.randint(0, 3, (2, 100), generator=g), dim=-1).values.to(torch.int32)
    check_against_f64(q, k, v, _mask_route(2, 2, 100, 100, 16, 16, True, 0.7, seed=4).with_segments(seg))


def test_empty_and_partially_empty_routes():
    """Queries that see nothing: zeros, lse -inf and zero gradients, on both mask paths."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, torch.float32, seed=5)
    for causal in (True, False):
        empty = BlockRoute(torch.full((1, 2, 4, 3), -1, dtype=torch.int32), torch.zeros(1, 2, 4, dtype=torch.int32),
                           64, 64, 16, 16, causal=causal)
        for route in (empty, empty.with_segments(torch.zeros(1, 64, dtype=torch.int32))):
            out, lse = routed_attention(q, k, v, route, backend=BACKEND, return_lse=True)
            assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
            for gr in torch.autograd.grad(out.sum(), (q, k, v)):
                assert torch.equal(gr, torch.zeros_like(gr))
    # rows with and without blocks side by side, and a route of width 0
    check_against_f64(q, k, v, _mask_route(1, 2, 64, 64, 16, 16, True, 0.2, seed=5))
    zero_width = BlockRoute(torch.zeros(1, 1, 4, 0, dtype=torch.int32), torch.zeros(1, 1, 4, dtype=torch.int32),
                            64, 64, 16, 16, causal=True)
    out, lse = routed_attention(q, k, v, zero_width, backend=BACKEND, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


def test_chunks_of_query_blocks_equal_one_pass(monkeypatch):
    """A chunk budget of a few blocks (and each chunk trimmed to its widest row) changes nothing."""
    q, k, v = _inputs(2, 4, 2, 200, 200, 16, torch.float32, seed=7)
    for route in (_mask_route(2, 2, 200, 200, 16, 16, True, 0.5, seed=7),
                  _mask_route(2, 2, 200, 200, 16, 16, True, 0.5, seed=7, positions="batched")):
        whole = routed_attention(q, k, v, route, backend=BACKEND, return_lse=True)
        monkeypatch.setattr(cpu_gathered, "CHUNK_ELEMENTS", 2 * 2 * 16 * 16 * 13)  # 3 query blocks a chunk
        chunked = routed_attention(q, k, v, route, backend=BACKEND, return_lse=True)
        monkeypatch.undo()
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for with_lse in (False, True):  # both backwards, recomputed in chunks
            def grads():
                o, l = routed_attention(q, k, v, route, backend=BACKEND, return_lse=True)  # noqa: E741
                return torch.autograd.grad(o.sum() + with_lse * torch.where(torch.isfinite(l), l, 0).sum(), (q, k, v))
            whole = grads()
            monkeypatch.setattr(cpu_gathered, "CHUNK_ELEMENTS", 2 * 2 * 16 * 16 * 13)
            chunked = grads()
            monkeypatch.undo()
            for a, b in zip(whole, chunked):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_strided_inputs_and_in_place_edits():
    """Inputs in the LM's layout (transposed projections), and outputs a caller may edit in place."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 70, h, 16, generator=g).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
    route = _mask_route(2, 2, 70, 70, 16, 16, True, 0.5, seed=13)
    check_against_f64(q, k, v, route)
    out = routed_attention(q, k, v, route, backend=BACKEND)
    want = routed_attention(q, k, v, route, backend="reference")
    out.mul_(2)  # not a view: editing it in place is allowed, and the gradient follows
    dq, = torch.autograd.grad(out.sum(), q, retain_graph=True)
    torch.testing.assert_close(dq, torch.autograd.grad(2 * want.sum(), q)[0], rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_reduced_and_double_precision(dtype):
    q, k, v = _inputs(1, 4, 2, 100, 100, 32, dtype, seed=12)
    check_against_f64(q, k, v, _mask_route(1, 2, 100, 100, 16, 16, True, 0.5, seed=12))


def test_token_routes_through_the_block_diagonal_route():
    """A TokenRoute (clusters of gathered tokens) runs on this backend as on the reference."""
    g = torch.Generator().manual_seed(8)
    q, k, v = _inputs(1, 4, 2, 90, 90, 16, torch.float32, seed=8)
    ids = torch.stack([torch.randperm(90, generator=g)[:80].view(5, 16) for _ in range(2)])[None].to(torch.int32)
    route = TokenRoute(ids, seq_len=90, causal=True)
    got = routed_attention(q, k, v, route, backend=BACKEND, return_lse=True)
    want = routed_attention(q, k, v, route, backend="reference", return_lse=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got[0].sum(), (q, k, v)), torch.autograd.grad(want[0].sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_automatic_choice_on_the_cpu_and_what_it_cannot_run():
    """On the CPU automatic choice takes this backend without gradients and keeps the reference under
    autograd (named, it runs there too); a value head dim of its own is refused by name and passed over
    automatically, for the reference."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, torch.float32, seed=9)
    route = _mask_route(1, 2, 64, 64, 16, 16, True, 0.5, seed=9)
    detached = (q.detach(), k.detach(), v.detach())
    assert [name for name, why in explain_backends(*detached, route) if why is None][0] == BACKEND
    assert "under autograd" in dict(explain_backends(q, k, v, route))[BACKEND]
    with torch.no_grad():
        assert [name for name, why in explain_backends(q, k, v, route) if why is None][0] == BACKEND
    _, _, v24 = _inputs(1, 2, 2, 64, 64, 16, torch.float32, seed=9, dv=24)
    assert "one head dim" in dict(explain_backends(*detached[:2], v24.detach(), route))[BACKEND]
    with pytest.raises(BackendUnavailable, match="one head dim"):
        routed_attention(q, k, v24, route, backend=BACKEND)
    out = routed_attention(q, k, v24, route)  # automatic choice: the reference
    torch.testing.assert_close(out, routed_attention(q, k, v24, route, backend="reference"))
