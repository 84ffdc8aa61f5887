"""Expert routers (token choice, expert choice, similarity- and attention-aware), load-balancing
terms and routing metrics, against float64 computations written out from their definitions."""

import math

import pytest
import torch

from routed.experts_metrics import expert_load, load_imbalance, router_entropy, routing_fluctuation, top1_experts
from routed.layers.moe import RoutedMoE, moe_balance_loss
from routed.ops.expert_dispatch import expert_mlp_reference
from routed.route import ExpertRoute, RouteError
from routed.routers.experts import (ExpertRouter, attention_mixed_probs, expert_choice_route, router_z_loss,
                                    similarity_mixed_probs, switch_aux_loss, token_choice_route,
                                    topk_route_from_probs, update_selection_bias)
from routed.testing import assert_close_rel


def _logits(T, E, seed):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2


# --------------------------------------------------------------------------------------- token choice
@pytest.mark.parametrize("k", [1, 2, 5])
def test_token_choice_softmax_then_topk(k):
    logits = _logits(53, 7, k)
    r = token_choice_route(logits, k)
    p = logits.double().softmax(-1)
    top = p.topk(k, -1)
    assert torch.equal(r.expert_ids.long(), top.indices)
    assert_close_rel(r.weights, top.values / top.values.sum(-1, keepdim=True), floor=1e-6, what="weights")
    raw = token_choice_route(logits, k, normalize=False)
    assert_close_rel(raw.weights, top.values, floor=1e-6, what="unnormalised weights")
    assert r.counts.sum() == 53 * k and r.dropped_fraction() == 0
    same = topk_route_from_probs(logits.softmax(-1), k)
    assert torch.equal(same.expert_ids, r.expert_ids) and torch.equal(same.order, r.order)


def test_token_choice_topk_then_softmax():
    logits = _logits(40, 6, 1)
    r = token_choice_route(logits, 3, score_order="topk_softmax")
    top = logits.double().topk(3, -1)
    assert torch.equal(r.expert_ids.long(), top.indices)
    assert_close_rel(r.weights, top.values.softmax(-1), floor=1e-6, what="weights")


def test_token_choice_capacity_serves_earlier_tokens_first():
    logits = _logits(60, 4, 2)
    full = token_choice_route(logits, 2)
    r = token_choice_route(logits, 2, capacity=20)
    assert int(r.counts.max()) <= 20 and r.capacity == 20
    for e in range(4):
        toks = (full.expert_ids == e).any(-1).nonzero().squeeze(-1)
        kept = (r.expert_ids == e).any(-1).nonzero().squeeze(-1)
        assert torch.equal(kept, toks[:20])  # the first 20 tokens that chose e, in order
    assert bool((r.weights[r.expert_ids < 0] == 0).all())


def test_selection_bias_changes_choice_not_weights():
    logits = _logits(30, 5, 3)
    bias = torch.tensor([10.0, 0, 0, 0, 0])
    r = token_choice_route(logits, 1, selection_bias=bias, normalize=False)
    assert bool((r.expert_ids == 0).all())
    assert_close_rel(r.weights[:, 0], logits.softmax(-1)[:, 0], floor=1e-6, what="unbiased weights")


@pytest.mark.parametrize("call,match", [
    (lambda: token_choice_route(_logits(5, 4, 0), 5), r"k must be an int in \[1, num_experts=4\]"),
    (lambda: token_choice_route(_logits(5, 4, 0), 0), "k must be"),
    (lambda: token_choice_route(_logits(5, 4, 0)[None], 2), r"\[tokens, experts\]"),
    (lambda: token_choice_route(_logits(5, 4, 0).long(), 2), "floating-point"),
    (lambda: token_choice_route(_logits(5, 4, 0), 2, score_order="sigmoid"), "score_order"),
    (lambda: expert_choice_route(_logits(5, 4, 0), 6), r"capacity must be an int in \[1, tokens=5\]"),
    (lambda: ExpertRouter(8, 4, 2, method="expert_choice"), "not causal"),
    (lambda: ExpertRouter(8, 4, 5), "top_k must be"),
    (lambda: ExpertRouter(8, 4, 2, method="hash"), "method must be one of"),
])
def test_router_errors(call, match):
    with pytest.raises(RouteError, match=match):
        call()


