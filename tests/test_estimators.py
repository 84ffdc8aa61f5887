"""Block-importance estimators: kernels against the reference, the reference against the
definition (float64 dense attention summed per block), and the budget's selection rules."""

import math

import pytest
import torch

from routed import BlockRoute, RouteError, routed_attention
from routed.ops.block_scores import pooled_block_probs, sampled_block_mass
from routed.routers.estimators import (BlockBudget, PooledBlockEstimator, SampledQueryEstimator, make_estimator,
                                       select_blocks)
from routed.testing import block_route_token_mask, dense_attention_f64, poisoned_outputs

# Kernel tests run on the GPU when there is one (else in the Triton interpreter on the CPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, q heads, kv heads, q_len, kv_len, block, head_dim): GQA groups of 1, 3 and 4, partial
# last blocks, more keys than queries (a chunk after a cache), a single query.
SHAPES = [(1, 3, 3, 50, 50, 16, 16), (2, 6, 2, 70, 100, 16, 32), (1, 4, 1, 33, 33, 32, 24), (1, 8, 2, 1, 90, 16, 16)]


def _qk(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, nq, d, generator=g).to(dtype), torch.randn(b, hkv, nk, d, generator=g).to(dtype)


def _dense_probs_f64(q, k, scale):
    """[B, Hq, Nq, Nk] float64 causal softmax, queries the last Nq positions (the definition)."""
    nq, nk = q.shape[2], k.shape[2]
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    visible = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    return torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)


