"""Route builders, conversions and density."""

import math

import pytest
import torch

from routed import BlockRoute, TokenRoute, causal_dense_route, random_block_route, sliding_window_route
from routed.testing import block_route_token_mask


def test_from_block_mask_round_trip():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 5, 7, generator=g) < 0.5
    route = BlockRoute.from_block_mask(mask, q_len=70, kv_len=100, q_block_size=16, kv_block_size=16)
    assert torch.equal(route.to_block_mask(), mask)
    assert torch.equal(route.kv_block_counts, mask.sum(-1).int())
    # Ids are sorted, padded with -1, and name exactly the True columns.
    for b, h, i in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
        n = int(route.kv_block_counts[b, h, i])
        assert route.kv_block_ids[b, h, i, :n].tolist() == mask[b, h, i].nonzero().flatten().tolist()
        assert (route.kv_block_ids[b, h, i, n:] == -1).all()
    wide = BlockRoute.from_block_mask(mask, q_len=70, kv_len=100, q_block_size=16, max_blocks=9)
    assert wide.max_blocks == 9 and torch.equal(wide.to_block_mask(), mask)


def test_sliding_window_route():
    r = sliding_window_route(200, block_size=32, window_blocks=3, causal=True)
    bm = r.to_block_mask()[0, 0]
    for i in range(r.num_q_blocks):
        assert bm[i].nonzero().flatten().tolist() == list(range(max(0, i - 2), i + 1))
    tok = block_route_token_mask(r)[0, 0]
    i, j = torch.meshgrid(torch.arange(200), torch.arange(200), indexing="ij")
    assert torch.equal(tok, (j <= i) & (j // 32 >= i // 32 - 2))
    both = sliding_window_route(200, block_size=32, window_blocks=2, causal=False).to_block_mask()[0, 0]
    assert both[3].nonzero().flatten().tolist() == [2, 3, 4]


@pytest.mark.parametrize("q_len,kv_len,block,window,causal", [
    (128, 128, 16, 2, True), (100, 100, 16, 3, True), (1, 77, 16, 4, True), (32, 96, 16, 8, True), (5, 5, 16, 2, True),
    (64, 200, 8, 3, True), (128, 128, 16, 2, False), (37, 37, 8, 5, False), (16, 16, 16, 3, False)])
def test_sliding_window_route_is_the_window_mask(q_len, kv_len, block, window, causal):
    """Built by arithmetic (fixed width, -1 padded): the same blocks as the window written as a block
    mask, sorted, a valid route, with a width that never depends on the data."""
    r = sliding_window_route(q_len, kv_len, block_size=block, window_blocks=window, causal=causal)
    nqb, nkb = math.ceil(q_len / block), math.ceil(kv_len / block)
    last = torch.clamp((torch.arange(nqb) + 1) * block - 1, max=q_len - 1) + (kv_len - q_len)
    diag, kb = last // block, torch.arange(nkb)
    mask = (kb[None, :] >= diag[:, None] - (window - 1)) & (kb[None, :] <= diag[:, None] + (0 if causal else window - 1))
    assert torch.equal(r.to_block_mask()[0, 0], mask)
    assert r.max_blocks == min(window if causal else 2 * window - 1, nkb)
    BlockRoute(r.kv_block_ids, r.kv_block_counts, q_len, kv_len, block, block, causal=causal)  # validates


def test_sliding_window_with_kv_cache_alignment():
    # 40 queries at the end of 200 keys: the last query block sits on the last key block.
    r = sliding_window_route(40, 200, block_size=32, window_blocks=1, causal=True)
    assert r.kv_block_ids[0, 0, :, 0].tolist() == [5, 6]
    assert r.resolved_q_positions()[0, 0].item() == 160


def test_density():
    assert causal_dense_route(256, block_size=64).density() == pytest.approx(1.0)
    full = BlockRoute.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), q_len=256, kv_len=256,
                                      q_block_size=64, causal=False)
    assert full.density() == pytest.approx(1.0)
    diag = sliding_window_route(256, block_size=64, window_blocks=1, causal=True)
    assert diag.density() == pytest.approx(4 / 10)  # 4 of the 10 causal block pairs
    assert "density 0.400" in diag.describe()


def test_random_block_route_keeps_diagonal_and_causality():
    r = random_block_route(1000, block_size=64, blocks=5, heads=3, batch=2, causal=True,
                           generator=torch.Generator().manual_seed(1))
    bm = r.to_block_mask()
    nqb = math.ceil(1000 / 64)
    assert bm[..., torch.arange(nqb), torch.arange(nqb)].all()
    assert not bm.triu(1).any()
    assert torch.equal(r.kv_block_counts, torch.clamp(torch.arange(1, nqb + 1), max=5).int().expand(2, 3, -1))


def test_token_route_density_and_mask():
    ids = torch.tensor([[[[0, 2, 4, -1], [1, 3, -1, -1]]]], dtype=torch.int32)
    r = TokenRoute(ids, 5, causal=True)
    assert r.density() == pytest.approx((6 + 3) / 15)
    m = r.to_token_mask()[0, 0]
    assert m[4].tolist() == [True, False, True, False, True]
    assert m[3].tolist() == [False, True, False, True, False]
