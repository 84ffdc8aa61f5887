"""Expert dispatch (sorted, grouped GEMM) against the float64 per-expert loop, forward and backward,
on awkward shapes; ExpertRoute validation; backend choice."""

import pytest
import torch

from routed.backends import BackendUnavailable
from routed.ops.expert_dispatch import expert_mlp, expert_mlp_reference, explain_dispatch_backends
from routed.route import ExpertRoute, RouteError
from routed.routers.experts import apply_capacity
from routed.testing import assert_close_rel, poisoned_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ids(T, E, k, g, empty_expert=None, empty_frac=0.0):
    """``[T, k]`` distinct experts per token; ``empty_expert`` never chosen; some slots -1."""
    pool = [e for e in range(E) if e != empty_expert]
    ids = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    if empty_frac:
        ids = torch.where(torch.rand(ids.shape, generator=g) < empty_frac, torch.full_like(ids, -1), ids)
    return ids.to(torch.int32)


def _setup(T, H, I, E, k, seed, dtype=torch.float32, empty_expert=None, empty_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = _ids(T, E, k, g, empty_expert, empty_frac)
    w = torch.rand(T, k, generator=g) * (ids >= 0)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, w, w13, w2)]
    return leaves, ids.to(DEVICE)


def _check(leaves, ids, E, backend, route=None, fused=None):
    x, w, w13, w2 = leaves
    route = route or ExpertRoute.from_expert_ids(ids, w, E)
    with poisoned_outputs():
        out = expert_mlp(x, route, w13, w2, backend=backend, fused=fused)
    f64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = expert_mlp_reference(f64[0], route.expert_ids, f64[1], f64[2], f64[3])
    base = expert_mlp_reference(x, route.expert_ids, w, w13, w2)  # plain PyTorch in the inputs' dtype
    assert_close_rel(out, ref, base, what="out")
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device, out.dtype)
    with poisoned_outputs():
        got = torch.autograd.grad(out, leaves, dy)
    want = torch.autograd.grad(ref, f64, dy.double())
    plain = torch.autograd.grad(base, leaves, dy)
    for name, a, r, b in zip(("dx", "dweights", "dgate_up", "ddown"), got, want, plain):
        assert_close_rel(a, r, b, what=name)


@pytest.mark.parametrize("backend", ["loop", "batched"])
@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (37, 5, 2), (53, 8, 8), (129, 16, 4)])
def test_dispatch_matches_loop_reference(backend, T, E, k):
    leaves, ids = _setup(T, 24, 40, E, k, seed=T + k)
    _check(leaves, ids, E, backend)


@pytest.mark.parametrize("backend", ["loop", "batched"])
def test_dispatch_expert_with_no_tokens_and_empty_slots(backend):
    leaves, ids = _setup(61, 16, 24, 6, 3, seed=3, empty_expert=2, empty_frac=0.3)
    route = ExpertRoute.from_expert_ids(ids, leaves[1], 6)
    assert int(route.counts[2]) == 0 and route.num_assignments < 61 * 3
    _check(leaves, ids, 6, backend)
    # The expert nobody chose gets exactly zero gradient.
    x, w, w13, w2 = leaves
    out = expert_mlp(x, route, w13, w2, backend=backend)
    g13, g2 = torch.autograd.grad(out.square().sum(), (w13, w2))
    assert torch.all(g13[2] == 0) and torch.all(g2[2] == 0) and g13[1].abs().sum() > 0


@pytest.mark.parametrize("backend", ["loop", "batched"])
def test_dispatch_capacity_overflow(backend):
    # Every token wants expert 0 first: capacity 5 drops most of them.
    leaves, ids = _setup(40, 16, 24, 4, 2, seed=11)
    ids[:, 0] = 0
    ids[:, 1] = torch.arange(40) % 3 + 1
    route = apply_capacity(ExpertRoute.from_expert_ids(ids, leaves[1], 4), 5)
    assert route.counts.tolist() == [5, 5, 5, 5]
    # Earlier tokens are served first.
    assert (route.expert_ids[:5, 0] == 0).all() and (route.expert_ids[5:, 0] == -1).all()
    _check(leaves, ids, 4, backend, route=route)


