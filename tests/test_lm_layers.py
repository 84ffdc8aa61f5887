"""The LM attention layers: dense modes equal a plain SDPA layer with the same weights; routed
modes equal a float64 masked attention over their own route; NSA equals its branches written
out; bad options raise."""

import types

import pytest
import torch
import torch.nn.functional as F

from routed.layers.lm_attention import DenseAttention, MoBAAttention, SlidingWindowAttention, apply_rotary
from routed.layers.nsa import NSAAttention
from routed.layers.registry import attention_class
from routed.route import RouteError
from routed.routers.blocks import compressed_positions
from routed.testing import block_route_token_mask, dense_attention_f64

CLASSES = [DenseAttention, SlidingWindowAttention, MoBAAttention, NSAAttention]


def _config(**kw):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_block_size=16,
                window_blocks=2, moba_top_k=2, nsa_compress_block=8, nsa_compress_stride=4, nsa_top_n=3,
                max_position_embeddings=256, attention_backend="reference", router_backend="reference")
    base.update(kw)
    return types.SimpleNamespace(**base)


def _rope(n, d=16, batch=2, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.arange(n, dtype=torch.float64)[:, None] * inv
    e = torch.cat([f, f], -1)
    return e.cos().to(dtype).expand(batch, -1, -1), e.sin().to(dtype).expand(batch, -1, -1)


def _qkv_f64(layer, x, pe):
    """The layer's projections and rotary, recomputed in float64 from its weights."""
    B, N, _ = x.shape
    x = x.double()
    lin = lambda m: F.linear(x, m.weight.double(), None if m.bias is None else m.bias.double())  # noqa: E731
    q = lin(layer.q_proj).view(B, N, layer.num_heads, 16).transpose(1, 2)
    k = lin(layer.k_proj).view(B, N, layer.num_kv_heads, 16).transpose(1, 2)
    v = lin(layer.v_proj).view(B, N, layer.num_kv_heads, 16).transpose(1, 2)
    cos, sin = (t.double() for t in pe)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def _sdpa_layer_f64(layer, x, pe):
    """A plain causal SDPA attention layer with the same weights, in float64."""
    q, k, v = _qkv_f64(layer, x, pe)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return F.linear(o, layer.o_proj.weight.double())


@pytest.mark.parametrize("cls", CLASSES)
def test_dense_mode_equals_plain_sdpa_layer(cls):
    torch.manual_seed(0)
    layer = cls(_config(attention_dense=True), 0)
    x = torch.randn(2, 50, 64)
    pe = _rope(50)
    out, aux = layer(x, pe)
    assert aux is None
    torch.testing.assert_close(out.double(), _sdpa_layer_f64(layer, x, pe), rtol=1e-4, atol=1e-5)


def test_registry_names():
    assert attention_class("dense") is DenseAttention
    assert attention_class("sliding_window") is SlidingWindowAttention
    assert attention_class("moba") is MoBAAttention
    assert attention_class("nsa") is NSAAttention


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("cls", [SlidingWindowAttention, MoBAAttention])
def test_routed_layer_equals_masked_attention_over_its_route(cls, backend):
    torch.manual_seed(1)
    layer = cls(_config(attention_backend=backend), 0)
    x = torch.randn(2, 70, 64)
    pe = _rope(70)
    out, _ = layer(x, pe)
    q, k, v = _qkv_f64(layer, x, pe)
    if cls is MoBAAttention:
        route = layer.router(q.float(), k.float())
    else:
        from routed.routers.static import sliding_window_route

        route = sliding_window_route(70, block_size=16, window_blocks=2)
    o, _ = dense_attention_f64(q, k, v, block_route_token_mask(route), 16 ** -0.5)
    ref = F.linear(o.transpose(1, 2).reshape(2, 70, -1), layer.o_proj.weight.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_moba_with_every_block_equals_dense():
    torch.manual_seed(2)
    cfg = _config(moba_top_k=16)
    layer = MoBAAttention(cfg, 0)
    x, pe = torch.randn(1, 64, 64), _rope(64, batch=1)
    torch.testing.assert_close(layer(x, pe)[0].double(), _sdpa_layer_f64(layer, x, pe), rtol=1e-4, atol=1e-5)


def _nsa_f64(layer, x, pe):
    """NSA written out in float64: compressed keys/values from the layer's weights, compressed
    attention over the blocks that ended, the layer's own selection route, a token-mask window,
    the gated sum."""
    B, N, _ = x.shape
    q, k, v = _qkv_f64(layer, x, pe)
    lb, st = layer.compress_block, layer.compress_stride
    ends = compressed_positions(N, lb, st)
    def comp(t, lin):  # block i: tokens i*st .. i*st+lb-1, token-major, through the linear map
        blocks = [t[:, :, e - lb + 1:e + 1].reshape(B, t.shape[1], -1) for e in ends.tolist()]
        if not blocks:
            return t.new_zeros(B, t.shape[1], 0, 16)
        return torch.stack(blocks, 2) @ lin.weight.double().T

    kc, vc = comp(k, layer.compress_k), comp(v, layer.compress_v)
    cmask = ends[None, :] <= torch.arange(N)[:, None]
    if len(ends):
        o_cmp, lse = dense_attention_f64(q, kc, vc, cmask[None, None], 16 ** -0.5)
    else:
        o_cmp, lse = torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    route = layer.router(q.float(), kc.float(), lse.float(), N)
    o_slc, _ = dense_attention_f64(q, k, v, block_route_token_mask(route), 16 ** -0.5)
    pos = torch.arange(N)
    win = (pos[None, :] <= pos[:, None]) & (pos[None, :] // 16 > pos[:, None] // 16 - layer.window_blocks)
    o_win, _ = dense_attention_f64(q, k, v, win[None, None], 16 ** -0.5)
    g = torch.sigmoid(F.linear(x.double(), layer.gate.weight.double(), layer.gate.bias.double()))
    g = g.view(B, N, 3, -1).permute(2, 0, 3, 1).unsqueeze(-1)
    o = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
    return F.linear(o.transpose(1, 2).reshape(B, N, -1), layer.o_proj.weight.double())


@pytest.mark.parametrize("backend,n", [("reference", 70), ("triton", 70), ("reference", 5), ("triton", 150),
                                       ("reference", 150)])
def test_nsa_equals_its_branches_written_out(backend, n):
    torch.manual_seed(3)
    layer = NSAAttention(_config(attention_backend=backend, router_backend=backend), 0)
    with torch.no_grad():  # non-trivial compression and gates
        layer.compress_k.weight.add_(0.05 * torch.randn_like(layer.compress_k.weight))
        layer.gate.weight.normal_(0, 0.3)
    x, pe = torch.randn(2, n, 64), _rope(n)
    out, _ = layer(x, pe)
    torch.testing.assert_close(out.double(), _nsa_f64(layer, x, pe), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    # Shorter than one compressed block, the compressed branch (and its parameters) is unused.
    names = ("compress_k", "compress_v", "gate", "q_proj") if n >= 8 else ("gate", "q_proj")
    for name in names:
        grad = getattr(layer, name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_nsa_compression_starts_as_mean_pooling():
    layer = NSAAttention(_config(), 0)
    k = torch.randn(1, 2, 20, 16)
    kc = layer.compress_k(layer.compress(k))
    torch.testing.assert_close(kc[:, :, 1], k[:, :, 4:12].mean(2))


def test_bad_layer_options_raise_clear_errors():
    with pytest.raises(RouteError, match="moba_top_k=17 exceeds the 16 key blocks"):
        MoBAAttention(_config(moba_top_k=17), 0)
    with pytest.raises(RouteError, match="compress_stride=3 must divide"):
        NSAAttention(_config(nsa_compress_stride=3), 0)
    with pytest.raises(RouteError, match="multiple of num_key_value_heads=3"):
        DenseAttention(_config(num_key_value_heads=3), 0)
    with pytest.raises(RouteError, match="window_blocks must be an int >= 1, got 0"):
        SlidingWindowAttention(_config(window_blocks=0), 0)
    with pytest.raises(RouteError, match="nsa_top_n=20 exceeds"):
        NSAAttention(_config(nsa_top_n=20), 0)
