"""The fused token-choice route kernel (softmax, top-k, weights, expert-sorted order and its inverse)
against the PyTorch route builder, forward exactly and backward against float64 autograd, on awkward
shapes (tokens not a tile multiple, experts not a power of two, k = E, one token); outputs poisoned."""

import pytest
import torch

from routed.backends import BackendUnavailable
from routed.layers.moe import RoutedMoE
from routed.ops.expert_topk import expert_topk_reference, expert_topk_route
from routed.route import ExpertRoute, RouteError
from routed.testing import poisoned_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(37, 8, 2), (300, 6, 3), (5, 64, 8), (1, 4, 4), (129, 128, 1)]


def _inputs(T, E, mode, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=g) * 2
    if mode == "probs":
        x = x.softmax(-1)
    bias = torch.randn(E, generator=g) * 0.05
    return x.to(DEVICE), bias.to(DEVICE), g


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "probs"])
@pytest.mark.parametrize("normalize,biased", [(True, False), (False, True)])
def test_kernel_route_equals_pytorch_route(T, E, k, mode, normalize, biased):
    x, bias, g = _inputs(T, E, mode, seed=T + E + k)
    bias = bias if biased else None
    with poisoned_outputs():
        route, probs = expert_topk_route(x, k, mode=mode, normalize=normalize, selection_bias=bias, backend="triton")
    ref, ref_probs = expert_topk_route(x, k, mode=mode, normalize=normalize, selection_bias=bias,
                                       backend="reference")
    assert torch.equal(route.expert_ids, ref.expert_ids)
    assert torch.equal(route.order, ref.order), "the order must be the stable sort of the slots by expert"
    assert torch.equal(route.counts, ref.counts) and torch.equal(route.offsets, ref.offsets)
    torch.testing.assert_close(route.weights, ref.weights.float(), rtol=1e-6, atol=1e-7)
    if mode == "probs":
        assert probs is None and ref_probs is None
    else:
        torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)
    # The inverse written by the kernel passes the route's own value checks.
    ExpertRoute(route.expert_ids, route.weights, E, route.order, route.counts, route.offsets, validate=True,
                slot_rows=route.slot_rows)


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "probs"])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernel_backward_equals_float64(T, E, k, mode, normalize):
    x, bias, g = _inputs(T, E, mode, seed=7 * T + E)
    x = x.requires_grad_()
    dw = torch.randn(T, k, generator=g).to(DEVICE)
    dp = torch.randn(T, E, generator=g).to(DEVICE)
    with poisoned_outputs():
        route, probs = expert_topk_route(x, k, mode=mode, normalize=normalize, selection_bias=bias, backend="triton")
        loss = (route.weights * dw).sum() + (0 if probs is None else (probs * dp).sum())
        (grad,) = torch.autograd.grad(loss, x)
    x64 = x.detach().double().requires_grad_()
    ids, w, p64 = expert_topk_reference(x64, k, mode, normalize, bias.double())
    assert torch.equal(ids.to(torch.int32), route.expert_ids)
    loss64 = (w * dw.double()).sum() + (0 if p64 is None else (p64 * dp.double()).sum())
    (want,) = torch.autograd.grad(loss64, x64)
    # float32 kernel against float64: errors at float32 rounding of O(1) values
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5)
    # A zero gradient must not pass for a real one (k = 1 renormalised is a constant weight of 1: there
    # the float64 gradient is zero and the kernel's float32 one is at rounding level).
    if want.abs().max() > 1e-3:
        assert grad.abs().max() > 1e-3


def test_weights_only_gradient_and_bfloat16_logits():
    """The Switch loss unused (no gradient into the returned softmax); bf16 logits get a bf16 gradient."""
    x, _, g = _inputs(50, 8, "softmax_topk", seed=3)
    xb = x.to(torch.bfloat16).requires_grad_()
    route, _ = expert_topk_route(xb, 2, backend="triton")
    dw = torch.randn(50, 2, generator=g).to(DEVICE)
    (grad,) = torch.autograd.grad((route.weights * dw).sum(), xb)
    assert grad.dtype == torch.bfloat16
    x64 = xb.detach().double().requires_grad_()
    _, w, _ = expert_topk_reference(x64, 2)
    (want,) = torch.autograd.grad((w * dw.double()).sum(), x64)
    torch.testing.assert_close(grad.double(), want, rtol=2e-2, atol=2e-3)


def test_layer_with_kernel_router_equals_reference_router():
    torch.manual_seed(0)
    moe = RoutedMoE(32, 16, 6, 2, router_backend="triton", aux_loss_coef=0.01, z_loss_coef=1e-3).to(DEVICE)
    ref = RoutedMoE(32, 16, 6, 2, router_backend="reference", aux_loss_coef=0.01, z_loss_coef=1e-3).to(DEVICE)
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(2, 45, 32, device=DEVICE)
    grads = []
    for m in (moe, ref):
        y = m(x)
        (y.square().mean() + m.balance_loss).backward()
        grads.append((y.detach(), m.router.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
    assert torch.equal(moe.last.route.order, ref.last.route.order)


def test_bad_inputs_raise():
    x = torch.randn(10, 4, device=DEVICE)
    with pytest.raises(RouteError, match="k must be"):
        expert_topk_route(x, 5)
    with pytest.raises(RouteError, match="mode must be"):
        expert_topk_route(x, 2, mode="softmax")
    with pytest.raises(RouteError, match="selection_bias"):
        expert_topk_route(x, 2, selection_bias=torch.zeros(3, device=DEVICE))
    with pytest.raises(BackendUnavailable, match="unknown"):
        expert_topk_route(x, 2, backend="cuda")
    with pytest.raises(RouteError, match="router_backend"):
        RoutedMoE(8, 4, 4, 2, router_backend="fast")


def test_triton_asked_for_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU tensor outside the interpreter
    with pytest.raises(BackendUnavailable, match="CUDA"):
        expert_topk_route(torch.randn(4, 4), 2, backend="triton")


def test_kernel_route_traces_under_torch_compile_without_graph_breaks():
    x, bias, g = _inputs(40, 8, "softmax_topk", seed=11)
    x = x.requires_grad_()

    def f(x):
        route, probs = expert_topk_route(x, 2, selection_bias=bias, backend="triton")
        return route.weights, probs, route.order, route.slot_rows

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(x), f(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    dw = torch.randn(40, 2, generator=g).to(DEVICE)
    ga = torch.autograd.grad((got[0] * dw).sum() + got[1].square().sum(), x)
    gb = torch.autograd.grad((want[0] * dw).sum() + want[1].square().sum(), x)
    torch.testing.assert_close(ga, gb)