@pytest.mark.parametrize("backend", ["loop", "batched"])
def test_dispatch_all_slots_dropped_gives_zeros_and_zero_grads(backend):
    leaves, ids = _setup(9, 16, 24, 3, 1, seed=2)
    x, w, w13, w2 = leaves
    route = ExpertRoute.from_expert_ids(torch.full_like(ids, -1), torch.zeros_like(w), 3)
    with poisoned_outputs():
        out = expert_mlp(x, route, w13, w2, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    gx, = torch.autograd.grad(out.sum(), (x,))
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("T,E,k,empty_frac", [(1, 3, 1, 0.0), (45, 6, 2, 0.25), (70, 8, 5, 0.1)])
def test_fused_triton_dispatch_matches_loop_reference(T, E, k, empty_frac):
    # The Triton gate / combine / gather-backward kernels (interpreted on the CPU), with an idle
    # expert, empty slots and a hidden size that is not a power of two.
    leaves, ids = _setup(T, 40, 24, E, k, seed=T, empty_expert=1, empty_frac=empty_frac)
    _check(leaves, ids, E, "loop", fused=True)


def test_fused_triton_dispatch_bfloat16():
    leaves, ids = _setup(33, 32, 48, 4, 2, seed=8, dtype=torch.bfloat16)
    _check(leaves, ids, 4, "loop", fused=True)


def test_fused_refuses_without_gpu_or_interpreter(monkeypatch):
    (x, w, w13, w2), ids = _setup(10, 16, 24, 4, 2, seed=1)
    r = ExpertRoute.from_expert_ids(ids, w, 4)
    if DEVICE == "cuda":
        pytest.skip("on a GPU the fused kernels can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="fused=True cannot run"):
        expert_mlp(x, r, w13, w2, backend="loop", fused=True)
    with pytest.raises(BackendUnavailable, match="no fused kernels"):
        expert_mlp(x, r, w13, w2, backend="reference", fused=True)
    assert expert_mlp(x, r, w13, w2).shape == x.shape  # automatic choice stays on plain PyTorch


def test_dispatch_bfloat16_within_dtype_tolerance():
    leaves, ids = _setup(77, 32, 48, 8, 2, seed=4, dtype=torch.bfloat16)
    _check(leaves, ids, 8, "loop")


def test_route_sorted_order_counts_offsets():
    ids = torch.tensor([[2, 0], [1, -1], [2, 1]], dtype=torch.int32)
    r = ExpertRoute.from_expert_ids(ids, torch.ones(3, 2), 4)
    assert r.counts.tolist() == [1, 2, 2, 0]
    assert r.offsets.tolist() == [0, 1, 3, 5, 5]
    assert r.sorted_expert_ids().tolist() == [0, 1, 1, 2, 2]
    assert r.sorted_token_ids().tolist() == [0, 1, 2, 0, 2]  # stable: by token within an expert
    assert r.num_assignments == 5 and abs(r.dropped_fraction() - 1 / 6) < 1e-9
    assert "experts=4" in r.describe()


@pytest.mark.parametrize("ids,match", [
    ([[0, 4]], "out of range"),
    ([[0, -2]], "out of range"),
    ([[1, 1]], "twice"),
])
def test_bad_expert_ids(ids, match):
    with pytest.raises(RouteError, match=match):
        ExpertRoute.from_expert_ids(torch.tensor(ids), torch.ones(1, 2), 4)


def test_bad_route_fields():
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    good = ExpertRoute.from_expert_ids(ids, torch.ones(1, 2), 3)
    with pytest.raises(RouteError, match="weights must have the shape"):
        ExpertRoute.from_expert_ids(ids, torch.ones(1, 3), 3)
    with pytest.raises(RouteError, match="floating point"):
        ExpertRoute.from_expert_ids(ids, torch.ones(1, 2, dtype=torch.int64), 3)
    with pytest.raises(RouteError, match="2-D"):
        ExpertRoute.from_expert_ids(ids[0], torch.ones(2), 3)
    with pytest.raises(RouteError, match="counts .* do not match"):
        ExpertRoute(ids, good.weights, 3, good.order, torch.tensor([2, 0, 0], dtype=torch.int32), good.offsets)
    with pytest.raises(RouteError, match="not sorted by expert"):
        ExpertRoute(ids, good.weights, 3, good.order.flip(0), good.counts, good.offsets)


def test_bad_dispatch_inputs():
    (x, w, w13, w2), ids = _setup(10, 16, 24, 4, 2, seed=1)
    r = ExpertRoute.from_expert_ids(ids, w, 4)
    with pytest.raises(RouteError, match="built for 10 tokens"):
        expert_mlp(x[:9], r, w13, w2)
    with pytest.raises(RouteError, match="2-D"):
        expert_mlp(x[None], r, w13, w2)
    with pytest.raises(RouteError, match="route has 4 experts"):
        expert_mlp(x, r, w13[:3], w2[:3])
    with pytest.raises(RouteError, match="down_proj must have shape"):
        expert_mlp(x, r, w13, w2[:, :, :5])
    with pytest.raises(RouteError, match="share a dtype"):
        expert_mlp(x, r, w13.double(), w2.double())
    with pytest.raises(BackendUnavailable, match="unknown dispatch backend"):
        expert_mlp(x, r, w13, w2, backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_grouped_mm_named_on_cpu_raises_instead_of_falling_back():
    (x, w, w13, w2), ids = _setup(10, 16, 24, 4, 2, seed=1)
    r = ExpertRoute.from_expert_ids(ids, w, 4)
    with pytest.raises(BackendUnavailable, match="grouped_mm.*CUDA"):
        expert_mlp(x, r, w13, w2, backend="grouped_mm")
    reasons = dict(explain_dispatch_backends(x, w13, w2))
    assert reasons["loop"] is None and reasons["grouped_mm"] and reasons["batched"]


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k", [(1000, 8, 2), (4099, 64, 8)])
def test_grouped_mm_matches_reference_on_gpu(T, E, k):
    leaves, ids = _setup(T, 256, 128, E, k, seed=E, dtype=torch.bfloat16, empty_expert=3)
    _check(leaves, ids, E, "grouped_mm")


def test_fused_ops_trace_under_torch_compile_without_graph_breaks():
    from routed.ops.expert_dispatch.triton_ops import moe_combine, moe_gather, moe_swiglu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.rand(6, 2, generator=g).to(DEVICE).requires_grad_()
    rows = torch.randperm(12, generator=g).to(DEVICE)
    inv = torch.empty(12, dtype=torch.int64, device=DEVICE)
    inv[rows] = torch.arange(12, device=DEVICE)  # sorted row r holds slot rows[r], of token rows[r] // 2
    tok = rows // 2

    def f(x, w):
        xs = moe_gather(x, tok, inv.view(6, 2).clone())
        return moe_combine(moe_swiglu(torch.cat([xs, 2 * xs], 1)), inv.view(6, 2), w)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a, b = compiled(x, w), f(x, w)
    assert torch.allclose(a, b)
    ga, gb = torch.autograd.grad(a.square().sum(), (x, w)), torch.autograd.grad(b.square().sum(), (x, w))
    assert all(torch.allclose(u, v) for u, v in zip(ga, gb))
