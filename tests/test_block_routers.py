"""MoBA and NSA selection routers: their kernels against their references, their routes against
definitions written out with loops, and the errors bad options raise."""

import math

import pytest
import torch

from routed import BlockRoute
from routed.backends import BackendUnavailable
from routed.route import RouteError
from routed.routers.blocks import (MoBARouter, NSASelectionRouter, block_topk_route, check_block_options,
                                   compressed_positions, spread_to_selection_blocks)


def _topk_definition(scores, top_k, q_len, kv_len, qbs, kbs, sinks, local):
    """Loop form: forced = sinks + local window + every block the query block overlaps; then the
    best-scoring visible others (ties to the lower id) until top_k; [B, H, nqb, nkb] bool."""
    B, H, nqb, nkb = scores.shape
    own = (qbs + kbs - 2) // kbs + 1
    width = min(max(top_k, sinks + max(local, own)), nkb)
    mask = torch.zeros(B, H, nqb, nkb, dtype=torch.bool)
    off = kv_len - q_len
    for i in range(nqb):
        first = (i * qbs + off) // kbs
        diag = (min((i + 1) * qbs, q_len) - 1 + off) // kbs
        visible = list(range(diag + 1))
        forced = [j for j in visible if j < sinks or j >= min(first, diag - local + 1)]
        for b in range(B):
            for h in range(H):
                rest = sorted((j for j in visible if j not in forced), key=lambda j: (-float(scores[b, h, i, j]), j))
                keep = forced + rest[: max(0, width - len(forced))]
                mask[b, h, i, keep] = True
    return mask


@pytest.mark.parametrize("q_len,kv_len,qbs,kbs,top_k,sinks,local", [
    (100, 100, 16, 16, 3, 1, 1), (37, 100, 16, 16, 4, 0, 2), (1, 90, 16, 16, 3, 1, 1),
    (64, 64, 1, 16, 2, 0, 1), (50, 80, 32, 16, 2, 1, 1)])
def test_block_topk_route_matches_definition(q_len, kv_len, qbs, kbs, top_k, sinks, local):
    g = torch.Generator().manual_seed(0)
    nqb, nkb = math.ceil(q_len / qbs), math.ceil(kv_len / kbs)
    scores = torch.rand(2, 3, nqb, nkb, generator=g)
    scores[0, 0, :, 1] = scores[0, 0, :, 2]  # a tie: the lower id wins
    route = block_topk_route(scores, top_k=top_k, q_len=q_len, kv_len=kv_len, q_block_size=qbs, kv_block_size=kbs,
                             sink_blocks=sinks, local_blocks=local)
    BlockRoute(route.kv_block_ids, route.kv_block_counts, q_len, kv_len, qbs, kbs, causal=True)  # validates
    assert torch.equal(route.to_block_mask(), _topk_definition(scores, top_k, q_len, kv_len, qbs, kbs, sinks, local))


@pytest.mark.parametrize("q_len,kv_len,qbs,kbs,top_k,sinks,local", [
    (100, 100, 16, 16, 3, 1, 1), (37, 100, 16, 16, 4, 0, 2), (1, 90, 16, 16, 3, 1, 1),
    (64, 64, 1, 16, 2, 0, 1), (50, 80, 32, 16, 2, 1, 1), (300, 300, 16, 16, 40, 2, 3), (20, 20, 16, 16, 9, 0, 1)])
