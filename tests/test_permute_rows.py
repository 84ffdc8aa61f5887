"""permute_rows: rows in cluster-sorted order with padding slots, backward by the inverse gather."""

import pytest
import torch

from routed.ops.permute_rows import permute_rows
from routed.routers.kmeans import cluster_window_route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _plain(x, index):
    R, H, _, d = x.shape
    L = index.shape[1]
    y = x.gather(2, index.clamp_min(0).view(R, 1, L, 1).expand(R, H, L, d))
    return y * (index >= 0).view(R, 1, L, 1)


@pytest.mark.parametrize("n,clusters,window", [(37, 3, 8), (64, 4, 16), (5, 2, 4)])
def test_matches_plain_gather_forward_and_backward(n, clusters, window):
    g = torch.Generator().manual_seed(n)
    cl = torch.randint(0, clusters, (3, n), generator=g)
    _, slot_tokens, token_slots = cluster_window_route(cl, clusters, window)
    x = torch.randn(3, 2, n, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = permute_rows(x, slot_tokens, token_slots)
    want = _plain(x, slot_tokens)
    assert torch.equal(y, want)
    assert bool((y[(slot_tokens < 0).view(3, 1, -1, 1).expand_as(y)] == 0).all())
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, x, gy)
    (ref,) = torch.autograd.grad(want, x, gy)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # and back: slots -> tokens, whose backward zero-fills the padding slots
    s = torch.randn(3, 2, slot_tokens.shape[1], 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = permute_rows(s, token_slots, slot_tokens)
    assert torch.equal(t, _plain(s, token_slots))
    gt = torch.randn(t.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(t, s, gt)
    (ref,) = torch.autograd.grad(_plain(s, token_slots), s, gt)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_bad_shapes_raise():
    x = torch.zeros(2, 1, 6, 3)
    with pytest.raises(ValueError, match=r"needs index \[R, L\] and inverse \[R, N\]"):
        permute_rows(x, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


def test_leading_axes_and_copies_of_row_zero_in_padding():
    """The [..., N, d] form with an index broadcast over a head axis (the Routing Transformer's
    [B, Hk, G, N, d] from a strided view), and zero_padding=False: pad slots hold row 0, and every
    token row's gradient is still exactly the plain gather's."""
    g = torch.Generator().manual_seed(3)
    B, Hk, G, n, d, C, w = 2, 3, 2, 29, 4, 3, 8
    cl = torch.randint(0, C, (B * Hk, n), generator=g)
    _, slot_tokens, token_slots = cluster_window_route(cl, C, w)
    L = slot_tokens.shape[1]
    base = torch.randn(B, n, Hk * G, d, generator=g, dtype=torch.float64, requires_grad=True)
    x = base.transpose(1, 2).unflatten(1, (Hk, G))  # [B, Hk, G, n, d], not contiguous
    to_slot, to_token = slot_tokens.view(B, Hk, 1, L), token_slots.view(B, Hk, 1, n)
    y = permute_rows(x, to_slot, to_token, zero_padding=False)
    want = x.gather(-2, to_slot.clamp_min(0).unsqueeze(-1).expand(B, Hk, G, L, d))
    assert torch.equal(y, want)
    assert bool((slot_tokens < 0).any())  # the case has pad slots, and they hold row 0
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, base, gy)
    live = (to_slot >= 0).unsqueeze(-1).to(gy.dtype)  # the gradient of pad slots reaches no token
    (ref,) = torch.autograd.grad(want, base, gy * live)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    back = permute_rows(y, to_token, to_slot, zero_padding=False)  # slots -> tokens: the identity on x
    assert torch.equal(back, x)


@pytest.mark.parametrize("shape,lead_index", [((3, 2, 37, 5), (3, 1)), ((2, 70, 24), (1,)),
                                              ((2, 3, 2, 29, 40), (2, 3, 1)), ((1, 1, 9, 300), (1, 1))])
def test_triton_kernel_equals_the_gather(shape, lead_index):
    """The Triton row mover against the torch gather, forward and backward, with padding slots, a
    broadcast index, rows longer than one column block (300 > 256) and gradients whose rows are strided."""
    g = torch.Generator().manual_seed(sum(shape))
    *lead, n, d = shape
    L = n + 5
    rows = int(torch.tensor(lead_index).prod())
    perm = torch.stack([torch.cat([torch.randperm(n, generator=g), torch.full((5,), -1)])[torch.randperm(L, generator=g)]
                        for _ in range(rows)]).view(*lead_index, L)
    inverse = torch.full((*lead_index, n), -1, dtype=torch.long)
    for row in range(perm.numel() // L):
        p, inv = perm.view(-1, L)[row], inverse.view(-1, n)[row]
        inv[p[p >= 0]] = torch.arange(L)[p >= 0]
    perm, inverse = perm.to(DEVICE), inverse.to(DEVICE)
    base = torch.randn(*shape[:-2], d, n, generator=g, dtype=torch.float64)
    x = base.transpose(-1, -2).contiguous().to(DEVICE).requires_grad_()  # rows contiguous
    got = permute_rows(x, perm, inverse, backend="triton")
    want = permute_rows(x, perm, inverse, backend="torch")
    assert torch.equal(got, want)
    gy = torch.randn(got.shape, generator=g, dtype=torch.float64).to(DEVICE)
    for grad in (gy, gy.transpose(-1, -2).contiguous().transpose(-1, -2)):  # rows contiguous or not
        (dg,) = torch.autograd.grad(got, x, grad, retain_graph=True)
        (dw,) = torch.autograd.grad(want, x, grad, retain_graph=True)
        assert torch.equal(dg, dw)


def test_token_major_layouts_forward_and_backward():
    """The Routing Transformer's two moves: token-major q (a projection's [B, N, H, d] seen as
    [B, Hk, G, N, d]) to head-major slots, whose gradient comes back token-major; and slots back to
    tokens written token-major (token_major_out), whose gradient goes back head-major. Values equal
    the gather's exactly."""
    g = torch.Generator().manual_seed(11)
    B, Hk, G, n, d = 2, 2, 3, 41, 16
    cl = torch.randint(0, 3, (B * Hk, n), generator=g)
    _, slot_tokens, token_slots = cluster_window_route(cl, 3, 8)
    L = slot_tokens.shape[1]
    to_slot, to_token = slot_tokens.view(B, Hk, 1, L).to(DEVICE), token_slots.view(B, Hk, 1, n).to(DEVICE)
    q = torch.randn(B, n, Hk * G, d, generator=g, dtype=torch.float64).to(DEVICE)
    q = q.transpose(1, 2).unflatten(1, (Hk, G)).requires_grad_()  # token-major view
    slots = permute_rows(q, to_slot, to_token, backend="triton")
    assert torch.equal(slots, permute_rows(q, to_slot, to_token, backend="torch"))
    assert slots.is_contiguous()
    gs = torch.randn(slots.shape, generator=g, dtype=torch.float64).to(DEVICE)
    (dq,) = torch.autograd.grad(slots, q, gs)
    (dq_ref,) = torch.autograd.grad(permute_rows(q, to_slot, to_token, backend="torch"), q, gs)
    assert torch.equal(dq, dq_ref)
    assert dq.stride()[1:4] == (G * d, d, Hk * G * d), "the gradient in q's token-major layout"
    s = slots.detach().requires_grad_()
    back = permute_rows(s, to_token, to_slot, backend="triton", token_major_out=True)
    ref = permute_rows(s, to_token, to_slot, backend="torch")
    assert torch.equal(back, ref)
    assert back.stride()[1:4] == (G * d, d, Hk * G * d), "rows written token-major"
    assert back.reshape(B, Hk * G, n, d).transpose(1, 2).is_contiguous()
    gb = torch.randn(back.shape, generator=g, dtype=torch.float64).to(DEVICE)
    (ds,) = torch.autograd.grad(back, s, gb)
    (ds_ref,) = torch.autograd.grad(ref, s, gb)
    assert torch.equal(ds, ds_ref) and ds.is_contiguous()


def test_triton_backend_that_cannot_run_raises():
    x = torch.randn(2, 6, 4, device=DEVICE).transpose(-1, -2)  # rows not contiguous
    idx = torch.arange(4, device=DEVICE)[None]
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        permute_rows(x, idx, idx, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        permute_rows(x, idx, idx, backend="cuda")


def test_row_kernel_requests_are_checked(monkeypatch):
    x, idx = torch.randn(1, 4, 3), torch.arange(4)[None]
    monkeypatch.setenv("ROUTED_ROW_KERNEL", "yes")
    with pytest.raises(ValueError, match="ROUTED_ROW_KERNEL must be 0 or 1"):
        permute_rows(x.to(DEVICE), idx.to(DEVICE), idx.to(DEVICE))
