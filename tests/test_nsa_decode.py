"""NSA under a KV cache: the compressed blocks are cached beside it and extended, never recomputed.

Incremental decoding and chunked prefill equal the full forward (float64); a decode step compresses
at most one block's tokens whatever the cache length; a cache the layer never saw is compressed
once; crops are followed, reorders invalidate the record, and a cache that does not append raises;
``generate()`` of a routed LM with NSA layers equals greedy decoding without a cache.
"""

import copy
import types

import pytest
import torch
from transformers.cache_utils import DynamicCache, StaticCache

from routed.layers.nsa import NSAAttention
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM
from routed.route import RouteError

# (compress_block, compress_stride): overlapping blocks (stride divides the block, 2 or 4 per token)
# and disjoint ones (stride equal to the block).
GEOMETRIES = [(8, 4), (16, 4), (8, 8)]


def _layer(compress_block=8, compress_stride=4, **kw):
    """A float64 NSA layer with non-trivial compression and gates; per-query routing (exact under decoding)."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_block_size=16,
               window_blocks=2, nsa_compress_block=compress_block, nsa_compress_stride=compress_stride, nsa_top_n=3,
               route_q_block_size=1, max_position_embeddings=256, attention_backend="reference",
               router_backend="reference")
    cfg.update(kw)
    layer = NSAAttention(types.SimpleNamespace(**cfg), 0).double().eval()
    with torch.no_grad():
        for lin in (layer.compress_k, layer.compress_v):
            lin.weight.add_(0.05 * torch.randn_like(lin.weight))
        layer.gate.weight.normal_(0, 0.3)
    return layer


def _rope(n, d=16, batch=2):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.arange(n, dtype=torch.float64)[:, None] * inv
    e = torch.cat([f, f], -1)
    return e.cos().expand(batch, -1, -1), e.sin().expand(batch, -1, -1)


def _run(layer, x, pe, bounds, cache):
    """The layer over ``x [B, N, hidden]`` in calls ``x[:, a:b]`` for consecutive ``bounds``, on ``cache``."""
    cos, sin = pe
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        outs.append(layer(x[:, a:b], (cos[:, a:b], sin[:, a:b]), past_key_values=cache)[0])
    return torch.cat(outs, 1)


class _CompressSpy:
    """Counts the tokens handed to ``layer.compress`` (keys and values) per call."""

    def __init__(self, layer):
        self.tokens, orig = [], layer.compress

        def spy(x):
            self.tokens.append(x.shape[2])
            return orig(x)

        layer.compress = spy


@pytest.mark.parametrize("lb,st", GEOMETRIES, ids=[f"{a}/{b}" for a, b in GEOMETRIES])
def test_decode_equals_full_forward(lb, st):
    """Prefill 21 tokens (mid-block), then one token at a time to 75: every compression-block boundary
    in between is crossed by a decode step."""
    layer = _layer(lb, st)
    n = 75
    x, pe = torch.randn(2, n, 64, dtype=torch.float64), _rope(n)
    with torch.no_grad():
        full = layer(x, pe)[0]
        steps = _run(layer, x, pe, [0, 21, *range(22, n + 1)], DynamicCache())
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lb,st", GEOMETRIES, ids=[f"{a}/{b}" for a, b in GEOMETRIES])
def test_chunked_prefill_then_decode_equals_full_forward(lb, st):
    layer = _layer(lb, st)
    n = 70
    x, pe = torch.randn(1, n, 64, dtype=torch.float64), _rope(n, batch=1)
    with torch.no_grad():
        full = layer(x, pe)[0]
        # chunks shorter than a block, across block boundaries, one of a single token, then decoding
        parts = _run(layer, x, pe, [0, 5, 18, 19, 37, 41, 58, *range(59, n + 1)], DynamicCache())
    torch.testing.assert_close(parts, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lb,st", GEOMETRIES, ids=[f"{a}/{b}" for a, b in GEOMETRIES])
def test_decode_step_compresses_only_new_blocks(lb, st):
    """A decode step hands at most ``compress_block`` tokens to the compression, however long the cache,
    and the cached compressed keys are extended (the earlier blocks kept as they were), not recomputed."""
    layer = _layer(lb, st)
    n, prefill = 120, 40
    x, pe = torch.randn(2, n, 64, dtype=torch.float64), _rope(n)
    cache = DynamicCache()
    spy = _CompressSpy(layer)
    with torch.no_grad():
        _run(layer, x, pe, [0, prefill], cache)
        assert spy.tokens == [prefill, prefill]  # keys and values, once
        previous = layer._compressed_caches[cache].k_cmp
        for t in range(prefill, n):
            spy.tokens.clear()
            _run(layer, x, pe, [t, t + 1], cache)
            assert all(rows <= lb for rows in spy.tokens), (t, spy.tokens)
            k_cmp = layer._compressed_caches[cache].k_cmp
            assert k_cmp.shape[2] == layer.num_compressed(t + 1)
            assert k_cmp.shape[2] - previous.shape[2] == len(spy.tokens) // 2 <= 1  # one new block at most
            assert torch.equal(k_cmp[:, :, : previous.shape[2]], previous)
            previous = k_cmp
        # The record equals compressing the whole cache at once.
        k_all = cache.layers[0].keys
        torch.testing.assert_close(previous, layer.compress_k(layer.compress(k_all)), rtol=1e-12, atol=1e-12)


def test_cache_this_layer_never_saw_is_compressed_once_then_extended():
    """A cache filled by another copy of the layer (same weights, its own record): the first step
    compresses the whole cache, later steps only their new blocks; the logits stay exact."""
    layer = _layer()
    other = copy.deepcopy(layer)
    n, prefill = 60, 33
    x, pe = torch.randn(2, n, 64, dtype=torch.float64), _rope(n)
    cache = DynamicCache()
    spy = _CompressSpy(layer)
    with torch.no_grad():
        full = layer(x, pe)[0]
        spy.tokens.clear()
        head = _run(other, x, pe, [0, prefill], cache)
        tail = _run(layer, x, pe, [*range(prefill, n + 1)], cache)
    assert spy.tokens[:2] == [prefill + 1, prefill + 1]
    assert max(spy.tokens[2:]) <= layer.compress_block
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-10, atol=1e-10)


def test_dense_prefill_cache_then_routed_decode():
    """The same layer in dense mode fills the cache (no record kept), then decodes routed: the record is
    built from the cached keys, and the routed steps equal the routed full forward's last rows."""
    layer = _layer()
    n, prefill = 50, 30
    x, pe = torch.randn(1, n, 64, dtype=torch.float64), _rope(n, batch=1)
    cache = DynamicCache()
    with torch.no_grad():
        full = layer(x, pe)[0]
        layer.dense_mode = True
        _run(layer, x, pe, [0, prefill], cache)
        assert cache not in layer._compressed_caches
        layer.dense_mode = False
        tail = _run(layer, x, pe, [*range(prefill, n + 1)], cache)
    torch.testing.assert_close(tail, full[:, prefill:], rtol=1e-10, atol=1e-10)


