"""The routed LM with mixture-of-experts MLPs: every router builds and trains, token choice equals a
float64 forward written out by hand, the similarity- and attention-aware routers are causal and the
attention-aware one mixes with the block's own attention, the balancing losses reach ``aux_loss``,
KV-cache decoding (incremental, chunked, generate()) is exact for token choice and the causal mixing
routers (whose gate records follow the cache and refuse a foreign one) and refused where it cannot
be, the mixing functions continue from past state exactly, bad configs raise."""

import pytest
import torch
import torch.nn.functional as F

from routed.layers.lm_attention import apply_rotary
from routed.layers.moe import RoutedMoE, moe_balance_loss
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM
from routed.ops.expert_dispatch import swiglu_expert
from routed.route import RouteError
from routed.routers.experts import ExpertRouter, attention_mixed_probs, similarity_mixed_probs
from routed.testing import assert_close_rel

V = 61
ROUTERS = ["token_choice", "similarity", "attention"]


def _config(router="token_choice", **kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, mlp_types="moe", num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=24, expert_router=router, router_z_loss_coef=1e-3)
    base.update(kw)
    return RoutedLMConfig(**base)


def _model(router="token_choice", seed=0, **kw):
    torch.manual_seed(seed)
    return RoutedLMForCausalLM(_config(router, **kw))


def _ids(B, N, seed=1):
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- build, train
@pytest.mark.parametrize("router,kw", [(r, {}) for r in ROUTERS] + [("expert_choice", {"expert_causal": False})],
                         ids=ROUTERS + ["expert_choice"])
def test_builds_backprops_and_learns(router, kw):
    model = _model(router, **kw).train()
    assert all(isinstance(layer.mlp, RoutedMoE) and layer.mlp.router.method == router for layer in model.model.layers)
    ids = _ids(4, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):  # fit one batch: the loss must fall well below its start
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss) and out.aux_loss is not None
        opt.zero_grad()
        out.loss.backward()
        if not losses:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert all(layer.mlp.router.weight.grad.abs().sum() > 0 for layer in model.model.layers)
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_aux_loss_is_the_layers_switch_and_z_losses():
    model = _model("similarity", router_aux_loss_coef=0.05, router_z_loss_coef=0.01).train()
    ids = _ids(2, 20)
    out = model(ids, labels=ids)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    want = sum(0.05 * layer.mlp.last.aux_loss + 0.01 * layer.mlp.last.z_loss for layer in model.model.layers)
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(out.aux_loss, moe_balance_loss(model))
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    # Balanced routing has a Switch loss of about 1 per layer; 0.05 * that is far from 0.
    assert float(out.aux_loss.detach()) > 0.05 * 0.5 * len(model.model.layers)
    none = _model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0, mlp_types="moe,dense")
    assert none(ids).aux_loss is None


