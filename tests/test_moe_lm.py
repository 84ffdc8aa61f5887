"""The routed LM with mixture-of-experts MLPs: every router builds and trains, token choice equals a
float64 forward written out by hand, the similarity- and attention-aware routers are causal and the
attention-aware one mixes with the block's own attention, the balancing losses reach ``aux_loss``,
KV-cache decoding is exact where it runs and refused where it cannot be, bad configs raise."""

import pytest
import torch
import torch.nn.functional as F

from routed.layers.lm_attention import apply_rotary
from routed.layers.moe import RoutedMoE, moe_balance_loss
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM
from routed.ops.expert_dispatch import swiglu_expert
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


@pytest.mark.parametrize("router,kw", [("similarity", {}), ("attention", {}),
                                       ("token_choice", {"expert_capacity_factor": 1.0})],
                         ids=["similarity", "attention", "capacity"])
def test_routers_that_cannot_decode_incrementally_refuse(router, kw):
    model = _model(router, **kw).eval()
    prompt = _ids(1, 9)
    with pytest.raises(ValueError, match="cannot decode from a KV cache"):
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(out, _greedy(model, prompt, 3))


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
