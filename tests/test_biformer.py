"""BiFormer backbones: timm registration, shapes at sizes that do not divide the region grid,
features_only maps, gradients, classifier reset, the static-window baseline and the standalone block.

Tiny configurations throughout (depth 1 per stage, small widths) so the file runs in seconds on a CPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import timm  # the vision extra (pip install -e '.[vision]'); CI installs it, so no skip

import routed.models  # noqa: F401  (registers the BiFormer entrypoints with timm)
from routed.layers.bra import BiLevelRoutingAttention
from routed.models.biformer import BiFormer, BRABlock, WindowRegionAttention, static_region_ids

TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), head_dim=16, topks=(1, 2, 4, -2), n_win=2)


def tiny(**kw) -> BiFormer:
    torch.manual_seed(0)
    return BiFormer(**{**TINY, "num_classes": 10, **kw}).eval()


def down(n: int, times: int) -> int:
    """Side after ``times`` 3x3 stride-2 convs with padding 1."""
    for _ in range(times):
        n = (n - 1) // 2 + 1
    return n


def test_timm_registry_and_create_model():
    names = timm.list_models("biformer*")
    assert {"biformer_tiny", "biformer_small", "biformer_base"} <= set(names)
    m = timm.create_model("biformer_tiny", num_classes=10, **{k: v for k, v in TINY.items()})
    assert isinstance(m, BiFormer) and m.num_classes == 10
    assert m.pretrained_cfg["architecture"] == "biformer_tiny" and not m.pretrained_cfg.get("url")
    y = m.eval()(torch.randn(1, 3, 40, 40))
    assert y.shape == (1, 10)


def test_full_size_configs_match_the_paper():
    # Parameter counts of the official models at 1000 classes: T 13.1M, S 25.5M, B 56.8M.
    for name, millions in (("biformer_tiny", 13.1), ("biformer_small", 25.5), ("biformer_base", 56.8)):
        with torch.device("meta"):   # shapes only: no memory, no init time
            m = timm.create_model(name)
        n = sum(p.numel() for p in m.parameters()) / 1e6
        assert abs(n - millions) < 0.25, (name, n)
        assert [len(s.blocks) for s in m.stages] == ([2, 2, 8, 2] if name == "biformer_tiny" else [4, 4, 18, 4])


def test_pretrained_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("biformer_tiny", pretrained=True)


@pytest.mark.parametrize("hw", [(37, 53), (64, 64), (29, 71)])
def test_forward_shapes_any_size(hw):
    H, W = hw
    m = tiny()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        f = m.forward_features(x)
        y = m(x)
    assert f.shape == (2, 64, down(H, 5), down(W, 5))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_padding_does_not_leak_between_images():
    # A batch of two and the same images run one at a time agree (eval mode: BatchNorm is per-channel).
    m = tiny()
    x = torch.randn(2, 3, 45, 39)
    with torch.no_grad():
        both = m(x)
        one = torch.cat([m(x[:1]), m(x[1:])])
    torch.testing.assert_close(both, one, atol=1e-5, rtol=1e-4)


def test_features_only_shapes_and_strides():
    H, W = 61, 83
    fm = timm.create_model("biformer_tiny", features_only=True, **TINY)
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    assert fm.feature_info.channels() == [16, 32, 48, 64]
    feats = fm.eval()(torch.randn(2, 3, H, W))
    assert [tuple(f.shape) for f in feats] == [(2, c, down(H, i + 2), down(W, i + 2))
                                               for i, c in enumerate([16, 32, 48, 64])]
    fm2 = timm.create_model("biformer_tiny", features_only=True, out_indices=(1, 3), **TINY)
    assert fm2.feature_info.reduction() == [8, 32]
    assert [f.shape[1] for f in fm2(torch.randn(1, 3, 64, 64))] == [32, 64]


def test_forward_intermediates_match_features_only():
    m = tiny()
    x = torch.randn(1, 3, 50, 50)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        only = m.forward_intermediates(x, indices=2, intermediates_only=True)
        ref = m.forward_features(x)
    assert [t.shape[1] for t in inter] == [16, 32, 48, 64]
    torch.testing.assert_close(final, ref)
    torch.testing.assert_close(only[0], inter[2])
    torch.testing.assert_close(only[1], inter[3])
    kept = m.prune_intermediate_layers(indices=(0, 1))
    assert kept == [0, 1] and len(m.stages) == 2


def test_gradients_reach_every_parameter():
    m = tiny().train()
    x = torch.randn(2, 3, 45, 50, requires_grad=True)
    loss = F.cross_entropy(m(x), torch.tensor([1, 7]))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert sum(int(p.grad.abs().sum() > 0) for p in m.parameters()) == len(list(m.parameters()))


def test_tiny_model_trains():
    torch.manual_seed(0)
    m = BiFormer(**{**TINY, "num_classes": 4, "in_chans": 1})
    x, y = torch.randn(8, 1, 40, 40), torch.arange(8) % 4
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_reset_classifier_and_forward_head():
    m = tiny()
    x = torch.randn(2, 3, 33, 33)
    m.reset_classifier(5)
    assert m(x).shape == (2, 5) and m.get_classifier().out_features == 5
    m.reset_classifier(0)
    assert m(x).shape == (2, 64)
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 64)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="max")


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="topk=5 must be in"):
        BiFormer(**{**TINY, "topks": (5, 2, 4, -2)})
    with pytest.raises(ValueError, match="one value per stage"):
        BiFormer(**{**TINY, "depths": (1, 1, 1)})
    with pytest.raises(ValueError, match="attn_type"):
        BiFormer(**{**TINY, "attn_type": "swin"})


def test_window_variant_same_parameters_and_shapes():
    bra, win = tiny(), tiny(attn_type="window")
    n_bra = sum(p.numel() for p in bra.parameters())
    n_win = sum(p.numel() for p in win.parameters())
    assert n_bra == n_win
    x = torch.randn(2, 3, 37, 41)
    with torch.no_grad():
        assert win(x).shape == bra(x).shape == (2, 10)
    r = win.routings(x)
    assert r[0][0].region_ids.shape == (2, 4, 1) and r[3] == [None]


@pytest.mark.parametrize("S,k", [(4, 1), (4, 4), (5, 4), (4, 3), (3, 9), (5, 2)])
def test_static_region_ids(S, k):
    ids = static_region_ids(S, k)
    assert ids.shape == (S * S, k)
    for r in range(S * S):
        row = ids[r].tolist()
        assert r in row and row == sorted(set(row)), (r, row)
        rr, cc = [i // S for i in row], [i % S for i in row]
        m = math.isqrt(k)
        if m * m == k:   # an m x m block of regions
            assert max(rr) - min(rr) == m - 1 and max(cc) - min(cc) == m - 1
        else:            # nearest regions: none outside is closer than the farthest inside
            d = [(a - r // S) ** 2 + (b - r % S) ** 2 for a, b in zip(rr, cc)]
            outside = [(i // S - r // S) ** 2 + (i % S - r % S) ** 2 for i in range(S * S) if i not in row]
            assert not outside or min(outside) >= max(d)


@pytest.mark.parametrize("hw", [(12, 12), (10, 13)])
def test_window_attention_with_every_region_is_dense_attention(hw):
    # topk = n_win**2: each query region sees every region, so the result is full attention over the
    # unpadded map (padding masked) plus LePE: an exact check of the gather, the masks and the layout.
    torch.manual_seed(0)
    H, W = hw
    dim, heads, S = 16, 2, 3
    attn = WindowRegionAttention(dim, num_heads=heads, n_win=S, topk=S * S, qk_dim=8).double()
    x = torch.randn(2, H, W, dim, dtype=torch.float64)
    y = attn(x)
    q, k, v = attn.qkv(x).split([8, 8, dim], dim=-1)

    def heads_first(t):
        return t.reshape(2, H * W, heads, -1).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=attn.scale)
    o = o.transpose(1, 2).reshape(2, H, W, dim) + attn.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, attn.wo(o))


def test_window_and_bra_agree_when_both_see_every_region():
    # Same parameters (state dicts load across), same kernels: with topk = n_win**2 routing has no
    # choice to make, so the two modules compute the same function.
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(24, num_heads=3, n_win=3, topk=9)
    win = WindowRegionAttention(24, num_heads=3, n_win=3, topk=9)
    win.load_state_dict(bra.state_dict())
    x = torch.randn(2, 11, 8, 24)
    torch.testing.assert_close(win(x), bra(x), atol=1e-5, rtol=1e-4)


def test_bra_block_standalone_nchw():
    torch.manual_seed(0)
    blk = BRABlock(32, num_heads=2, n_win=3, topk=2).eval()
    x = torch.randn(2, 32, 20, 17)
    with torch.no_grad():
        y = blk(x)
        y2, routing = blk(x, return_routing=True)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y2)
    assert routing.region_ids.shape == (2, 9, 2) and routing.grid.grid == 3
    ids = routing.region_ids
    assert int(ids.min()) >= 0 and int(ids.max()) < 9
    with pytest.raises(ValueError, match="NCHW"):
        blk(torch.randn(2, 20, 17))


def test_routings_of_the_model():
    m = tiny()
    r = m.routings(torch.randn(1, 3, 48, 48))
    assert len(r) == 4 and [len(s) for s in r] == [1, 1, 1, 1]
    assert [s[0].region_ids.shape[-1] for s in r[:3]] == [1, 2, 4]
    assert r[3][0] is None   # global attention