def test_crop_is_followed_without_recompressing():
    """``cache.crop`` (assisted decoding) keeps the blocks that end in the kept prefix; decoding other
    tokens after it equals the full forward over the new sequence."""
    layer = _layer()
    n, cut = 64, 37
    x, pe = torch.randn(2, n, 64, dtype=torch.float64), _rope(n)
    y = torch.cat([x[:, :cut], torch.randn(2, n - cut, 64, dtype=torch.float64)], 1)
    cache = DynamicCache()
    spy = _CompressSpy(layer)
    with torch.no_grad():
        full = layer(y, pe)[0]
        _run(layer, x, pe, [0, 30, *range(31, 51)], cache)  # 50 tokens, 13 of them beyond the cut
        assert cache.get_seq_length() == 50
        cache.crop(-(50 - cut))
        spy.tokens.clear()
        tail = _run(layer, y, pe, [*range(cut, n + 1)], cache)
    assert max(spy.tokens) <= layer.compress_block  # the crop did not invalidate the record
    torch.testing.assert_close(tail, full[:, cut:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hold_old_keys", [False, True], ids=["old-keys-freed", "old-keys-held"])
@pytest.mark.parametrize("op", ["reorder_cache", "batch_select_indices"])
def test_reordered_cache_invalidates_the_record(op, hold_old_keys):
    """Beam search's reorder (and a batch selection) replace the cached keys in another batch order: the
    record is dropped and rebuilt from the keys, so the logits follow the new order (whether or not
    something still holds the replaced key tensor)."""
    layer = _layer()
    n, prefill = 48, 29
    x, pe = torch.randn(3, n, 64, dtype=torch.float64), _rope(n, batch=3)
    order = torch.tensor([2, 0, 0]) if op == "reorder_cache" else torch.tensor([1, 2])
    cache = DynamicCache()
    with torch.no_grad():
        full = layer(x[order], (pe[0][: len(order)], pe[1][: len(order)]))[0]
        _run(layer, x, pe, [0, prefill], cache)
        held = cache.layers[0].keys if hold_old_keys else None  # noqa: F841 (kept alive on purpose)
        getattr(cache, op)(order)
        xo = x[order]
        tail = _run(layer, xo, (pe[0][: len(order)], pe[1][: len(order)]), [*range(prefill, n + 1)], cache)
    torch.testing.assert_close(tail, full[:, prefill:], rtol=1e-10, atol=1e-10)


def _model(attention, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=len(attention), num_attention_heads=4,
                num_key_value_heads=2, attention_types=attention, attention_block_size=16, window_blocks=2,
                moba_top_k=2, nsa_compress_block=8, nsa_compress_stride=4, nsa_top_n=3, route_q_block_size=1,
                max_position_embeddings=128, attention_backend="reference", router_backend="reference")
    base.update(kw)
    return RoutedLMForCausalLM(RoutedLMConfig(**base)).double().eval()


@pytest.mark.parametrize("attention", [["nsa", "nsa"], ["dense", "nsa"]], ids=["nsa", "dense+nsa"])
def test_generate_equals_greedy_decoding_without_cache(attention):
    """generate() (DynamicCache, one token per step) equals greedy decoding by full forwards over 24 new
    tokens (6 compression strides), and its steps compress only their new blocks."""
    model = _model(attention)
    prompt = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    spies = [_CompressSpy(layer.self_attn) for layer in model.model.layers if isinstance(layer.self_attn, NSAAttention)]
    out = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for spy in spies:
        assert spy.tokens[:2] == [19, 19] and max(spy.tokens[2:]) <= 8
    ids = prompt
    with torch.no_grad():
        for _ in range(24):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("attention", ["nsa", "dense", "moba", "sliding_window"])
def test_cache_that_does_not_append_raises(attention):
    """A static cache returns its fixed-length buffer, not the cached keys plus the new ones: no LM
    attention layer can follow it, and each says so instead of attending to the buffer's empty slots."""
    model = _model([attention])
    cache = StaticCache(config=model.config, max_cache_len=64)
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), pytest.raises(RouteError, match="needs a KV cache that returns its 0 cached keys"):
        model(ids, cache=cache, use_cache=True)