# ----------------------------------------------------------------------- token choice vs float64 by hand
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = pos[:, None].double() * inv
    cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _hand_forward(model, ids):
    """The LM's float64 forward written out: explicit causal softmax attention, and for the MoE
    layers a per-token loop over its top-k experts of ``softmax(h W^T)`` (weights renormalised)."""
    c = model.config
    H, D, hq, hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    B, N = ids.shape
    x = model.model.embed_tokens.weight[ids]
    pos = torch.arange(N)
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    for layer in model.model.layers:
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, c.rms_norm_eps)
        q = _rotate((h @ a.q_proj.weight.T).view(B, N, hq, D).transpose(1, 2), pos, c.rope_theta)
        k = _rotate((h @ a.k_proj.weight.T).view(B, N, hkv, D).transpose(1, 2), pos, c.rope_theta)
        v = (h @ a.v_proj.weight.T).view(B, N, hkv, D).transpose(1, 2)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        o = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        x = x + o.transpose(1, 2).reshape(B, N, hq * D) @ a.o_proj.weight.T
        h = _rms(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
        m = layer.mlp
        if not isinstance(m, RoutedMoE):
            y = (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
        else:
            p = (h @ m.router.weight.T).softmax(-1)
            top = p.topk(c.num_experts_per_tok, -1)
            w = top.values / top.values.sum(-1, keepdim=True)
            y = torch.zeros_like(h)
            for b in range(B):
                for t in range(N):
                    for e, we in zip(top.indices[b, t].tolist(), w[b, t]):
                        y[b, t] += we * swiglu_expert(h[b, t:t + 1], m.gate_up_proj[e], m.down_proj[e])[0]
        x = x + y
    return _rms(x, model.model.norm.weight, c.rms_norm_eps) @ model.lm_head.weight.T


def test_token_choice_logits_equal_a_float64_forward_by_hand():
    # Large weights, so that the experts and the choice among them move the logits a lot.
    model = _model(mlp_types="moe,dense", initializer_range=0.3).double().eval()
    ids = _ids(2, 13)
    with torch.no_grad():
        got = model(ids).logits
        want = _hand_forward(model, ids)
        assert_close_rel(got, want, floor=1e-6, what="MoE LM logits")
        # The check can fail: the MoE layer's contribution is far above the tolerance.
        moe = model.model.layers[0].mlp
        moe.down_proj.mul_(0.5)
        assert (model(ids).logits - want).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------- causal
@pytest.mark.parametrize("router", ["similarity", "attention"])
def test_changing_a_future_token_never_changes_earlier_logits(router):
    # mix=1: the gate is all neighbours, so any leak would show.
    model = _model(router, expert_mix=1.0, initializer_range=0.2).eval()
    ids = _ids(2, 30)
    t = 17
    other = ids.clone()
    other[:, t:] = (ids[:, t:] + 7) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
        assert torch.equal(a[:, :t], b[:, :t])
        assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3
        # The same check catches non-causal mixing: the earlier routing then changes.
        leaky = _model(router, expert_mix=1.0, initializer_range=0.2, expert_causal=False).eval()
        probs = []
        for x in (ids, other):
            leaky(x)
            probs.append(leaky.model.layers[1].mlp.last.probs.view(2, 30, -1)[:, :t])
        assert (probs[0] - probs[1]).abs().max() > 1e-4


def _run_capturing_inputs(model, layer, ids):
    """Run ``model`` on ``ids``; return the decoder ``layer``'s input and its MoE's input."""
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0])),
             layer.mlp.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen["x"], seen["h"]


def _causal_softmax(s):
    N = s.shape[-1]
    return s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def test_similarity_router_without_projection_mixes_by_hidden_state_cosine():
    """``expert_similarity_dim=0``: the features are the MoE input itself, so the router adds no
    parameters (the benchmark's equal-parameter comparison) and ``S = softmax(cos(h_i, h_j) / T)``."""
    model = _model("similarity", expert_similarity_dim=0, expert_temperature=0.2, initializer_range=0.2)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _model().parameters())
    model = model.double().eval()
    layer = model.model.layers[0]
    _, h = _run_capturing_inputs(model, layer, _ids(2, 19))
    f = F.normalize(h, dim=-1)
    p = (h @ layer.mlp.router.weight.T).softmax(-1)
    want = 0.5 * p + 0.5 * _causal_softmax(f @ f.transpose(-1, -2) / 0.2) @ p
    assert_close_rel(layer.mlp.last.probs.view_as(want), want, floor=1e-6, what="similarity-mixed gate")
    assert (want - p).abs().max() > 1e-2


def test_attention_router_mixes_with_its_blocks_attention():
    """The attention-aware gate is ``(1 - mix) p + mix A p``, ``A`` the block's own (rotary, GQA)
    causal attention averaged over heads, here materialised in float64 from the layer's weights."""
    model = _model("attention", expert_mix=0.7, initializer_range=0.2).double().eval()
    layer = model.model.layers[1]
    ids = _ids(2, 21)
    x, h_moe = _run_capturing_inputs(model, layer, ids)
    with torch.no_grad():
        a, c = layer.self_attn, model.config
        B, N = ids.shape
        h = layer.input_layernorm(x)
        cos, sin = model.model.rotary_emb(h, torch.arange(N)[None].expand(B, -1))
        q = apply_rotary((h @ a.q_proj.weight.T).view(B, N, 4, -1).transpose(1, 2), cos, sin)
        k = apply_rotary((h @ a.k_proj.weight.T).view(B, N, 2, -1).transpose(1, 2), cos, sin).repeat_interleave(2, 1)
        s = (q @ k.transpose(-1, -2)) * c.head_dim ** -0.5
        A = _causal_softmax(s).mean(1)
        p = (h_moe @ layer.mlp.router.weight.T).softmax(-1)
        want = 0.3 * p + 0.7 * A @ p
        assert_close_rel(layer.mlp.last.probs.view(B, N, -1), want, floor=1e-6, what="attention-mixed gate")
        assert (want - p).abs().max() > 1e-2  # the mixing matters at these weights
        assert layer.self_attn.last_qk is None  # the layer does not keep q/k past the router