# -------------------------------------------------------------------------------------- expert choice
def test_expert_choice_respects_capacity_and_picks_top_tokens():
    logits = _logits(37, 5, 4)
    r = expert_choice_route(logits, 9)
    assert r.counts.tolist() == [9] * 5 and r.capacity == 9
    p = logits.double().softmax(-1)
    for e in range(5):
        chosen = set((r.expert_ids == e).any(-1).nonzero().squeeze(-1).tolist())
        assert chosen == set(p[:, e].topk(9).indices.tolist())
    live = r.expert_ids >= 0
    want = p.gather(-1, r.expert_ids.clamp_min(0).long())
    assert torch.allclose(r.weights.double()[live], want[live], atol=1e-6) and bool((r.weights[~live] == 0).all())
    # Tokens get any number of experts, zero included.
    per_token = live.sum(-1)
    assert int(per_token.min()) == 0 and int(per_token.max()) == r.k


def test_expert_choice_router_default_capacity():
    router = ExpertRouter(16, 4, 2, method="expert_choice", causal=False)
    out = router(torch.randn(2, 21, 16))
    assert out.route.counts.tolist() == [math.ceil(42 * 2 / 4)] * 4


# ------------------------------------------------------------------------------ graph-of-tokens mixing
def _similarity_f64(p, f, causal, tau, mix):
    f = torch.nn.functional.normalize(f.double(), dim=-1)
    s = f @ f.transpose(-1, -2) / tau
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return (1 - mix) * p.double() + mix * s.softmax(-1) @ p.double()


def _attention_f64(p, q, k, causal, mix):
    hq, hkv = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(hq // hkv, 1)
    s = q.double() @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    a = s.softmax(-1).mean(1)
    return (1 - mix) * p.double() + mix * a @ p.double()


@pytest.mark.parametrize("causal", [False, True])
def test_similarity_mixing_matches_float64_forward_backward(causal):
    g = torch.Generator().manual_seed(5)
    p = torch.randn(2, 29, 6, generator=g).softmax(-1).requires_grad_()
    f = torch.randn(2, 29, 8, generator=g).requires_grad_()
    out = similarity_mixed_probs(p, f, causal=causal, temperature=0.5, mix=0.7)
    ref = _similarity_f64(p, f, causal, 0.5, 0.7)
    assert_close_rel(out, ref, floor=1e-5, what="mixed probs")
    assert torch.allclose(out.sum(-1), torch.ones(2, 29), atol=1e-5)
    dy = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (p, f), dy)
    want = torch.autograd.grad(ref, (p, f), dy.double())
    for name, a, b in zip(("dp", "df"), got, want):
        assert_close_rel(a, b, floor=1e-5, what=name)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_attention_mixing_matches_float64_forward_backward(hq, hkv):
    g = torch.Generator().manual_seed(hq)
    p = torch.randn(2, 23, 5, generator=g).softmax(-1).requires_grad_()
    q = torch.randn(2, hq, 23, 16, generator=g).requires_grad_()
    k = torch.randn(2, hkv, 23, 16, generator=g).requires_grad_()
    out = attention_mixed_probs(p, q=q, k=k, causal=True, mix=0.6)
    ref = _attention_f64(p, q, k, True, 0.6)
    assert_close_rel(out, ref, floor=1e-5, what="mixed probs")
    dy = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (p, q, k), dy)
    want = torch.autograd.grad(ref, (p, q, k), dy.double())
    for name, a, b in zip(("dp", "dq", "dk"), got, want):
        assert_close_rel(a, b, floor=1e-5, what=name)
    # An explicit attention matrix (future entries included) gives the same mixing once masked.
    s = (q @ k.repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * 16 ** -0.5
    full = s.softmax(-1)  # non-causal matrix: the router must mask and renormalise it
    causal_w = s.masked_fill(~torch.ones(23, 23, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    a = attention_mixed_probs(p, attn_weights=causal_w, causal=True, mix=0.6)
    assert_close_rel(a, ref, floor=1e-5, what="from attn_weights")
    leak = attention_mixed_probs(p, attn_weights=full, causal=True, mix=0.6)
    assert torch.allclose(leak[:, 0], p[:, 0] * 0.4 + 0.6 * p[:, 0], atol=1e-6)  # row 0 sees only itself


@pytest.mark.parametrize("method", ["similarity", "attention"])
def test_causal_mixing_does_not_look_at_future_tokens(method):
    torch.manual_seed(0)
    H, N, t0 = 16, 31, 17
    router = ExpertRouter(H, 6, 2, method=method, causal=True, mix=0.9, temperature=0.3)
    x = torch.randn(1, N, H)
    q, k = torch.randn(1, 2, N, 8), torch.randn(1, 2, N, 8)
    x2, q2, k2 = x.clone(), q.clone(), k.clone()
    x2[:, t0 + 1:] = torch.randn(1, N - t0 - 1, H) * 3  # change only the future
    q2[:, :, t0 + 1:] += 2.0
    k2[:, :, t0 + 1:] = torch.randn(1, 2, N - t0 - 1, 8) * 3
    kw = lambda q_, k_: {} if method == "similarity" else {"q": q_, "k": k_}  # noqa: E731
    a, b = router(x, **kw(q, k)), router(x2, **kw(q2, k2))
    assert torch.equal(a.route.expert_ids[: t0 + 1], b.route.expert_ids[: t0 + 1])
    assert torch.allclose(a.probs[: t0 + 1], b.probs[: t0 + 1], atol=1e-6)
    assert not torch.allclose(a.probs[t0 + 1:], b.probs[t0 + 1:], atol=1e-3)
    # Without causal masking the same change does reach earlier tokens (the test can fail).
    router.causal = False
    c, d = router(x, **kw(q, k)), router(x2, **kw(q2, k2))
    assert not torch.allclose(c.probs[: t0 + 1], d.probs[: t0 + 1], atol=1e-4)


def test_mixing_errors():
    p = torch.rand(1, 5, 3).softmax(-1)
    with pytest.raises(RouteError, match="needs the preceding attention"):
        attention_mixed_probs(p, causal=True)
    with pytest.raises(RouteError, match="not both"):
        attention_mixed_probs(p, q=torch.randn(1, 2, 5, 4), k=torch.randn(1, 2, 5, 4),
                              attn_weights=torch.rand(1, 2, 5, 5), causal=True)
    with pytest.raises(RouteError, match="must divide"):
        attention_mixed_probs(p, q=torch.randn(1, 3, 5, 4), k=torch.randn(1, 2, 5, 4), causal=True)
    with pytest.raises(RouteError, match="features must be"):
        similarity_mixed_probs(p, torch.randn(1, 4, 8), causal=True)
    with pytest.raises(RouteError, match="mix must lie"):
        similarity_mixed_probs(p, torch.randn(1, 5, 8), causal=True, mix=1.5)


# ------------------------------------------------------------------------------------- load balancing
def test_switch_aux_loss_equals_hf_load_balancing_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = _logits(64, 8, 9).requires_grad_()
    r = token_choice_route(logits, 2)
    ours = switch_aux_loss(logits.softmax(-1), r)
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # Perfect balance with uniform probabilities gives k.
    uniform = torch.zeros(8, 4)
    r = ExpertRoute.from_expert_ids(torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]] * 2), torch.ones(8, 2), 4)
    assert abs(float(switch_aux_loss(uniform.softmax(-1), r)) - 2.0) < 1e-6


