"""KMeansRouter (online spherical k-means) and the causal cluster route on the block-sparse kernels."""

import io

import pytest
import torch
import torch.nn.functional as F

from routed import RouteError, routed_attention
from routed.env import triton_runs_on
from routed.ops.permute_rows import permute_rows
from routed.routers.kmeans import KMeansRouter, cluster_ranks, cluster_window_mask, cluster_window_route
from routed.testing import (assert_close_rel, assert_grads_close_rel, block_route_token_mask, dense_attention_f64,
                            poisoned_outputs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _clustered(b, h, n, d, directions, seed, noise=0.05):
    """Vectors scattered around ``directions [h, C, d]``; returns them and each one's true cluster."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, directions.shape[1], (b, h, n), generator=g)
    x = directions[torch.arange(h).view(1, h, 1), truth] + noise * torch.randn(b, h, n, d, generator=g)
    return x * (1 + torch.rand(b, h, n, 1, generator=g)), truth  # norms vary: the k-means is spherical


def _directions(h, c, d, seed):
    return F.normalize(torch.randn(h, c, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_initialises_from_data_in_evaluation_and_recovers_clusters():
    dirs = _directions(2, 4, 16, seed=0)
    x, truth = _clustered(2, 2, 200, 16, dirs, seed=1)
    km = KMeansRouter(2, 16, 4).eval()
    assert not bool(km.initialized)
    a = km.assign(x)  # first use, evaluation mode: initialised from x
    assert bool(km.initialized)
    assert torch.allclose(km.centroids.norm(dim=-1), torch.ones(2, 4), atol=1e-5)
    for h in range(2):  # the clustering matches the truth up to relabelling
        pairs = torch.stack([a[:, h].flatten(), truth[:, h].flatten()], 1).unique(dim=0)
        assert pairs.shape[0] == 4, pairs
    before = km.centroids.clone()
    km.assign(torch.randn(1, 2, 50, 16))  # already initialised: other data does not re-initialise
    assert torch.equal(km.centroids, before)


def test_fewer_tokens_than_clusters():
    km = KMeansRouter(1, 8, 16)
    a = km.assign(torch.randn(1, 1, 5, 8))
    assert a.shape == (1, 1, 5) and bool(km.initialized) and torch.isfinite(km.centroids).all()


def test_ema_update_and_commitment_loss():
    km = KMeansRouter(1, 4, 2, decay=0.0, commitment=0.5)
    km.centroids.copy_(torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]]))
    km.initialized.fill_(True)
    x = torch.tensor([[[[2.0, 0.2, 0, 0], [1.0, -0.1, 0, 0], [0, 3.0, 1.0, 0]]]], requires_grad=True)
    a = km.assign(x)
    assert a.tolist() == [[[0, 0, 1]]]
    loss = km.commitment_loss(x, a)
    xn = F.normalize(x.detach(), dim=-1)
    want = 0.5 * (xn - km.centroids[0, a[0, 0]]).pow(2).sum(-1).mean()
    assert torch.allclose(loss, want)
    loss.backward()
    assert x.grad is not None and km.centroids.grad is None
    km.update(x.detach(), a)  # decay 0: the normalised mean direction of the members
    assert torch.allclose(km.centroids[0, 0], F.normalize(xn[0, 0, :2].sum(0), dim=0), atol=1e-6)
    assert torch.allclose(km.centroids[0, 1], xn[0, 0, 2], atol=1e-6)
    km2 = KMeansRouter(1, 4, 3, decay=0.9)
    km2.assign(x.detach())
    c = km2.centroids.clone()
    km2.update(x.detach(), torch.zeros(1, 1, 3, dtype=torch.long))  # clusters 1, 2 have no members
    assert torch.equal(km2.centroids[0, 1:], c[0, 1:])
    assert not torch.equal(km2.centroids[0, 0], c[0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_commitment_loss_and_gradient_as_written_out(dtype):
    """The loss and its gradient against autograd through ``F.normalize`` in float64, a zero vector
    and one shorter than normalize's eps included."""
    km = KMeansRouter(2, 8, 3, commitment=0.5)
    x = torch.randn(2, 2, 20, 8)
    km.assign(x)  # initialise
    x[0, 0, 3] = 0
    x[1, 1, 7] = 1e-14
    x = x.to(dtype).requires_grad_()
    a = km.assign(x)
    loss = km.commitment_loss(x, a)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    c = km.centroids.double()[torch.arange(2).view(1, 2, 1), a]
    want = 0.5 * (F.normalize(x64, dim=-1) - c).pow(2).sum(-1).mean()
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    assert x.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is rounded to x's dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * float(x64.grad.abs().max()))


def test_train_step_is_assign_commitment_and_update():
    """``train_step`` = ``assign`` + the keys' and the queries' (mean over the group) commitment
    losses + ``update``, as separate calls compute them."""
    torch.manual_seed(0)
    k = torch.randn(2, 3, 30, 8, requires_grad=True)
    q = torch.randn(2, 3, 2, 30, 8, requires_grad=True)
    a_km, b_km = KMeansRouter(3, 8, 4, decay=0.9), KMeansRouter(3, 8, 4, decay=0.9)
    a_km.assign(k)
    b_km.load_state_dict(a_km.state_dict())
    before = a_km.centroids.clone()
    a, loss = a_km.train_step(k, q)
    gk, gq = torch.autograd.grad(loss, [k, q])
    want_a = b_km.assign(k)
    want = b_km.commitment_loss(k, want_a) + sum(b_km.commitment_loss(q[:, :, g], want_a) for g in range(2)) / 2
    b_km.update(k.detach(), want_a)
    assert torch.equal(a, want_a)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    wk, wq = torch.autograd.grad(want, [k, q])
    torch.testing.assert_close(gk, wk, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gq, wq, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(a_km.centroids, b_km.centroids, rtol=0, atol=1e-7)
    assert not torch.equal(a_km.centroids, before)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_commitment_in_slot_order_equals_token_order(backend):
    """``commitment_after(..., slot_tokens)``: the keys and queries given in a padded slot order (pads
    copy token 0, as the clustered attention's slots do) and brought back by reading each token's own
    slot (pad gradients dropped) give the token-order loss and gradients; a wrong ``slot_tokens`` shape
    says what it must be."""
    if backend == "triton" and not triton_runs_on(torch.device("cpu")):
        pytest.skip("the k-means kernels need TRITON_INTERPRET=1 on the CPU")
    torch.manual_seed(1)
    B, H, G, N, D, L = 2, 3, 2, 30, 8, 41
    k = torch.randn(B, H, N, D, requires_grad=True)
    q = torch.randn(B, H, G, N, D, requires_grad=True)
    km = KMeansRouter(H, D, 4, decay=0.9, backend=backend)
    km.assign(k)
    slots = torch.stack([torch.randperm(L)[:N] for _ in range(B * H)]).view(B, H, N)  # token -> slot
    slot_tokens = torch.full((B, H, L), -1, dtype=torch.long).scatter_(2, slots, torch.arange(N).expand(B, H, N))

    def to_slots(t, lead):  # [..., N, D] -> [..., L, D]: pads copy token 0, the way back reads own slots
        shape = (B, H, *([1] * lead))
        return permute_rows(t, slot_tokens.view(*shape, L), slots.view(*shape, N), zero_padding=False,
                            backend="torch")

    state = {n: b.clone() for n, b in km.state_dict().items()}
    want = km.commitment_after(km.train_assign(k), k, q)
    wk, wq = torch.autograd.grad(want, [k, q])
    km.load_state_dict(state)
    st = km.train_assign(k)
    got = km.commitment_after(st, to_slots(k, 0), to_slots(q, 1), slot_tokens)
    gk, gq = torch.autograd.grad(got, [k, q])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(gk, wk, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gq, wq, rtol=1e-5, atol=1e-9)
    with pytest.raises(RouteError, match=r"slot_tokens must be \[B, H, L\]"):
        km.commitment_after(st, to_slots(k, 0), None, slot_tokens[..., :-1])


def test_state_round_trips_through_save_and_load():
    km = KMeansRouter(3, 8, 5)
    x = torch.randn(2, 3, 40, 8)
    km.train()
    for _ in range(3):
        km.update(x, km.assign(x))
    buf = io.BytesIO()
    torch.save(km.state_dict(), buf)
    buf.seek(0)
    fresh = KMeansRouter(3, 8, 5)
    fresh.load_state_dict(torch.load(buf))
    assert bool(fresh.initialized) and torch.equal(fresh.centroids, km.centroids)
    y = torch.randn(1, 3, 30, 8)
    assert torch.equal(fresh.assign(y), km.assign(y))
    fresh.load_state_dict(KMeansRouter(3, 8, 5).state_dict())  # an uninitialised state: initialises again
    fresh.assign(y)
    assert bool(fresh.initialized) and not torch.equal(fresh.centroids, km.centroids)


def test_centroids_stay_float32_in_a_bf16_model():
    km = KMeansRouter(1, 8, 2, decay=0.999).to(torch.bfloat16)
    x = torch.randn(1, 1, 20, 8, dtype=torch.bfloat16)
    a = km.assign(x)
    c = km.centroids.clone()
    km.update(x, a)
    assert km.centroids.dtype == torch.float32 and not torch.equal(km.centroids, c)
    assert km.double().centroids.dtype == torch.float32


def test_balanced_groups_take_the_nearest_tokens():
    km = KMeansRouter(2, 8, 3)
    x = torch.randn(2, 2, 33, 8)
    route = km.balanced_groups(x, 10)
    ids = route.token_ids
    assert ids.shape == (2, 2, 3, 10) and bool((ids[..., 1:] > ids[..., :-1]).all())
    sim = km.similarities(x)  # [B, H, N, C]
    for b in range(2):
        for h in range(2):
            for c in range(3):
                kth = sim[b, h, :, c].topk(10).values[-1]
                assert bool((sim[b, h, ids[b, h, c], c] >= kth).all())


def _ranks_by_loop(cl):
    rank = torch.zeros_like(cl)
    for r in range(cl.shape[0]):
        seen = {}
        for t in range(cl.shape[1]):
            c = int(cl[r, t])
            rank[r, t] = seen.get(c, 0)
            seen[c] = seen.get(c, 0) + 1
    return rank


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("n,clusters,window,block", [(37, 3, 8, None), (64, 5, 16, None), (10, 7, 4, None),
                                                     (1, 2, 16, None), (77, 3, 16, 4), (90, 4, 12, 3),
                                                     (300, 3, 128, None)])
def test_cluster_window_route_matches_its_definition(n, clusters, window, block, strict):
    """Blocks smaller than the window (several per chunk: explicit, or 64 for a window of 128) too."""
    g = torch.Generator().manual_seed(n)
    cl = torch.randint(0, clusters, (3, n), generator=g)
    cl[0] = 1  # one row with a single cluster
    route, slot_tokens, token_slots = cluster_window_route(cl, clusters, window, strict=strict, block_size=block)
    assert route.q_block_size == (block or min(window & -window, 64))
    b = route.q_block_size
    assert window % b == 0 and route.q_len % b == 0 and route.q_len <= max(b, n + clusters * (b - 1))
    assert route.q_positions is None if not strict else route.q_positions is not None
    assert route.q_segments is None  # routes stay inside clusters, pads come after their cluster's tokens
    assert torch.equal(slot_tokens.gather(1, token_slots), torch.arange(n).expand(3, n))
    rank, counts = cluster_ranks(cl, clusters)
    assert torch.equal(rank, _ranks_by_loop(cl))
    assert torch.equal(counts.sum(-1), torch.full((3,), n))
    # The route's token mask over slots, mapped back to tokens, is the written-out mask.
    slot_mask = block_route_token_mask(route)[:, 0]  # [R, L, L]
    tok_mask = slot_mask.gather(1, token_slots[:, :, None].expand(-1, -1, route.q_len))
    tok_mask = tok_mask.gather(2, token_slots[:, None, :].expand(-1, n, -1))
    pos = torch.arange(n).expand(3, n)
    want = cluster_window_mask(cl, rank, pos, cl, rank, pos, window, strict=strict)
    assert torch.equal(tok_mask, want)
    # Every query sees itself (strict: never) and at most 2 * window keys.
    diag = want.diagonal(dim1=1, dim2=2)
    assert bool((~diag).all() if strict else diag.all()) and int(want.sum(-1).max()) <= 2 * window
    if strict and n > 1:  # strictly earlier: the same visible keys as the inclusive mask, less itself
        incl = cluster_window_mask(cl, rank, pos, cl, rank, pos, window)
        assert torch.equal(want, incl & ~torch.eye(n, dtype=torch.bool))


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("n,w,block", [(45, 16, None), (150, 32, 16)])
def test_cluster_route_attention_against_float64(backend, strict, n, w, block):
    """The op the routing layer runs: attention over the cluster-sorted copies, forward and backward,
    against float64 dense attention under the written-out mask in the original order (strict: each
    cluster's first token sees nothing and gets zeros). Pad slots hold token 0 and get no gradient
    (pad queries see real keys). Two blocks per chunk in the second case."""
    g = torch.Generator().manual_seed(5)
    R, G, d, C = 2, 2, 16, 3
    cl = torch.randint(0, C, (R, n), generator=g)
    q, k, v = (torch.randn(R, h, n, d, generator=g).to(DEVICE).requires_grad_() for h in (G, 1, 1))
    route, slot_tokens, token_slots = cluster_window_route(cl.to(DEVICE), C, w, strict=strict, block_size=block)
    assert bool((slot_tokens < 0).any())  # pad slots exist
    src = slot_tokens.clamp_min(0)
    L = src.shape[1]

    def perm(x):
        return x.gather(2, src.view(R, 1, L, 1).expand(R, x.shape[1], L, d))

    with poisoned_outputs():
        o = routed_attention(perm(q), perm(k), perm(v), route, backend=backend)
    out = o.gather(2, token_slots.view(R, 1, n, 1).expand(R, G, n, d))
    rank, _ = cluster_ranks(cl, C)
    pos = torch.arange(n).expand(R, n)
    mask = cluster_window_mask(cl, rank, pos, cl, rank, pos, w, strict=strict)[:, None].to(DEVICE)
    assert strict is not bool(mask.any(-1).all())  # strict leaves rows with nothing to see
    ref, _ = dense_attention_f64(q, k, v, mask, d ** -0.5)
    base, _ = dense_attention_f64(q, k, v, mask, d ** -0.5, dtype=q.dtype)
    assert_close_rel(out, ref, base, what="out")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_grads_close_rel(out, ref, base, (q, k, v), do)