def test_block_topk_kernel_matches_definition(q_len, kv_len, qbs, kbs, top_k, sinks, local):
    """The fused top-k route kernel (interpreter) against the loop definition, outputs poisoned;
    ties, visible blocks scoring -inf (never kept) and a top-k wider than the visible blocks."""
    from routed.testing import poisoned_outputs

    g = torch.Generator().manual_seed(3)
    nqb, nkb = math.ceil(q_len / qbs), math.ceil(kv_len / kbs)
    scores = torch.randint(0, 6, (2, 3, nqb, nkb), generator=g).float() / 4  # many ties
    scores[1, 2, :, ::3] = float("-inf")
    with poisoned_outputs():
        route = block_topk_route(scores, top_k=top_k, q_len=q_len, kv_len=kv_len, q_block_size=qbs,
                                 kv_block_size=kbs, sink_blocks=sinks, local_blocks=local, backend="triton")
    BlockRoute(route.kv_block_ids, route.kv_block_counts, q_len, kv_len, qbs, kbs, causal=True)  # validates
    forced = torch.zeros(nqb, nkb, dtype=torch.bool)  # kept whatever they score
    for i in range(nqb):
        first, diag = (i * qbs + kv_len - q_len) // kbs, (min((i + 1) * qbs, q_len) - 1 + kv_len - q_len) // kbs
        forced[i, :diag + 1] = (torch.arange(diag + 1) < sinks) | (torch.arange(diag + 1) >= min(first, diag - local + 1))
    expect = _topk_definition(scores, top_k, q_len, kv_len, qbs, kbs, sinks, local)
    expect &= (scores > float("-inf")) | forced  # the definition fills with -inf blocks; routes never keep them
    assert torch.equal(route.to_block_mask(), expect)
    ref = block_topk_route(scores, top_k=top_k, q_len=q_len, kv_len=kv_len, q_block_size=qbs, kv_block_size=kbs,
                           sink_blocks=sinks, local_blocks=local, backend="reference")
    assert torch.equal(route.kv_block_ids, ref.kv_block_ids) and torch.equal(route.kv_block_counts,
                                                                             ref.kv_block_counts)


@pytest.mark.parametrize("reduce,renormalize", [("max", True), ("mean", True), ("max", False), ("mean", False)])
def test_block_topk_kernel_group_reduction(reduce, renormalize):
    """The kernel's front end (MoBA: renormalise over earlier blocks, reduce the GQA group) equals the
    PyTorch path; dyadic scores keep both sums exact, so the routes must be identical."""
    from routed.routers.blocks import _topk_route

    g = torch.Generator().manual_seed(4)
    q_len = kv_len = 200
    scores = torch.randint(1, 9, (2, 6, 7, 7), generator=g).float() / 8
    routes = [_topk_route(scores, 3, q_len, kv_len, 32, 32, 1, 1, backend, group=3, reduce=reduce,
                          renormalize=renormalize) for backend in ("triton", "reference")]
    assert routes[0].kv_block_ids.shape[1] == 2
    assert torch.equal(routes[0].kv_block_ids, routes[1].kv_block_ids)
    assert torch.equal(routes[0].kv_block_counts, routes[1].kv_block_counts)