def _strided_rows(nq, bs, r):
    nqb = math.ceil(nq / bs)
    rows = torch.arange(nqb)[:, None] * bs + (torch.arange(r) + 1) * (bs // r) - 1
    return rows.clamp(max=nq - 1).flatten()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("head_reduce", ["max", "mean", "none"])
def test_sampled_reference_matches_definition(shape, head_reduce):
    b, hq, hkv, nq, nk, bs, d = shape
    q, k = _qk(b, hq, hkv, nq, nk, d)
    r = 4
    rows = _strided_rows(nq, bs, r)
    got = sampled_block_mass(q, k, rows, r, bs, head_reduce=head_reduce, backend="reference")
    p = _dense_probs_f64(q, k, d ** -0.5)[:, :, rows]  # [B, Hq, rows, Nk]
    nkb = math.ceil(nk / bs)
    p = torch.nn.functional.pad(p, (0, nkb * bs - nk)).view(b, hq, -1, r, nkb, bs).sum(-1).mean(3)
    want = p
    if head_reduce != "none":
        p = p.view(b, hkv, hq // hkv, -1, nkb)
        want = p.amax(2) if head_reduce == "max" else p.mean(2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_pooled_reference_matches_definition():
    b, hq, hkv, nq, nk, bs, d = 1, 4, 2, 40, 56, 16, 8
    q, k = _qk(b, hq, hkv, nq, nk, d)
    got = pooled_block_probs(q, k, bs, scale=0.3, head_reduce="mean", backend="reference")
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    want = torch.zeros(b, hkv, nqb, nkb, dtype=torch.float64)
    for h in range(hq):
        for i in range(nqb):
            pq = q[0, h, i * bs:(i + 1) * bs].double().mean(0)
            last = min((i + 1) * bs, nq) - 1 + nk - nq
            logits = torch.stack([0.3 * pq @ k[0, h // 2, j * bs:(j + 1) * bs].double().mean(0)
                                  + math.log(min(bs, nk - j * bs)) for j in range(last // bs + 1)])
            want[0, h // 2, i, : last // bs + 1] += torch.softmax(logits, 0) / 2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("head_reduce", ["max", "mean", "none"])
def test_pooled_kernel_matches_reference(shape, head_reduce):
    b, hq, hkv, nq, nk, bs, d = shape
    q, k = (t.to(DEVICE) for t in _qk(b, hq, hkv, nq, nk, d))
    ref = pooled_block_probs(q, k, bs, head_reduce=head_reduce, backend="reference")
    with poisoned_outputs():
        got = pooled_block_probs(q, k, bs, head_reduce=head_reduce, backend="triton")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode,head_reduce", [("strided", "max"), ("last", "max"), ("strided", "none")])
def test_sampled_kernel_matches_reference(shape, mode, head_reduce):
    b, hq, hkv, nq, nk, bs, d = shape
    q, k = (t.to(DEVICE) for t in _qk(b, hq, hkv, nq, nk, d))
    r = 4
    rows = (_strided_rows(nq, bs, r) if mode == "strided" else torch.arange(nq - r, nq).clamp(min=0)).to(DEVICE)
    ref = sampled_block_mass(q, k, rows, r, bs, head_reduce=head_reduce, backend="reference")
    with poisoned_outputs():
        got = sampled_block_mass(q, k, rows, r, bs, head_reduce=head_reduce, backend="triton")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def _low_precision_case(dtype, device):
    q, k = _qk(1, 4, 2, 64, 64, 32, dtype=dtype)
    q, k = q.to(device), k.to(device)
    rows = _strided_rows(64, 16, 8).to(device)
    ref = sampled_block_mass(q.float(), k.float(), rows, 8, 16, backend="reference")
    base = sampled_block_mass(q, k, rows, 8, 16, backend="reference")  # same rounded inputs, fp32 math
    got = sampled_block_mass(q, k, rows, 8, 16, backend="triton")
    assert (got - ref).abs().max() <= 3 * (base - ref).abs().max() + 1e-3


def test_sampled_kernel_float16():
    # The interpreter has no bfloat16 arithmetic (numpy); float16 takes the same code path.
    _low_precision_case(torch.float16, "cpu")


@pytest.mark.gpu
def test_sampled_kernel_bfloat16_on_gpu():
    _low_precision_case(torch.bfloat16, "cuda")


def _visible(nq, nk, bs):
    nqb, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    qmax = torch.clamp((torch.arange(nqb) + 1) * bs, max=nq) - 1 + nk - nq
    return torch.arange(nkb)[None, :] * bs <= qmax[:, None], qmax // bs


@pytest.mark.parametrize("nq,nk", [(100, 100), (37, 90)])
def test_selection_rules(nq, nk):
    bs = 16
    probs = torch.rand(2, 3, math.ceil(nq / bs), math.ceil(nk / bs), generator=torch.Generator().manual_seed(1))
    visible, diag = _visible(nq, nk, bs)
    everything = select_blocks(probs, BlockBudget(coverage=1.0), q_len=nq, kv_len=nk, block_size=bs)
    assert torch.equal(everything.to_block_mask()[0, 0], visible)
    prev = None
    for tau in (0.3, 0.6, 0.9):
        m = select_blocks(probs, BlockBudget(coverage=tau, sink_blocks=1, local_blocks=2), q_len=nq, kv_len=nk,
                          block_size=bs).to_block_mask()
        assert not (m & ~visible).any(), "a block wholly in the future was routed"
        kb = torch.arange(visible.shape[1])
        forced = visible & ((kb[None] < 1) | (kb[None] > diag[:, None] - 2))
        assert (m | ~forced).all(), "sink or local blocks missing"
        # Coverage: the kept blocks hold at least tau of each row's visible mass.
        p = probs.masked_fill(~visible, 0)
        assert ((p * m).sum(-1) >= tau * p.sum(-1) - 1e-6).all()
        if prev is not None:
            assert (m | ~prev).all(), "a larger coverage must keep a superset"
        prev = m
    m = select_blocks(probs, BlockBudget(top_k=3, sink_blocks=1, local_blocks=1), q_len=nq, kv_len=nk,
                      block_size=bs).to_block_mask()
    assert torch.equal(m.sum(-1), visible.sum(-1).clamp(max=3).expand(2, 3, -1))
    assert not (m & ~visible).any()


@pytest.mark.parametrize("budget", [dict(top_k=2), dict(coverage=0.5)])
@pytest.mark.parametrize("nq,nk", [(100, 100), (37, 90)])
def test_dense_last_blocks(budget, nq, nk):
    """The last query blocks keep every visible block; the other rows are the budget's alone."""
    bs = 16
    probs = torch.rand(2, 3, math.ceil(nq / bs), math.ceil(nk / bs), generator=torch.Generator().manual_seed(2))
    visible, _ = _visible(nq, nk, bs)
    plain = select_blocks(probs, BlockBudget(**budget), q_len=nq, kv_len=nk, block_size=bs).to_block_mask()
    last = select_blocks(probs, BlockBudget(**budget, dense_last_blocks=2), q_len=nq, kv_len=nk,
                         block_size=bs).to_block_mask()
    assert torch.equal(last[..., -2:, :], visible[-2:].expand(2, 3, -1, -1))
    assert torch.equal(last[..., :-2, :], plain[..., :-2, :])
    assert not torch.equal(last, plain)


def test_policy_decode_steps_route_without_the_dense_last_blocks():
    import routed.integrations.transformers as rt

    policy = rt.RoutedPrefillPolicy(estimator="pooled", top_k=2, block_size=16, dense_last_blocks=1)
    q, k = _qk(1, 4, 2, 1, 160, 16, seed=5)  # one decode query after 159 cached tokens
    assert int(policy.router(q, k).kv_block_counts.max()) == 10  # its only block is the "last" one
    assert int(policy.decode_router(q, k).kv_block_counts.max()) == 2
    assert rt.RoutedPrefillPolicy(estimator="pooled", top_k=2).decode_router is not None


@pytest.mark.parametrize("name", ["pooled", "strided", "last"])
def test_full_budget_route_is_exact(name):
    b, hq, hkv, n, bs, d = 1, 6, 2, 75, 16, 16
    q, k = _qk(b, hq, hkv, n, n, d)
    v = torch.randn(b, hkv, n, d)
    est = make_estimator(name, bs, BlockBudget(coverage=1.0), samples=4)
    route = est(q, k)
    out = routed_attention(q, k, v, route, backend="reference")
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    want, _ = dense_attention_f64(q, k, v, mask, d ** -0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("est,heads", [(PooledBlockEstimator(16, BlockBudget(top_k=2)), 2),
                                       (SampledQueryEstimator(16, BlockBudget(coverage=0.5), samples=4), 2),
                                       (SampledQueryEstimator(16, BlockBudget(coverage=0.5), samples=4,
                                                              head_reduce="none"), 6)])
def test_sparse_route_is_causal_and_kv_headed(est, heads):
    q, k = _qk(2, 6, 2, 64, 96, 16)
    route = est(q, k)
    assert isinstance(route, BlockRoute) and route.kv_block_ids.shape[:2] == (2, heads) and route.causal
    tok = block_route_token_mask(route)
    assert not (tok & ~torch.ones(64, 96, dtype=torch.bool).tril(32)).any()
    assert route.density() < 1.0


def test_the_estimator_of_a_strong_block_finds_it():
    """A key block that every query matches strongly is routed under a small budget."""
    q, k = _qk(1, 2, 1, 128, 128, 16, seed=3)
    k[:, :, 48:64] = 0
    k[:, :, 48:64, 0] = 4.0
    q[:, :, :, 0] = 4.0
    for est in (PooledBlockEstimator(16, BlockBudget(top_k=3)),
                SampledQueryEstimator(16, BlockBudget(top_k=3), samples=4)):
        m = est(q, k).to_block_mask()[0, 0]
        assert m[4:, 3].all(), f"{type(est).__name__} missed the block every query attends to"


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one budget"), (dict(top_k=2, coverage=0.5), "exactly one budget"),
    (dict(top_k=0), "top_k must be"), (dict(coverage=1.5), "coverage must be"), (dict(coverage=0.0), "coverage"),
    (dict(top_k=2, sink_blocks=-1), "sink_blocks"), (dict(top_k=2, local_blocks=0), "local_blocks"),
    (dict(top_k=2, dense_last_blocks=-1), "dense_last_blocks"),
])
def test_bad_budgets_raise(kwargs, match):
    with pytest.raises(RouteError, match=match):
        BlockBudget(**kwargs)


def test_bad_estimator_arguments_raise():
    with pytest.raises(RouteError, match="samples"):
        SampledQueryEstimator(16, BlockBudget(top_k=1), samples=3)
    with pytest.raises(RouteError, match="exceeds block_size"):
        SampledQueryEstimator(16, BlockBudget(top_k=1), samples=32)
    with pytest.raises(RouteError, match="unknown estimator"):
        make_estimator("nope", 16, BlockBudget(top_k=1))
    q, k = _qk(1, 4, 3, 16, 16, 8)
    with pytest.raises(RouteError, match="multiple"):
        pooled_block_probs(q, k, 8)
    q, k = _qk(1, 2, 2, 32, 16, 8)
    with pytest.raises(RouteError, match="last q_len"):
        pooled_block_probs(q, k, 8)
    q, k = _qk(1, 2, 2, 32, 32, 8)
    with pytest.raises(ValueError, match="estimator backend"):
        pooled_block_probs(q, k, 8, backend="cuda")
    with pytest.raises(RouteError, match="head_reduce"):
        pooled_block_probs(q, k, 8, head_reduce="min")


@pytest.mark.parametrize("n,block,d", [(100, 16, 24), (64, 64, 16), (1, 32, 8), (257, 100, 40), (50, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_means_kernel_equals_pytorch(n, block, d, dtype):
    """One-launch block means (partial last block, head dims that are not a power of two, a strided
    input) against the PyTorch form, outputs poisoned; low-precision results are rounded once."""
    from routed.ops.block_scores import block_means
    from routed.ops.block_scores.triton_kernels import block_means_triton

    g = torch.Generator().manual_seed(n + block)
    x = torch.randn(2, n, 3, d, generator=g).to(DEVICE, dtype).transpose(1, 2)  # [B, H, N, D], not contiguous
    with poisoned_outputs():
        got = block_means_triton(x, block, dtype)
    want = block_means(x, block)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=1e-6 if dtype == torch.float32 else 1e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-2)
