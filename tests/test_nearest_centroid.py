"""The k-means router's fused kernels (ops/nearest_centroid) against float64: nearest centroid, norms,
cosines, cluster sums and the commitment loss forward and backward, on awkward shapes (rows not a tile
multiple, head dims not a power of two, more centroids than one chunk, token-major views, GQA groups of
query rows, a zero row); outputs poisoned before every kernel run. Then the router on the kernels
against the router on PyTorch, step for step."""

import pytest
import torch
import torch.nn.functional as F

from routed.backends import BackendUnavailable
from routed.ops.nearest_centroid import (centroid_stats, centroid_stats_reference, commitment_sum,
                                         commitment_sum_reference)
from routed.route import RouteError
from routed.routers.kmeans import KMeansRouter
from routed.testing import assert_close_rel, poisoned_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, H, N, D, C, layout)
CASES = [(2, 3, 77, 48, 20, "contiguous"), (1, 2, 130, 64, 130, "token_major"), (2, 1, 5, 80, 3, "contiguous"),
         (1, 4, 64, 16, 64, "token_major"), (1, 1, 1, 32, 1, "contiguous")]


def _x(B, H, N, D, layout, dtype, seed=0, groups=None):
    g = torch.Generator().manual_seed(seed)
    if groups is not None:
        x = torch.randn(B, H, groups, N, D, generator=g)
    elif layout == "token_major":  # a projection's [B, N, H, D] output seen as [B, H, N, D]
        x = torch.randn(B, N, H, D, generator=g).transpose(1, 2)
    else:
        x = torch.randn(B, H, N, D, generator=g)
    return x.to(DEVICE, dtype)


def _centroids(H, C, D, seed=1):
    return F.normalize(torch.randn(H, C, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=-1)


def _sims64(x, c64):
    xn = F.normalize(x.double(), dim=-1)
    return torch.einsum("bhnd,hcd->bhnc", xn, c64.to(xn.device))


@pytest.mark.parametrize("B,H,N,D,C,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assignment_norms_cosines_and_sums_equal_float64(B, H, N, D, C, layout, dtype):
    x = _x(B, H, N, D, layout, dtype)
    c64 = _centroids(H, C, D)
    c = c64.float().to(DEVICE)
    with poisoned_outputs():
        a, norm, cos, sums = centroid_stats(x, c, want_sums=True, backend="triton")
    # the nearest centroid, up to float32 rounding between nearly equidistant ones
    sims = _sims64(x, c64)
    best = sims.max(-1).values
    got = sims.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    assert a.dtype == torch.int64 and a.shape == (B, H, N)
    # (the GPU's products are three TF32 passes, error ~2^-21 per product: near-ties may go either way)
    assert (best - got).max().item() <= 1e-5, "a row was assigned to a centroid that is not the nearest"
    top2 = sims.topk(min(2, C), dim=-1).values
    clear = top2[..., 0] - top2[..., -1] > 1e-4 if C > 1 else torch.ones_like(best, dtype=torch.bool)
    assert torch.equal(a[clear], sims.argmax(-1)[clear])
    # statistics against float64 computed with the kernel's assignment; PyTorch float32 sets the tolerance
    x64 = x.double()
    _, norm64, cos64, sums64 = centroid_stats_reference(x64.unsqueeze(2), c64.to(DEVICE), a, want_sums=True)
    _, norm32, cos32, sums32 = centroid_stats_reference(x.unsqueeze(2), c, a, want_sums=True)
    assert_close_rel(norm, norm64[:, :, 0], norm32[:, :, 0], floor=1e-6, what="norm")
    assert_close_rel(cos, cos64[:, :, 0], cos32[:, :, 0], floor=1e-6, what="cos")
    assert_close_rel(sums, sums64, sums32, floor=1e-6, what="cluster sums")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3])