def test_moba_router_triton_launches_few_ops():
    """On the Triton path the MoBA router is four kernels (block means of q and k, scores, top-k) and a
    few allocations: on a GPU each PyTorch op costs a launch, and ~80 of them bounded the router's time
    (H200, 32k tokens: 1.65 ms for 0.4 ms of routed attention)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any("interpreter" in f.filename for f in traceback.extract_stack()):  # the interpreter's own
                CountOps.n += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    router = MoBARouter(32, 3, backend="triton")
    router(q, k)  # first call: cached geometry
    with CountOps():
        router(q, k)
    assert CountOps.n <= 10, f"the Triton MoBA router ran {CountOps.n} PyTorch ops (7 when written; 70 before)"


def test_block_topk_kernel_takes_rows_wider_than_256_blocks():
    """Score rows of more than 256 key blocks (32k tokens at blocks of 64 have 512) go through the
    kernel, equal to the PyTorch builder."""
    g = torch.Generator().manual_seed(6)
    q_len = kv_len = 600 * 4
    scores = torch.rand(1, 2, 600, 600, generator=g)
    routes = [block_topk_route(scores, top_k=5, q_len=q_len, kv_len=kv_len, q_block_size=4, kv_block_size=4,
                               sink_blocks=1, local_blocks=2, backend=be) for be in ("triton", "reference")]
    assert torch.equal(routes[0].kv_block_ids, routes[1].kv_block_ids)
    assert torch.equal(routes[0].kv_block_counts, routes[1].kv_block_counts)


def test_block_topk_backend_errors():
    s = torch.rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="backend"):
        block_topk_route(s, top_k=1, q_len=32, kv_len=32, q_block_size=16, kv_block_size=16, backend="cuda")
    with pytest.raises(BackendUnavailable, match="dtype"):
        block_topk_route(s.to(torch.int32), top_k=1, q_len=32, kv_len=32, q_block_size=16, kv_block_size=16,
                         backend="triton")


def _moba_scores_f64(q, k, qbs, kbs):
    """Per query head: the mean over a query block's queries of ``q . mean(k block)``, float64."""
    B, hq, nq, d = q.shape
    k = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    nkb = math.ceil(k.shape[2] / kbs)
    kmean = torch.stack([k[:, :, j * kbs:(j + 1) * kbs].mean(2) for j in range(nkb)], 2)
    tok = q.double() @ kmean.transpose(-1, -2)  # [B, hq, nq, nkb]
    return torch.stack([tok[:, :, i * qbs:(i + 1) * qbs].mean(2) for i in range(math.ceil(nq / qbs))], 2)


@pytest.mark.parametrize("nq,nk,hq,hkv,qbs", [(96, 96, 4, 4, 32), (40, 130, 4, 2, 32), (64, 64, 2, 1, 1),
                                              (1, 77, 4, 2, 32)])
def test_moba_router_ranks_like_the_definition(nq, nk, hq, hkv, qbs):
    """Per query head (heads="query") the route keeps the top-k of MoBA's own scores."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, hq, nq, 16, generator=g), torch.randn(1, hkv, nk, 16, generator=g)
    router = MoBARouter(32, 3, q_block_size=qbs, heads="query", backend="reference")
    route = router(q, k)
    assert route.kv_block_ids.shape[1] == hq and route.causal
    ref = _moba_scores_f64(q, k, qbs, 32)
    expect = _topk_definition(ref, 3, nq, nk, qbs, 32, 0, 1)
    assert torch.equal(route.to_block_mask(), expect)


@pytest.mark.parametrize("heads,reduce", [("query", "max"), ("kv", "max"), ("kv", "mean")])
@pytest.mark.parametrize("nq,nk", [(200, 200), (70, 200), (1, 150)])
def test_moba_router_triton_equals_reference(nq, nk, heads, reduce):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 6, nq, 32, generator=g), torch.randn(2, 2, nk, 32, generator=g)
    tri = MoBARouter(32, 3, heads=heads, head_reduce=reduce, backend="triton")
    ref = MoBARouter(32, 3, heads=heads, head_reduce=reduce, backend="reference")
    s_tri, s_ref = tri.scores(q, k), ref.scores(q, k)
    torch.testing.assert_close(s_tri, s_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(tri(q, k).to_block_mask(), ref(q, k).to_block_mask())


def test_moba_scores_ignore_keys_at_or_after_the_query_block():
    """Changing the keys of a query block's own blocks (and later ones) changes no score of it."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 128, 16, generator=g), torch.randn(1, 2, 128, 16, generator=g)
    router = MoBARouter(32, 2, backend="reference")
    k2 = k.clone()
    k2[:, :, 64:] = torch.randn(1, 2, 64, 16, generator=g)
    assert torch.equal(router.scores(q, k)[:, :, :3], router.scores(q, k2)[:, :, :3])


