"""Bad input gets a clear error that says what is wrong."""

import pytest
import torch

from routed import BackendUnavailable, BlockRoute, RouteError, TokenRoute, routed_attention, sliding_window_route


def _route(**kw):
    ids = torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32)
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    args = dict(kv_block_ids=ids, kv_block_counts=counts, q_len=32, kv_len=32, q_block_size=16, kv_block_size=16)
    args.update(kw)
    return BlockRoute(**args)


def _qkv(hq=2, hkv=2, n=32, d=8):
    return torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)


def test_valid_route_passes():
    q, k, v = _qkv()
    assert routed_attention(q, k, v, _route()).shape == (1, 2, 32, 8)


@pytest.mark.parametrize("ids,counts,match", [
    ([[0, -1], [0, 2]], [1, 2], "out of range"),
    ([[0, -1], [1, 0]], [1, 2], "not strictly increasing"),
    ([[0, -1], [1, 1]], [1, 2], "not strictly increasing"),
    ([[0, 1], [0, 1]], [1, 2], "past kv_block_counts but is not -1"),
    ([[0, -1], [0, 1]], [1, 3], r"must lie in \[0, 2\]"),
    ([[-1, -1], [0, 1]], [1, 2], "out of range"),
])
def test_bad_block_ids(ids, counts, match):
    with pytest.raises(RouteError, match=match):
        _route(kv_block_ids=torch.tensor([[ids]], dtype=torch.int32),
               kv_block_counts=torch.tensor([[counts]], dtype=torch.int32))


def test_wrong_index_dtype():
    with pytest.raises(RouteError, match="must be int32"):
        _route(kv_block_ids=torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int64))
    with pytest.raises(RouteError, match="must be int32 or int64"):
        TokenRoute(torch.zeros(1, 1, 1, 2, dtype=torch.float32), 4)


def test_wrong_route_shapes():
    with pytest.raises(RouteError, match="must be 4-D"):
        _route(kv_block_ids=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(RouteError, match="needs ceil"):
        _route(q_len=64)
    with pytest.raises(RouteError, match="kv_block_counts must have shape"):
        _route(kv_block_counts=torch.ones(1, 1, 3, dtype=torch.int32))
    with pytest.raises(RouteError, match=r"q_positions must have shape \[32\]"):
        _route(causal=True, q_positions=torch.arange(31, dtype=torch.int32))


def test_wrong_rank_and_heads():
    q, k, v = _qkv()
    with pytest.raises(RouteError, match="must be 4-D"):
        routed_attention(q[0], k, v, _route())
    q, k, v = _qkv(hq=3, hkv=2)
    with pytest.raises(RouteError, match="multiple of the number of key/value heads"):
        routed_attention(q, k, v, _route())
    q, k, v = _qkv(hq=4, hkv=2)
    route3 = _route(kv_block_ids=torch.tensor([[[0, -1], [0, 1]]] * 3, dtype=torch.int32)[None],
                    kv_block_counts=torch.tensor([[1, 2]] * 3, dtype=torch.int32)[None])
    with pytest.raises(RouteError, match="the route has 3 heads"):
        routed_attention(q, k, v, route3)


def test_route_for_other_lengths():
    q, k, v = _qkv(n=48)
    with pytest.raises(RouteError, match="built for q_len=32"):
        routed_attention(q, k, v, _route())


def test_mixed_dtypes_and_devices():
    q, k, v = _qkv()
    with pytest.raises(RouteError, match="share a dtype"):
        routed_attention(q, k.double(), v, _route())
    with pytest.raises(RouteError, match="one device"):
        routed_attention(q, k.to("meta"), v, _route())
    meta_route = BlockRoute(torch.zeros(1, 1, 2, 1, dtype=torch.int32, device="meta"),
                            torch.ones(1, 1, 2, dtype=torch.int32, device="meta"), 32, 32, 16, 16, validate=False)
    with pytest.raises(RouteError, match="route is on meta"):
        routed_attention(q, k, v, meta_route)
    with pytest.raises(RouteError, match="move them to one device"):
        _route(kv_block_counts=torch.tensor([[[1, 2]]], dtype=torch.int32, device="meta"))


def test_bad_token_route():
    with pytest.raises(RouteError, match="out of range"):
        TokenRoute(torch.tensor([[[[0, 5]]]]), 5)
    with pytest.raises(RouteError, match="twice"):
        TokenRoute(torch.tensor([[[[3, 1, 3]]]]), 5)
    with pytest.raises(RouteError, match="shape of token_ids"):
        TokenRoute(torch.tensor([[[[3, 1]]]]), 5, weights=torch.ones(1, 1, 1, 3))
    q, k, v = _qkv(n=32)
    with pytest.raises(RouteError, match="seq_len=5"):
        routed_attention(q, k, v, TokenRoute(torch.tensor([[[[3, 1]]]]), 5))


def test_unknown_and_unavailable_backend():
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        routed_attention(q, k, v, _route(), backend="nope")


def test_sliding_window_bad_arguments():
    with pytest.raises(RouteError, match="window_blocks must be >= 1"):
        sliding_window_route(64, block_size=16, window_blocks=0)


def test_segments_must_come_together_and_cu_seqlens_checked():
    from routed import segment_ids_from_cu_seqlens

    with pytest.raises(RouteError, match="q_segments and kv_segments together"):
        _route(q_segments=torch.zeros(32, dtype=torch.int32))
    with pytest.raises(RouteError, match="start at 0 and end at 10"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 4, 9]), 10)
    with pytest.raises(RouteError, match="non-decreasing"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 6, 4, 10]))
