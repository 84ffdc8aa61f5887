"""Bi-Level Routing Attention against an independent float64 implementation of the paper's
algorithm (written here from the paper's code structure: rearrange into regions, region means,
top-k, gather, attend, LePE), on divisible and padded maps, through the reference and the Triton
backends (the interpreter on a CPU), forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from routed import RouteError
from routed.layers.bra import BiLevelRoutingAttention
from routed.routers.regions2d import RegionGrid
from routed.testing import assert_close_rel, poisoned_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paper_bra_f64(m: BiLevelRoutingAttention, x: torch.Tensor, region_ids=None):
    """BRA in float64, NHWC in and out, the paper's way (k-fold gather), with padding masked:
    the map is padded up to the grid, pad tokens are left out of region means and never attended,
    LePE runs on the unpadded V map. ``region_ids`` forces the routing (else top-k of means).
    Returns (out, region_ids)."""
    f = lambda t: t.detach().double()  # noqa: E731
    x = x.double()
    B, H, W, C = x.shape
    S, qk, heads = m.n_win, m.qk_dim, m.num_heads
    rh, rw = -(-H // S), -(-W // S)
    qkv = F.linear(x, f(m.qkv.weight), f(m.qkv.bias))
    valid = torch.zeros(B, S * rh, S * rw, 1, dtype=torch.float64, device=x.device)
    valid[:, :H, :W] = 1
    pad = F.pad(qkv, (0, 0, 0, S * rw - W, 0, S * rh - H))
    # 'n (j h) (i w) c -> n (j i) (h w) c'
    regions = lambda t: t.view(B, S, rh, S, rw, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, S * S, rh * rw, -1)  # noqa
    qkv_r, valid_r = regions(pad), regions(valid)  # [B, R, T, *], [B, R, T, 1]
    q, k, v = qkv_r.split([qk, qk, C], dim=-1)
    if region_ids is None:
        cnt = valid_r.sum(2)
        q_win = (q * valid_r).sum(2) / cnt.clamp_min(1)
        k_win = (k * valid_r).sum(2) / cnt.clamp_min(1)
        logits = (q_win * m.scale) @ k_win.transpose(-1, -2)
        logits = logits.masked_fill((cnt == 0).view(B, 1, S * S), float("-inf"))
        region_ids = logits.topk(m.topk, dim=-1).indices
    idx = region_ids.long()
    R, T, K = S * S, rh * rw, idx.shape[-1]
    sel = lambda t: torch.stack([t[b, idx[b]] for b in range(B)]).view(B, R, K * T, -1)  # noqa: E731
    k_sel, v_sel, valid_sel = sel(k), sel(v), sel(valid_r)
    heads_of = lambda t: t.view(B, R, t.shape[2], heads, -1).transpose(2, 3)  # [B, R, heads, n, d]  # noqa
    logits = (heads_of(q) * m.scale) @ heads_of(k_sel).transpose(-1, -2)  # [B, R, heads, T, K*T]
    logits = logits.masked_fill(valid_sel.view(B, R, 1, 1, K * T) == 0, float("-inf"))
    o = torch.softmax(logits, -1).nan_to_num(0.0) @ heads_of(v_sel)  # [B, R, heads, T, d]
    o = o.transpose(2, 3).reshape(B, S, S, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, S * rh, S * rw, C)
    o = o[:, :H, :W]
    if m.lepe is not None:
        v_map = qkv[..., 2 * qk:].permute(0, 3, 1, 2)
        o = o + F.conv2d(v_map, f(m.lepe.weight), f(m.lepe.bias), padding=m.lepe.padding, groups=C).permute(0, 2, 3, 1)
    return F.linear(o, f(m.wo.weight), f(m.wo.bias)), region_ids


def _module(dim=32, heads=2, n_win=3, topk=2, **kw):
    torch.manual_seed(0)
    return BiLevelRoutingAttention(dim, num_heads=heads, n_win=n_win, topk=topk, **kw).to(DEVICE)


@pytest.mark.parametrize("hw,n_win,topk", [((12, 12), 3, 2), ((10, 11), 3, 4), ((9, 9), 7, 5), ((16, 8), 4, 16)])
def test_reference_backend_matches_paper_f64(hw, n_win, topk):
    """Divisible maps, padded maps, maps with regions made only of padding (9 tokens, 7 regions)."""
    m = _module(n_win=n_win, topk=topk, backend="reference").double()
    x = torch.randn(2, *hw, 32, dtype=torch.float64, device=DEVICE)
    out, routing = m(x, return_routing=True)
    want, ids = paper_bra_f64(m, x)
    assert torch.equal(routing.region_ids.sort(-1).values, ids.sort(-1).values)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_all_regions_equals_dense_attention_over_real_tokens():
    """topk = every region: BRA must be plain attention over the real tokens (+ LePE), whatever
    the padding. The paper's code fails this on padded maps (its queries attend to pad tokens)."""
    m = _module(n_win=3, topk=9, backend="reference").double()
    x = torch.randn(2, 7, 10, 32, dtype=torch.float64, device=DEVICE)
    qkv = m.qkv(x)
    q, k, v = (t.flatten(1, 2).unflatten(-1, (2, -1)).transpose(1, 2) for t in qkv.split([32, 32, 32], -1))
    o = F.scaled_dot_product_attention(q, k, v, scale=m.scale).transpose(1, 2).reshape(2, 7, 10, 32)
    o = o + m.lepe(qkv[..., 64:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(m(x), m.wo(o), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hw,n_win,topk", [((12, 12), 3, 2), ((10, 11), 3, 4), ((8, 8), 4, 5), ((14, 14), 2, 1)])
def test_triton_backend_forward_backward(hw, n_win, topk):
    """Regions of 16, 16 (padded), 4 and 49 tokens through the Triton kernels, float32, against
    float64; gradients of the input and of every weight."""
    m = _module(n_win=n_win, topk=topk, backend="triton")
    x = torch.randn(2, *hw, 32, device=DEVICE, requires_grad=True)
    with poisoned_outputs():
        out, routing = m(x, return_routing=True)
    want, _ = paper_bra_f64(m, x, routing.region_ids)
    base, _ = paper_bra_f64(m, x.detach().float(), routing.region_ids)  # the same math in float32...
    assert_close_rel(out, want, want.float() + (base - want).float(), what="out")  # ...sets the tolerance
    do = torch.randn_like(out)
    with poisoned_outputs():
        got = torch.autograd.grad((out * do).sum(), [x, *m.parameters()])
    ref_m = _module(n_win=n_win, topk=topk, backend="reference").double()
    ref_m.load_state_dict(m.state_dict())
    xd = x.detach().double().requires_grad_()
    ref_out = _forced_routing_forward(ref_m, xd, routing)
    want_g = torch.autograd.grad((ref_out * do.double()).sum(), [xd, *ref_m.parameters()])
    for name, a, b in zip(["x"] + [n for n, _ in m.named_parameters()], got, want_g):
        assert_close_rel(a, b, b.float(), factor=1.0, floor=2e-5, what=f"d{name}")


def _forced_routing_forward(m, x, routing):
    """The reference module's forward with the routing given (float64 gradients of the same choice)."""
    import routed.layers.bra as bra

    orig = bra.region_topk_route
    bra.region_topk_route = lambda *a, **k: type(routing)(routing.region_ids, routing.grid,
                                                          routing.route.to(x.device))
    try:
        return m(x)
    finally:
        bra.region_topk_route = orig


def test_gather_impl_equals_routed_impl():
    m = _module(n_win=3, topk=4, backend="reference").double()
    x = torch.randn(2, 10, 11, 32, dtype=torch.float64, device=DEVICE)
    g = _module(n_win=3, topk=4, impl="gather").double()
    g.load_state_dict(m.state_dict())
    torch.testing.assert_close(g(x), m(x), rtol=1e-10, atol=1e-10)


def _routing_f64(q_r, k_r, real, topk, keep_own, center):
    """The routing options written out: centred query means over real regions, own region first."""
    q_r, k_r = q_r.double(), k_r.double()
    if center:
        w = real.double()[None, :, None]
        q_r = q_r - (q_r * w).sum(1, keepdim=True) / w.sum()
    logits = q_r @ k_r.transpose(-1, -2)
    R = real.numel()
    for b in range(q_r.shape[0]):
        for r in range(R):
            if keep_own:
                logits[b, r, r] = float("inf")
            logits[b, r, ~real] = float("-inf")
    return logits.topk(topk, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("hw,n_win", [((12, 12), 3), ((9, 9), 7)])
@pytest.mark.parametrize("keep_own,center", [(True, False), (False, True), (True, True)])
def test_routing_options(hw, n_win, keep_own, center):
    """keep_own_region / center_routing equal their definition (also on a grid with all-padding
    regions), and the module with them still equals the paper's attention over that routing."""
    from routed.routers.regions2d import region_topk_route

    grid = RegionGrid(*hw, n_win)
    real = grid.real_regions(DEVICE)
    g = torch.Generator().manual_seed(n_win)
    offset = 3 * torch.randn(1, 1, 8, generator=g)  # a component every region shares
    q_r = (torch.randn(2, grid.num_regions, 8, generator=g) + offset).to(DEVICE)
    k_r = (torch.randn(2, grid.num_regions, 8, generator=g) + offset).to(DEVICE)
    topk = 3
    got = region_topk_route(q_r, k_r, grid, topk, keep_own=keep_own, center=center).region_ids
    assert torch.equal(got.cpu(), _routing_f64(q_r, k_r, real, topk, keep_own, center).cpu())
    if keep_own:  # each real region routes to itself; padding-only regions are never routed
        own = torch.arange(grid.num_regions, device=DEVICE)[None, :, None]
        assert bool((got == own).any(-1)[:, real].all())
    assert bool(real[got].all())
    m = _module(n_win=n_win, topk=topk, backend="reference", keep_own_region=keep_own, center_routing=center).double()
    x = torch.randn(2, *hw, 32, dtype=torch.float64, device=DEVICE)
    out, routing = m(x, return_routing=True)
    want, _ = paper_bra_f64(m, x, routing.region_ids)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_centering_spreads_the_routing():
    """With a large component shared by all regions, the paper's rule sends every query region to
    the same key regions; centring the query means ranks by what differs between regions."""
    from routed.routers.regions2d import region_topk_route

    grid = RegionGrid(16, 16, 4)
    g = torch.Generator().manual_seed(0)
    shared = 20 * torch.randn(1, 1, 16, generator=g)
    q_r, k_r = torch.randn(1, 16, 16, generator=g) + shared, torch.randn(1, 16, 16, generator=g) + shared
    distinct = lambda ids: len({tuple(r) for r in ids[0].tolist()})  # noqa: E731
    assert distinct(region_topk_route(q_r, k_r, grid, 2).region_ids) == 1
    assert distinct(region_topk_route(q_r, k_r, grid, 2, center=True).region_ids) > 4


def test_nchw_equals_nhwc():
    m = _module(n_win=3, topk=2, backend="reference").double()
    c = _module(n_win=3, topk=2, backend="reference", data_format="NCHW").double()
    c.load_state_dict(m.state_dict())
    x = torch.randn(1, 9, 12, 32, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(c(x.permute(0, 3, 1, 2)), m(x).permute(0, 3, 1, 2), rtol=1e-12, atol=1e-12)


def test_pad_tokens_are_never_routed_or_attended():
    grid = RegionGrid(9, 9, 7)  # regions of 2x2 tokens, the last grid row/column all padding
    assert grid.is_padded and grid.padded_h == 14
    real = grid.real_regions()
    assert int(real.sum()) == 25  # 5 x 5 regions hold real tokens
    m = _module(n_win=7, topk=25, backend="reference")
    _, routing = m(torch.randn(1, 9, 9, 32, device=DEVICE), return_routing=True)
    assert bool(real.to(DEVICE)[routing.region_ids].all())


def test_region_major_round_trip():
    grid = RegionGrid(7, 10, 3)
    x = torch.randn(2, 7, 10, 5)
    t = grid.to_region_major(x)
    assert t.shape == (2, grid.seq_len, 5)
    torch.testing.assert_close(grid.from_region_major(t), x, rtol=0, atol=0)
    # Region r holds the tokens of grid cell (r // 3, r % 3), row by row.
    r, T = 4, grid.tokens_per_region
    torch.testing.assert_close(t[:, r * T:(r + 1) * T].view(2, 3, 4, 5), x[:, 3:6, 4:8])


@pytest.mark.parametrize("kwargs,match", [
    (dict(topk=10), "topk must be an int in \\[1, n_win\\*\\*2 = 9\\]"),
    (dict(data_format="CHW"), "data_format must be one of"),
    (dict(heads=3), "multiples of num_heads"),
    (dict(side_dwconv=4), "odd kernel size"),
    (dict(impl="fast"), "impl must be one of"),
])
def test_bad_configurations_raise(kwargs, match):
    with pytest.raises(RouteError, match=match):
        _module(**kwargs)


def test_wrong_channels_raise():
    with pytest.raises(RouteError, match="built for dim=32"):
        _module()(torch.randn(1, 6, 6, 16, device=DEVICE))


@pytest.mark.parametrize("hw,n_win", [((12, 12), 3), ((10, 11), 3), ((7, 5), 2)])
def test_region_reorders_by_the_row_kernel_equal_the_permute_copies(hw, n_win, monkeypatch):
    """Where Triton runs, to/from region-major move whole rows with permute_rows' kernel (pad slots zero,
    pad pixels dropped, strided channels-contiguous inputs): equal, values and gradients, to the
    reshape-and-permute copies used elsewhere."""
    from routed.routers import regions2d

    grid = RegionGrid(*hw, n_win)
    g = torch.Generator().manual_seed(hw[0] * hw[1])
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    x = mk(2, *hw, 24)[..., :16].requires_grad_()  # rows strided
    tokens = mk(2, grid.seq_len, 40)[..., 8:24].requires_grad_()
    gy, gt = mk(2, grid.seq_len, 16), mk(2, *hw, 16).transpose(1, 2).contiguous().transpose(1, 2)
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(regions2d, "_rows_move_by_kernel", lambda t, k=kernel: k)
        y, t = grid.to_region_major(x), grid.from_region_major(tokens)
        results.append((y, t, *torch.autograd.grad((y * gy).sum() + (t * gt).sum(), (x, tokens))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