def test_router_z_loss():
    logits = _logits(10, 4, 2).double()
    assert torch.allclose(router_z_loss(logits).double(), torch.logsumexp(logits, -1).square().mean(), atol=1e-5)


def test_aux_loss_free_bias_update():
    bias = torch.zeros(4)
    update_selection_bias(bias, torch.tensor([10, 2, 2, 2]), 0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    router = ExpertRouter(8, 4, 1, balance_bias_rate=0.05)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 1.0  # every token prefers expert 0
    x = torch.ones(20, 8)
    router.eval()
    router(x)
    assert bool((router.selection_bias == 0).all())  # no update outside training
    router.train()
    first = router(x).route.counts.tolist()
    for _ in range(30):
        out = router(x)
    assert first[0] == 20 and int(out.route.counts[0]) < 20  # the bias moved tokens off expert 0
    assert not router.selection_bias.requires_grad


# -------------------------------------------------------------------------------------------- metrics
def test_metrics():
    ids = torch.tensor([[1, 0], [2, -1], [-1, -1]], dtype=torch.int32)
    w = torch.tensor([[0.2, 0.8], [1.0, 0.0], [0.0, 0.0]])
    r = ExpertRoute.from_expert_ids(ids, w, 3)
    assert top1_experts(r).tolist() == [0, 2, -1]
    assert expert_load(r).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3]) and load_imbalance(r) == pytest.approx(1.0)
    r2 = ExpertRoute.from_expert_ids(torch.tensor([[1, 0], [2, -1], [0, -1]], dtype=torch.int32),
                                     torch.tensor([[0.9, 0.1], [1.0, 0.0], [1.0, 0.0]]), 3)
    assert routing_fluctuation(r, r2) == pytest.approx(2 / 3)
    assert routing_fluctuation(r, r) == 0.0
    with pytest.raises(RouteError, match="same tokens"):
        routing_fluctuation(r, torch.tensor([0, 1]))
    assert router_entropy(torch.full((5, 4), 0.25)) == pytest.approx(math.log(4))
    assert router_entropy(torch.eye(4)) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- layer