def test_commitment_sum_forward_and_backward_equal_float64(dtype, groups):
    B, H, N, D, C = 2, 2, 70, 48, 9
    x = _x(B, H, N, D, "contiguous", dtype, seed=2, groups=groups)
    x[0, 1, 0, 3] = 0  # a zero row: the |x| <= eps branch of the gradient
    x.requires_grad_()
    c64 = _centroids(H, C, D, seed=3)
    c = c64.float().to(DEVICE)
    a = torch.randint(0, C, (B, H, N), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with poisoned_outputs():
        loss = commitment_sum(x, c, a, backend="triton")
    x64 = x.detach().double().requires_grad_()
    ref = commitment_sum_reference(x64, c64.to(DEVICE), a)
    plain = commitment_sum_reference(x, c, a)
    assert_close_rel(loss, ref, plain, floor=1e-6, what="loss")
    with poisoned_outputs():
        (got,) = torch.autograd.grad(loss * 0.7, x)
    (want,) = torch.autograd.grad(ref * 0.7, x64)
    (base,) = torch.autograd.grad(plain * 0.7, x)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close_rel(got, want, base, floor=1e-6, what="dx")
    assert got[0, 1, 0, 3].abs().sum() > 0, "the zero row's gradient pulls it towards its centroid"


def test_commitment_gradient_of_rows_shorter_than_eps():
    """Rows with 0 < |x| <= eps: x_hat = x / eps there, so |x_hat|^2 is not constant and its
    gradient counts (the kernel's other branch)."""
    B, H, N, D, C = 1, 2, 20, 16, 3
    x = (torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3e-14).to(DEVICE)
    c64 = _centroids(H, C, D, seed=10)
    a = torch.randint(0, C, (B, H, N), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    x32 = x.float().requires_grad_()
    with poisoned_outputs():
        (got,) = torch.autograd.grad(commitment_sum(x32, c64.float().to(DEVICE), a, backend="triton"), x32)
    x64 = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(commitment_sum_reference(x64.unsqueeze(2), c64.to(DEVICE), a), x64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_stats_of_query_groups_against_given_assignment():
    """Rows of a GQA group ([B, H, G, N, D], token-major views) against their key's cluster."""
    B, H, G, N, D, C = 1, 2, 4, 45, 64, 7
    q = torch.randn(B, N, H * G, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    q = q.transpose(1, 2).unflatten(1, (H, G))
    c64 = _centroids(H, C, D, seed=6)
    a = torch.randint(0, C, (B, H, N), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with poisoned_outputs():
        none, norm, cos, sums = centroid_stats(q, c64.float().to(DEVICE), a, backend="triton")
    assert none is None and sums is None
    _, norm64, cos64, _ = centroid_stats_reference(q.double(), c64.to(DEVICE), a)
    torch.testing.assert_close(norm.double(), norm64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cos.double(), cos64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_queries", [False, True])
def test_router_on_kernels_steps_like_the_router_on_pytorch(with_queries):
    """train_step, update and assign with backend='triton' against backend='reference': the same
    clusters, loss, gradients and centroids after two EMA steps."""
    B, H, G, N, D, C = 2, 2, 2, 100, 32, 8
    gen = torch.Generator().manual_seed(8)
    keys = torch.randn(B, H, N, D, generator=gen).to(DEVICE).requires_grad_()
    queries = torch.randn(B, H, G, N, D, generator=gen).to(DEVICE).requires_grad_() if with_queries else None
    routers = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        routers[backend] = KMeansRouter(H, D, C, decay=0.9, backend=backend).to(DEVICE)
    out = {}
    for backend, router in routers.items():
        a1, loss = router.train_step(keys, queries)
        grads = torch.autograd.grad(loss, [keys] + ([queries] if with_queries else []))
        a2 = router.assign(keys)
        router.update(keys, a2)
        out[backend] = (a1, loss.detach(), grads, a2, router.centroids.clone())
    ref, got = out["reference"], out["triton"]
    assert torch.equal(got[0], ref[0]) and torch.equal(got[3], ref[3])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-9)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got[4], ref[4], rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    x = torch.randn(1, 2, 8, 16)
    c = F.normalize(torch.randn(2, 4, 16), dim=-1)
    with pytest.raises(RouteError, match="centroids must be"):
        centroid_stats(x, c[:1])
    with pytest.raises(RouteError, match="one row per assignment"):
        centroid_stats(x.unsqueeze(2).expand(1, 2, 3, 8, 16), c)
    with pytest.raises(RouteError, match="assignment must be int64"):
        commitment_sum(x, c, torch.zeros(1, 2, 8, dtype=torch.int32))
    with pytest.raises(BackendUnavailable, match="unknown k-means backend"):
        centroid_stats(x, c, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        KMeansRouter(2, 16, 4, backend="fast")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with pytest.raises(BackendUnavailable, match="use_deterministic_algorithms"):
        centroid_stats(x.to(DEVICE), c.to(DEVICE), want_sums=True, backend="triton")


@pytest.mark.gpu
def test_automatic_backend_is_the_kernel_on_cuda(monkeypatch):
    from routed.ops.nearest_centroid import resolve_backend

    x = torch.randn(1, 2, 8, 16, device="cuda")
    c = F.normalize(torch.randn(2, 4, 16, device="cuda"), dim=-1)
    assert resolve_backend(None, x, c, True) == "triton"
    monkeypatch.setenv("ROUTED_KMEANS_KERNEL", "0")
    assert resolve_backend(None, x, c, True) == "reference"