def _nsa_scores_f64(q, k_cmp, kv_len, lb, stride, sel, qbs):
    """Loop form of NSA's selection scores: per query, the compressed softmax over the blocks
    that ended, each block's probability spread over the selection blocks by token overlap,
    summed over the group's heads; averaged over the query block."""
    B, hq, nq, d = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    nsb = math.ceil(kv_len / sel)
    kc = k_cmp.double().repeat_interleave(hq // hkv, dim=1)
    out = torch.zeros(B, hkv, math.ceil(nq / qbs), nsb, dtype=torch.float64)
    for t in range(nq):
        pos = t + kv_len - nq
        vis = [i for i in range(nc) if i * stride + lb - 1 <= pos]
        if not vis:
            continue
        p = torch.softmax(q[:, :, t].double()[:, :, None, :].mul(d ** -0.5).mul(kc[:, :, vis]).sum(-1), -1)
        p = p.view(B, hkv, hq // hkv, len(vis)).sum(2)
        for col, i in enumerate(vis):
            for tok in range(i * stride, i * stride + lb):
                out[:, :, t // qbs, tok // sel] += p[:, :, col] / lb
    cnt = torch.tensor([min(qbs, nq - i * qbs) for i in range(out.shape[2])], dtype=torch.float64)
    return out / cnt[:, None]


@pytest.mark.parametrize("nq,nk,qbs,chunk,backend", [(80, 80, 16, 4096, "reference"), (20, 90, 16, 16, "reference"),
                                                     (48, 48, 1, 16, "reference"), (80, 80, 16, 0, "triton"),
                                                     (20, 90, 16, 0, "triton"), (48, 48, 1, 0, "triton")])
def test_nsa_selection_scores_match_definition(nq, nk, qbs, chunk, backend):
    g = torch.Generator().manual_seed(3)
    lb, stride, sel = 8, 4, 16
    nc = compressed_positions(nk, lb, stride).numel()
    q, kc = torch.randn(1, 4, nq, 16, generator=g), torch.randn(1, 2, nc, 16, generator=g)
    # top 4 with 1 sink and 2 local blocks: one block per row is chosen by score
    router = NSASelectionRouter(sel, 4, compress_block=lb, compress_stride=stride, q_block_size=qbs,
                                chunk=chunk or 4096, backend=backend)
    ref = _nsa_scores_f64(q, kc, nk, lb, stride, sel, qbs)
    torch.testing.assert_close(router.scores(q, kc, None, nk), ref.float(), rtol=1e-4, atol=1e-6)
    route = router(q, kc, None, nk)
    assert route.kv_block_ids.shape[1] == 2  # shared by the query heads of a KV group
    assert torch.equal(route.to_block_mask(), _topk_definition(ref, 4, nq, nk, qbs, sel, 1, 2))


def _nsa_mass_case(batch, hq, hkv, nq, nk, qbs, seed):
    """Random queries and compressed keys (head dim 32, compressed blocks of 16 at stride 8, scale
    0.2), their compressed-branch lse and the chunked PyTorch mass: ``(q, k_cmp, lse, ref, lb, st)``."""
    from routed.routers.blocks import _nsa_lse_torch, _nsa_mass_torch

    g = torch.Generator().manual_seed(seed)
    lb, st = 16, 8
    nc = compressed_positions(nk, lb, st).numel()
    q, kc = torch.randn(batch, hq, nq, 32, generator=g), torch.randn(batch, hkv, nc, 32, generator=g)
    lse = _nsa_lse_torch(q, kc, nk, lb, st, 0.2, 4096)
    return q, kc, lse, _nsa_mass_torch(q, kc, lse, nk, qbs, lb, st, 0.2, 32), lb, st


@pytest.mark.parametrize("hq,hkv,nq,nk,qbs", [(3, 1, 70, 70, 24), (4, 4, 33, 100, 16), (8, 2, 1, 77, 64)])
def test_nsa_mass_kernel_equals_pytorch(hq, hkv, nq, nk, qbs):
    """The fused kernel against the chunked PyTorch twin: GQA groups of 1, 3 (padded) and 4, query
    blocks that are not powers of two, a decode step, queries that see no compressed block."""
    from routed.ops.block_topk.triton_kernels import nsa_compressed_mass_triton
    from routed.testing import poisoned_outputs

    q, kc, lse, ref, lb, st = _nsa_mass_case(2, hq, hkv, nq, nk, qbs, seed=4)
    with poisoned_outputs():
        out = nsa_compressed_mass_triton(q, kc, lse, nk, qbs, lb, st, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv,nq,nk,qbs", [(8, 2, 200, 200, 64), (3, 1, 70, 90, 24), (16, 2, 130, 130, 32),
                                              (4, 2, 1100, 1100, 64), (2, 1, 300, 1250, 48)])
def test_nsa_mass_kernel_every_launch_config(hq, hkv, nq, nk, qbs):
    """Every config the GPU autotuner may pick (taller query tiles, wider key tiles) equals the
    PyTorch twin: query tiles that cover a whole block, several tiles per block, and blocks that
    are not powers of two; output poisoned before each launch. The two long cases have key tiles
    that every query of a block sees whole (the unmasked loop) before the tiles on the causal edge,
    the second with queries after a cache (``nk > nq``)."""
    from routed.ops.block_topk.triton_kernels import nsa_mass_configs, nsa_mass_launch_with

    q, kc, lse, ref, lb, st = _nsa_mass_case(1, hq, hkv, nq, nk, qbs, seed=5)
    configs = nsa_mass_configs(hq // hkv, qbs)
    assert len(configs) >= 3, configs  # the tuned alternatives exist for these shapes
    for cfg in configs:
        out = torch.full_like(ref, float("nan"))
        nsa_mass_launch_with(cfg, q, kc, lse.float(), out, nk, qbs, lb, st, 0.2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{cfg}: {m}")


def _overlap_matrix_f64(nc, lb, stride, sel, nsb):
    """Dense form of the spread (what the router computed before): ``[nc, nsb]`` float64, entry
    ``(i, j)`` the share of compressed block ``i``'s tokens that lie in selection block ``j``."""
    start = torch.arange(nc, dtype=torch.float64)[:, None] * stride
    lo = torch.arange(nsb, dtype=torch.float64)[None, :] * sel
    return (torch.minimum(start + lb, lo + sel) - torch.maximum(start, lo)).clamp_min(0) / lb


# (kv_len, compress_block, stride, selection block): lb == stride and lb > stride; the selection
# block smaller than, equal to and a multiple of lb; lengths off every block multiple; one
# compressed block; then sizes the router refuses (stride not dividing) that the spread still
# handles exactly (gcd chunks), and blocks shorter than their stride (gaps).
_SPREAD_CASES = [(100, 8, 4, 16), (97, 16, 16, 16), (64, 16, 16, 64), (131, 32, 16, 16), (131, 32, 16, 64),
                 (200, 32, 8, 32), (257, 24, 8, 48), (32, 32, 16, 64), (45, 16, 16, 48), (1000, 64, 16, 128),
                 (17, 4, 1, 8), (91, 12, 8, 20), (77, 5, 3, 7), (60, 4, 6, 10)]


@pytest.mark.parametrize("kv_len,lb,stride,sel", _SPREAD_CASES)
def test_spread_equals_overlap_matrix(kv_len, lb, stride, sel):
    g = torch.Generator().manual_seed(kv_len + lb)
    nc, nsb = compressed_positions(kv_len, lb, stride).numel(), math.ceil(kv_len / sel)
    w = _overlap_matrix_f64(nc, lb, stride, sel, nsb)
    for lead in ((2, 3, 5), (1, 1, 1)):  # prefill-like rows and one decode row
        mass = torch.rand(*lead, nc, generator=g)
        out = spread_to_selection_blocks(mass, lb, stride, sel, nsb)
        assert out.shape == (*lead, nsb) and out.dtype == torch.float32
        # float32 against float64: sums of non-negative terms, a few ulps apart
        torch.testing.assert_close(out, (mass.double() @ w).float(), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(spread_to_selection_blocks(mass.double(), lb, stride, sel, nsb), mass.double() @ w,
                                   rtol=1e-12, atol=1e-14)


# (q_len, kv_len, q block, selection block, compress_block, stride): one to four compressed blocks
# per stride chunk (compress_block / stride = 1, 2, 4), one to four chunks per selection block,
# lengths off every block multiple, queries after a cache, per-query routing, a decode step, no mass.
_SPREAD_TOPK_CASES = [(100, 100, 16, 16, 16, 16), (130, 130, 32, 64, 32, 16), (70, 200, 16, 32, 64, 16),
                      (48, 48, 1, 16, 8, 4), (1, 333, 16, 64, 32, 16), (90, 90, 24, 16, 16, 8),
                      (20, 20, 16, 16, 32, 16)]  # the last: no compressed block has ended yet


@pytest.mark.parametrize("q_len,kv_len,qbs,sel,lb,stride", _SPREAD_TOPK_CASES)
def test_block_topk_kernel_spreads_compressed_mass(q_len, kv_len, qbs, sel, lb, stride):
    """The top-k kernel reading NSA's per-compressed-block mass and spreading it as it loads (interpreter,
    outputs poisoned) picks the routes the PyTorch spread followed by the PyTorch top-k picks."""
    from routed.routers.blocks import _topk_route
    from routed.testing import poisoned_outputs

    g = torch.Generator().manual_seed(q_len + kv_len + lb)
    nc, nsb = compressed_positions(kv_len, lb, stride).numel(), math.ceil(kv_len / sel)
    mass = torch.rand(2, 3, math.ceil(q_len / qbs), nc, generator=g)
    geo = (4, q_len, kv_len, qbs, sel, 1, 2)
    with poisoned_outputs():
        route = _topk_route(mass, *geo, "triton", spread=(lb, stride))
    spread = spread_to_selection_blocks(mass, lb, stride, sel, nsb)
    ref = _topk_route(spread, *geo, "reference")
    assert torch.equal(route.kv_block_ids, ref.kv_block_ids) and torch.equal(route.kv_block_counts,
                                                                             ref.kv_block_counts)
    assert torch.equal(_topk_route(mass, *geo, "reference", spread=(lb, stride)).kv_block_ids, ref.kv_block_ids)


def test_block_topk_kernel_rejects_a_spread_the_stride_does_not_divide():
    from routed.ops.block_topk.triton_kernels import block_topk_triton

    with pytest.raises(ValueError, match="the stride must divide"):
        block_topk_triton(torch.rand(1, 1, 2, 5), width=2, q_len=32, kv_len=32, q_block_size=16, kv_block_size=16,
                          sink_blocks=0, local_blocks=1, spread=(12, 8))


def test_spread_rejects_blocks_past_the_selection_blocks():
    with pytest.raises(RouteError, match="reach past the 1 selection blocks"):
        spread_to_selection_blocks(torch.rand(3), 8, 4, 8, 1)


@pytest.mark.parametrize("nq,nk,lb,stride,sel,qbs", [
    (1, 1000, 32, 16, 64, 64), (1, 517, 16, 16, 16, 1), (3, 700, 16, 8, 32, 1), (150, 150, 32, 16, 64, 64),
    (90, 333, 8, 8, 32, 16), (120, 120, 16, 8, 16, 24), (64, 200, 32, 32, 128, 32)])
def test_nsa_routes_unchanged_by_linear_spread(nq, nk, lb, stride, sel, qbs):
    """The router's scores and routes against the dense overlap-matrix product it replaced."""
    from routed.routers.blocks import _nsa_lse_torch, _nsa_mass_torch

    g = torch.Generator().manual_seed(nq * 7 + nk)
    nc, nsb = compressed_positions(nk, lb, stride).numel(), math.ceil(nk / sel)
    q, kc = torch.randn(2, 4, nq, 16, generator=g), torch.randn(2, 2, nc, 16, generator=g)
    router = NSASelectionRouter(sel, 3, compress_block=lb, compress_stride=stride, q_block_size=qbs,
                                backend="reference")
    lse = _nsa_lse_torch(q, kc, nk, lb, stride, 0.25, 4096)
    mass = _nsa_mass_torch(q, kc, lse, nk, qbs, lb, stride, 0.25, 4096)
    cnt = torch.tensor([min(qbs, nq - i * qbs) for i in range(math.ceil(nq / qbs))], dtype=torch.float32)
    dense = (mass @ _overlap_matrix_f64(nc, lb, stride, sel, nsb).float()) / cnt[:, None]
    torch.testing.assert_close(router.scores(q, kc, lse, nk, scale=0.25), dense, rtol=1e-5, atol=1e-7)
    expect = block_topk_route(dense, top_k=3, q_len=nq, kv_len=nk, q_block_size=qbs, kv_block_size=sel,
                              sink_blocks=1, local_blocks=2)
    assert torch.equal(router(q, kc, lse, nk, scale=0.25).to_block_mask(), expect.to_block_mask())


def _largest_tensor_in_scores(router, kv_len, nq=1):
    """Most elements any op output holds while ``router.scores`` runs one decode-like call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.most = max(Largest.most, t.numel())
            return out

    nc = compressed_positions(kv_len, router.compress_block, router.compress_stride).numel()
    q, kc = torch.randn(1, 2, nq, 8), torch.randn(1, 1, nc, 8)
    with Largest():
        router.scores(q, kc, None, kv_len)
    return Largest.most, nc


def test_nsa_scores_work_is_linear_in_the_cache():
    """A decode step's scores allocate nothing of size Nc x num_sel_blocks: the largest tensor grows
    like the cache (the dense overlap matrix grew with its square)."""
    router = NSASelectionRouter(64, 4, compress_block=32, compress_stride=16, backend="reference")
    small, _ = _largest_tensor_in_scores(router, 4096)
    big, nc = _largest_tensor_in_scores(router, 8192)
    assert big < nc * math.ceil(8192 / 64) // 8, (big, nc)
    assert big <= 2.2 * small, (small, big)


def test_compressed_positions():
    assert compressed_positions(7, 8, 4).tolist() == []
    assert compressed_positions(16, 8, 4).tolist() == [7, 11, 15]


def test_bad_options_raise_clear_errors():
    with pytest.raises(RouteError, match="compress_stride=6 must divide"):
        NSASelectionRouter(64, 4, compress_block=32, compress_stride=6)
    with pytest.raises(RouteError, match="must divide both"):
        NSASelectionRouter(40, 4, compress_block=32, compress_stride=16)
    with pytest.raises(RouteError, match="top_k=9 exceeds the 8 key blocks"):
        check_block_options(block_size=64, top_k=9, sink_blocks=0, local_blocks=1, max_len=512)
    with pytest.raises(RouteError, match="local_blocks must be an int >= 1"):
        MoBARouter(64, 4, local_blocks=0)
    with pytest.raises(RouteError, match="heads must be"):
        MoBARouter(64, 4, heads="both")
    with pytest.raises(BackendUnavailable, match="q_block_size=1"):
        MoBARouter(16, 2, q_block_size=1, heads="query", backend="triton")(torch.randn(1, 2, 64, 8),
                                                                            torch.randn(1, 1, 64, 8))
    with pytest.raises(ValueError, match="backend must be 'triton', 'reference' or None"):
        NSASelectionRouter(64, 4, backend="flex")
    with pytest.raises(RouteError, match="k_cmp has 3 compressed keys"):
        NSASelectionRouter(16, 2, compress_block=8, compress_stride=4)(torch.randn(1, 2, 8, 8),
                                                                         torch.randn(1, 2, 3, 8), None, 32)
