"""TokenRoute through the Triton backend (gathered into a block-diagonal route on the block-sparse
kernels) against the float64 definition: one dense masked attention per group, summed with weights."""

import pytest
import torch

from routed import TokenRoute, routed_attention
from routed.testing import assert_close_rel, assert_grads_close_rel, poisoned_outputs, token_route_dense_f64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, hq, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(DEVICE).requires_grad_() for h in (hq, hkv, hkv)]


def _route(b, h, n, groups, size, causal, seed, weighted=False, fill=0.85, overlap=True):
    g = torch.Generator().manual_seed(seed + 50)
    if overlap:  # each group draws its tokens independently: tokens may sit in several groups
        rows = [torch.randperm(n, generator=g)[:size] for _ in range(b * h * groups)]
    else:  # a partition of a random permutation
        rows = [torch.randperm(n, generator=g)[: groups * size].view(groups, size) for _ in range(b * h)]
    ids = torch.stack(rows).view(b, h, groups, -1).to(torch.int32)
    ids = torch.where(torch.rand(ids.shape, generator=g) > fill, torch.full_like(ids, -1), ids)
    w = torch.rand(ids.shape, generator=g) if weighted else None
    return TokenRoute(ids.to(DEVICE), n, weights=None if w is None else w.to(DEVICE), causal=causal)


def _check(q, k, v, route):
    scale = q.shape[-1] ** -0.5
    with poisoned_outputs():
        out, lse = routed_attention(q, k, v, route, backend="triton", return_lse=True)
    ref = token_route_dense_f64(q, k, v, route, scale)
    base = token_route_dense_f64(q, k, v, route, scale, dtype=q.dtype)
    assert_close_rel(out, ref, base, what="out")
    ref_out, ref_lse = routed_attention(q.double(), k.double(), v.double(), route, backend="reference",
                                        return_lse=True)
    assert_close_rel(lse, ref_lse, floor=1e-5, what="lse")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    assert_grads_close_rel(out, ref, base, (q, k, v), do)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("route_heads", [1, 2, 6])
def test_token_route_triton_head_layouts(causal, route_heads):
    q, k, v = _inputs(2, 6, 2, 90, 16, seed=route_heads)
    _check(q, k, v, _route(2, route_heads, 90, groups=3, size=20, causal=causal, seed=route_heads))


@pytest.mark.parametrize("weighted", [False, True])
def test_token_route_triton_weights_and_partition(weighted):
    q, k, v = _inputs(1, 4, 4, 200, 16, seed=7)
    _check(q, k, v, _route(1, 4, 200, groups=4, size=50, causal=True, seed=7, weighted=weighted, overlap=False))


def test_token_route_triton_long_groups_use_wider_blocks():
    q, k, v = _inputs(1, 2, 1, 300, 16, seed=9)
    _check(q, k, v, _route(1, 1, 300, groups=3, size=100, causal=True, seed=9, fill=1.0))