@pytest.mark.parametrize("router,kw", [
    ("token_choice", {}),
    ("token_choice", {"score_order": "topk_softmax", "capacity_factor": 0.8}),
    ("expert_choice", {"causal": False}),
    ("similarity", {}),
    ("attention", {}),
])
def test_routed_moe_layer_forward_backward(router, kw):
    torch.manual_seed(1)
    moe = RoutedMoE(24, 16, 6, 2, router=router, aux_loss_coef=0.01, z_loss_coef=1e-3, **kw).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64, requires_grad=True)
    extra = {"q": torch.randn(2, 4, 13, 8, dtype=torch.float64),
             "k": torch.randn(2, 2, 13, 8, dtype=torch.float64)} if router == "attention" else {}
    y = moe(x, **extra)
    r = moe.last.route
    ref = expert_mlp_reference(x.reshape(-1, 24), r.expert_ids, r.weights, moe.gate_up_proj, moe.down_proj)
    assert y.shape == x.shape and torch.allclose(y.reshape(-1, 24), ref, atol=1e-12)
    (y.square().sum() + moe.balance_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.gate_up_proj.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    assert float(moe.last.load.sum()) == pytest.approx(1.0) and float(moe.last.entropy.detach()) > 0


@pytest.mark.parametrize("router", ["token_choice", "similarity"])
def test_gate_entropy_is_of_the_unmixed_softmax(router):
    """``gate_entropy`` is the same quantity for every router (each token's own softmax); ``entropy``
    is of the distribution chosen from, the mixture for a mixing router."""
    torch.manual_seed(2)
    moe = RoutedMoE(24, 16, 6, 2, router=router).double()
    moe(torch.randn(2, 13, 24, dtype=torch.float64))
    out = moe.last
    want = router_entropy(out.logits.softmax(-1))
    assert float(out.gate_entropy) == pytest.approx(want, rel=1e-9)
    if router == "token_choice":
        assert float(out.entropy) == pytest.approx(want, rel=1e-9)
    else:
        assert float(out.entropy) == pytest.approx(router_entropy(out.probs), rel=1e-9)
        assert float(out.entropy) != pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("router", ["token_choice", "similarity"])
def test_top1_margin_is_the_gap_of_the_distribution_chosen_from(router):
    """``top1_margin``: mean over tokens of the largest minus the second-largest entry of ``probs``
    (the mixture for a mixing router), checked against a sort of each row."""
    torch.manual_seed(3)
    moe = RoutedMoE(24, 16, 6, 2, router=router).double()
    moe(torch.randn(2, 13, 24, dtype=torch.float64))
    out = moe.last
    rows = out.probs.sort(-1, descending=True).values
    want = float((rows[:, 0] - rows[:, 1]).mean())
    assert 0 < want and float(out.top1_margin) == pytest.approx(want, rel=1e-6)


def test_routed_moe_errors():
    moe = RoutedMoE(8, 4, 4, 2, router="attention")
    with pytest.raises(RouteError, match="needs the preceding attention"):
        moe(torch.randn(1, 5, 8))
    with pytest.raises(RouteError, match=r"x must be \[batch, seq, 8\]"):
        moe(torch.randn(1, 5, 9))
    assert RoutedMoE(8, 4, 4, 2).balance_loss is None


def test_moe_balance_loss_sums_the_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(RoutedMoE(8, 4, 4, 2, aux_loss_coef=0.1), RoutedMoE(8, 4, 4, 2, z_loss_coef=0.01),
                                RoutedMoE(8, 4, 4, 2))
    assert moe_balance_loss(model) is None  # nothing ran yet
    model(torch.randn(1, 9, 8))
    want = 0.1 * model[0].last.aux_loss + 0.01 * model[1].last.z_loss
    assert torch.allclose(moe_balance_loss(model), want)
