"""Cached geometry-only tensors and routes stay normal tensors when first built under inference
mode, so a model evaluated under ``torch.inference_mode()`` can train afterwards."""

import types

import pytest
import torch

from routed.layers.lm_attention import SlidingWindowAttention, block_window_route
from routed.layers.nsa import NSAAttention, _compressed_route
from routed.layers.routing_attention import local_window_route
from routed.routers.blocks import _queries_per_block, _query_block_extent
from routed.env import triton_runs_on
from routed.routers.regions2d import RegionGrid, _valid_tokens

# The Triton path saves the route for backward, where an inference tensor fails (CI runs the
# interpreter; a plain CPU run checks the reference path).
BACKEND = "triton" if triton_runs_on(torch.device("cpu")) else "reference"


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple):
        return [t for item in x for t in _tensors(item)]
    return [t for t in vars(x).values() if isinstance(t, torch.Tensor)]  # a route


@pytest.mark.parametrize("build", [
    lambda: _query_block_extent(301, 311, 16, 32, torch.device("cpu")),
    lambda: _queries_per_block(301, 17, torch.device("cpu")),
    lambda: block_window_route(303, 303, 16, 3, torch.device("cpu")),
    lambda: _compressed_route(305, 75, 305, 16, 8, 4, torch.device("cpu")),
    lambda: local_window_route(307, 16, torch.device("cpu")),
    lambda: _valid_tokens(RegionGrid(30, 29, 4), torch.device("cpu")),
])
def test_cached_constants_are_not_inference_tensors(build):
    with torch.inference_mode():
        first = build()
    again = build()
    assert _tensors(again) and all(a is b for a, b in zip(_tensors(first), _tensors(again)))  # cached
    assert not any(t.is_inference() for t in _tensors(again))


@pytest.mark.parametrize("cls", [SlidingWindowAttention, NSAAttention])
def test_layer_trains_after_inference_mode(cls):
    cfg = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                attention_block_size=16, window_blocks=2, moba_top_k=2, nsa_compress_block=8,
                                nsa_compress_stride=4, nsa_top_n=3, max_position_embeddings=256,
                                attention_backend=BACKEND, router_backend="reference")
    layer = cls(cfg, 0)
    n = 97  # a length no other test uses: the cached routes are built here, under inference mode
    pe = (torch.ones(1, n, 16), torch.zeros(1, n, 16))
    with torch.inference_mode():
        layer(torch.randn(1, n, 64), pe)
    x = torch.randn(1, n, 64, requires_grad=True)
    layer(x, pe)[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