# ------------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def _greedy(model, prompt, new_tokens):
    """Greedy continuation by full forwards (no cache): what generate() must reproduce."""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    return ids


def test_token_choice_decodes_from_the_kv_cache():
    from transformers.cache_utils import DynamicCache

    model = _model(mlp_types="moe,dense", initializer_range=0.2).eval()
    ids = _ids(2, 26)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :15], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(15, 26)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    out = model.generate(ids[:1, :10], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy(model, ids[:1, :10], 5))


# Logit tolerance of cached vs full decoding in float64: the similarity router mixes the gates in
# float32 (the router's softmax runs in float32), so its logits agree to ~1e-7, not to float64.
DECODE_TOL = {"similarity": 1e-6, "attention": 1e-10}


def _decode(model, ids, chunks):
    """Logits of ``ids`` fed through one DynamicCache in ``chunks`` (``[(start, stop), ...]``), concatenated."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        return torch.cat([model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in chunks], 1), cache


def _mixing_model(router, N):
    """A float64 LM whose earlier tokens' gates move the routing a lot (large weights, mix=0.8), ids
    ``[2, N]`` and its full-forward logits."""
    model = _model(router, expert_mix=0.8, initializer_range=0.3).double().eval()
    ids = _ids(2, N)
    with torch.no_grad():
        return model, ids, model(ids).logits


@pytest.mark.parametrize("router", ["similarity", "attention"])
def test_mixing_routers_decode_from_the_kv_cache_exactly(router):
    model, ids, full = _mixing_model(router, 27)
    tol = DECODE_TOL[router]
    incremental = [(0, 11)] + [(t, t + 1) for t in range(11, 27)]  # prefill, then one token at a time
    chunked = [(0, 5), (5, 12), (12, 13), (13, 20), (20, 27)]  # chunked prefill, mid-chunk decode steps
    for chunks in (incremental, chunked, [(0, 1)] + [(t, t + 1) for t in range(1, 27)]):
        got, _ = _decode(model, ids, chunks)
        torch.testing.assert_close(got, full, rtol=tol, atol=tol)
    # The check can fail: decoding with wrong earlier gates (uniform ones) gives other logits.
    layer = model.model.layers[0]
    real = layer._past_gates

    def uniform(cache, cached_len):
        rec = real(cache, cached_len)
        return rec if rec is None else rec._replace(probs=torch.full_like(rec.probs, 1 / rec.probs.shape[-1]))

    layer._past_gates = uniform
    got, _ = _decode(model, ids, chunked)
    assert (got - full).abs().max() > 1e-3


@pytest.mark.parametrize("router", ["similarity", "attention"])
def test_mixing_routers_generate_with_the_cache_as_without(router):
    # mix=1 and large weights: decoding without the earlier gates changes the greedy tokens here.
    model = _model(router, expert_mix=1.0, initializer_range=0.5).eval()
    prompt = _ids(2, 9)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 17)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                           use_cache=False))
    assert torch.equal(out, _greedy(model, prompt, 8))


@pytest.mark.parametrize("router", ["similarity", "attention"])
def test_mixing_routers_follow_a_cropped_cache_and_refuse_a_foreign_one(router):
    model, ids, full = _mixing_model(router, 24)
    with torch.no_grad():
        # Crop (assisted decoding): the record keeps its prefix, decoding goes on exactly.
        _, cache = _decode(model, ids, [(0, 18)])
        cache.crop(-6)  # keep the first 12 tokens
        got = torch.cat([model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(12, 24)], 1)
        tol = DECODE_TOL[router]
        torch.testing.assert_close(got, full[:, 12:], rtol=tol, atol=tol)
        # A cache filled by another copy of the model: the earlier gates are unknown.
        _, cache = _decode(model, ids, [(0, 10)])
        other = _model(router, expert_mix=0.8, initializer_range=0.3).double().eval()
        with pytest.raises(ValueError, match="no record for this cache"):
            other(ids[:, 10:11], cache=cache, use_cache=True)
        # Reordered (beam search): the keys were replaced.
        cache.reorder_cache(torch.tensor([1, 0]))
        with pytest.raises(ValueError, match="keys were replaced"):
            model(ids[:, 10:11], cache=cache, use_cache=True)
        # A record that covers another length than the cache (here: forced out of step).
        _, cache = _decode(model, ids, [(0, 10)])
        layer = model.model.layers[0]
        rec = layer._gate_records[cache]
        layer._gate_records[cache] = rec._replace(probs=rec.probs[:, :9], kv_len=9)
        with pytest.raises(ValueError, match="record covers 9 tokens, the cache 10"):
            model(ids[:, 10:11], cache=cache, use_cache=True)


@pytest.mark.parametrize("router,kw", [("token_choice", {"expert_capacity_factor": 1.0}),
                                       ("expert_choice", {"expert_causal": False}),
                                       ("similarity", {"expert_causal": False}),
                                       ("attention", {"expert_capacity_factor": 2.0})],
                         ids=["capacity", "expert_choice", "non_causal_mixing", "mixing_with_capacity"])
def test_routers_that_cannot_decode_incrementally_refuse(router, kw):
    model = _model(router, **kw).eval()
    prompt = _ids(1, 9)
    with pytest.raises(ValueError, match="cannot decode from a KV cache"):
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(out, _greedy(model, prompt, 3))


# ------------------------------------------------------------------ mixing functions with past state
SPLITS = [(0, 19), (18, 1), (12, 7), (1, 18)]  # (earlier tokens T, new tokens N): full, decode, chunks


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,N", SPLITS)
def test_similarity_mixing_with_past_state_is_the_full_result_sliced(T, N, causal):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, T + N, 5, generator=g, dtype=torch.float64).softmax(-1)
    f = torch.randn(2, T + N, 7, generator=g, dtype=torch.float64)
    full = similarity_mixed_probs(p, f, causal=causal, temperature=0.3, mix=0.9)
    past = dict(past_probs=p[:, :T], past_features=f[:, :T]) if T else {}
    got = similarity_mixed_probs(p[:, T:], f[:, T:], causal=causal, temperature=0.3, mix=0.9, **past)
    torch.testing.assert_close(got, full[:, T:], rtol=1e-12, atol=1e-12)
    if T and N > 1 and causal:  # the earlier tokens matter, and the mask is aligned to the last N positions
        alone = similarity_mixed_probs(p[:, T:], f[:, T:], causal=True, temperature=0.3, mix=0.9)
        assert (alone - full[:, T:]).abs().max() > 1e-3
        top_left = similarity_mixed_probs(p, f, causal=True, temperature=0.3, mix=0.9)[:, :N]
        assert (got - top_left).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,N", SPLITS)
def test_attention_mixing_with_past_state_is_the_full_result_sliced(T, N, causal):
    g = torch.Generator().manual_seed(4)
    L = T + N
    p = torch.randn(2, L, 5, generator=g, dtype=torch.float64).softmax(-1)
    q = torch.randn(2, 6, L, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, L, 16, generator=g, dtype=torch.float64)
    past = dict(past_probs=p[:, :T]) if T else {}
    full = attention_mixed_probs(p, q=q, k=k, causal=causal, mix=0.8)
    got = attention_mixed_probs(p[:, T:], q=q[:, :, T:], k=k, causal=causal, mix=0.8, **past)
    torch.testing.assert_close(got, full[:, T:], rtol=1e-12, atol=1e-12)
    # From an explicit attention matrix (rows of the new tokens over all keys; future entries
    # included, which the causal router masks; it renormalises the head mean, so only the
    # non-causal result equals the q/k one).
    w = (q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 16 ** -0.5).softmax(-1)
    full_w = attention_mixed_probs(p, attn_weights=w, causal=causal, mix=0.8)
    if not causal:
        torch.testing.assert_close(full_w, full, rtol=1e-12, atol=1e-12)
    got_w = attention_mixed_probs(p[:, T:], attn_weights=w[:, :, T:], causal=causal, mix=0.8, **past)
    torch.testing.assert_close(got_w, full_w[:, T:], rtol=1e-12, atol=1e-12)


def test_mixing_past_state_errors_are_clear():
    p = torch.randn(1, 3, 4).softmax(-1)
    f = torch.randn(1, 3, 8)
    with pytest.raises(RouteError, match="both past_probs and past_features"):
        similarity_mixed_probs(p, f, causal=True, past_probs=p)
    with pytest.raises(RouteError, match=r"past_probs must be .*\[batch=1, cached, experts=4\]"):
        similarity_mixed_probs(p, f, causal=True, past_probs=torch.rand(1, 5, 3), past_features=torch.rand(1, 5, 8))
    with pytest.raises(RouteError, match=r"past_features must be \[batch=1, cached=5, dim=8\]"):
        similarity_mixed_probs(p, f, causal=True, past_probs=torch.rand(1, 5, 4), past_features=torch.rand(1, 4, 8))
    with pytest.raises(RouteError, match=r"k \[batch, kv_heads, cached \+ seq=8, dim\]"):
        attention_mixed_probs(p, q=torch.randn(1, 2, 3, 4), k=torch.randn(1, 2, 3, 4), causal=True,
                              past_probs=torch.rand(1, 5, 4))
    with pytest.raises(RouteError, match=r"attn_weights must be \[batch=1, heads, 3, 8\]"):
        attention_mixed_probs(p, attn_weights=torch.rand(1, 2, 3, 3), causal=True, past_probs=torch.rand(1, 5, 4))
    x = torch.randn(1, 3, 8)
    with pytest.raises(RouteError, match="the token_choice router takes no earlier state"):
        ExpertRouter(8, 4, method="token_choice")(x, past_probs=p)
    with pytest.raises(RouteError, match="a capacity .* cannot continue from earlier tokens"):
        ExpertRouter(8, 4, method="similarity", capacity_factor=1.0)(x, past_probs=p, past_features=f)


def test_checkpoint_round_trip_keeps_routers_and_selection_bias(tmp_path):
    model = _model("similarity", expert_similarity_dim=8, expert_balance_bias_rate=0.01).train()
    model(_ids(2, 16))  # moves the selection bias (auxiliary-loss-free balancing)
    bias = model.model.layers[0].mlp.router.selection_bias.clone()
    assert bias.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = RoutedLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mlp_types == ["moe", "moe"] and loaded.config.expert_router == "similarity"
    torch.testing.assert_close(loaded.model.layers[0].mlp.router.selection_bias, bias)
    ids = _ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


# --------------------------------------------------------------------------------------- bad configs
def test_bad_moe_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown mlp_types \['mo'\]"):
        _config(mlp_types="mo")
    with pytest.raises(ValueError, match="mlp_types has 3 entries but num_hidden_layers=2"):
        _config(mlp_types=["moe", "dense", "moe"])
    with pytest.raises(ValueError, match="expert_router must be one of"):
        _config("topk")
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be an int in \[1, num_experts=4\]"):
        _config(num_experts_per_tok=5)
    with pytest.raises(ValueError, match="expert_router='expert_choice' is not causal"):
        _config("expert_choice")
    with pytest.raises(ValueError, match="router_aux_loss_coef must be >= 0"):
        _config(router_aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match="does not expose"):
        _model("attention", attention_types=["mosa", "dense"])
    # Dense-MLP configs ignore the MoE fields entirely.
    assert _config("topk", mlp_types="dense").mlp_types == ["dense", "dense"]
