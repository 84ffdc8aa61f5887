"""Hugging Face plug-in: swapped routers keep Mixtral/Qwen2-MoE outputs (logits, router logits,
aux loss) intact when the routing is the model's own; routed experts dispatch matches the model's."""

import pytest
import torch

from routed.integrations.hf_moe import swap_moe_routers, use_routed_experts
from routed.route import RouteError
from routed.testing import assert_close_rel


def _mixtral(attn="eager"):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2,
                        attn_implementation=attn, output_router_logits=True, router_aux_loss_coef=0.02)
    return MixtralForCausalLM(cfg).eval()


def _qwen():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                         shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                         attn_implementation="eager", output_router_logits=True, router_aux_loss_coef=0.02)
    return Qwen2MoeForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make", [_mixtral, _qwen])
def test_swapped_router_keeps_outputs_exactly(make):
    model, ids = make(), _ids()
    with torch.no_grad():
        before = model(ids, labels=ids)
        gates = swap_moe_routers(model)
        after = model(ids, labels=ids)
    assert len(gates) == 2 and all(type(g).__name__.startswith("Routed") for g in gates)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.aux_loss, after.aux_loss) and torch.equal(before.loss, after.loss)
    assert len(after.router_logits) == 2
    for a, b in zip(before.router_logits, after.router_logits):
        assert torch.equal(a, b)
    assert gates[0].last_route.num_tokens == 26


@pytest.mark.parametrize("make", [_mixtral, _qwen])
def test_swapped_router_on_the_route_kernel_keeps_outputs(make):
    """The fused route kernel (interpreted on the CPU) picks the same experts; its float32 softmax may
    differ from torch's in the last bit of a gate weight."""
    model, ids = make(), _ids()
    with torch.no_grad():
        before = model(ids, labels=ids)
        gates = swap_moe_routers(model, router_backend="triton")
        after = model(ids, labels=ids)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.aux_loss, before.aux_loss, rtol=1e-5, atol=1e-6)
    assert gates[0].last_route.slot_rows is not None  # the kernel's route, not the PyTorch builder's
    with pytest.raises(RouteError, match="router_backend"):
        swap_moe_routers(make(), router_backend="cuda")


@pytest.mark.parametrize("make", [_mixtral, _qwen])
def test_routed_experts_dispatch_matches_model(make):
    model, ids = make(), _ids()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        before = model(ids).logits
        n = use_routed_experts(model, backend="loop")
        after = model(ids).logits
        base = make().to(torch.float64)
        base.set_experts_implementation("eager")
        ref = base(ids).logits
    assert n == 2 and model.config._experts_implementation == "routed"
    assert_close_rel(after, ref, before, what="logits")


@pytest.mark.parametrize("method", ["similarity", "attention", "expert_choice"])
def test_other_routers_run_in_the_model_and_feed_its_aux_loss(method):
    model, ids = _mixtral(), _ids()
    gates = swap_moe_routers(model, method, causal=method != "expert_choice")
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    out.loss.backward()
    assert gates[0].weight.grad is not None and gates[0].weight.grad.abs().sum() > 0
    if method == "similarity":
        assert gates[0].routed_sim_proj.grad.abs().sum() > 0
    if method == "expert_choice":  # the route has empty slots
        assert bool((gates[0].last_route.expert_ids < 0).any())


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_empty_slots_reach_every_experts_implementation_safely(impl):
    """Expert choice leaves slots empty. eager skips index E; grouped_mm would leave those rows
    uninitialised (NaN, at random) and batched_mm would index out of range, so they get expert 0
    with score 0 there. Output and gradients equal the eager run in float64."""
    def run(impl, dtype):
        model, ids = _mixtral(), _ids()
        model = model.to(dtype)
        model.set_experts_implementation(impl)
        gates = swap_moe_routers(model, "expert_choice", causal=False)
        seen = []
        model.model.layers[0].mlp.experts.register_forward_hook(lambda m, a, o: seen.append(a[1].clone()))
        out = model(ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), gates[0].weight.grad, seen[0]

    logits, grad, index = run(impl, torch.float32)
    ref_logits, ref_grad, ref_index = run("eager", torch.float64)
    assert bool((ref_index == 5).any())  # eager gets the sentinel E = 5 ...
    if impl != "eager":
        assert int(index.max()) < 5  # ... the others never do
    base_logits, base_grad, _ = run("eager", torch.float32)
    assert_close_rel(logits, ref_logits, base_logits, what=f"{impl} logits")
    assert_close_rel(grad, ref_grad, base_grad, what=f"{impl} router gradient")


def test_attention_router_without_the_attention_matrix_matches_eager_weights():
    # SDPA never builds the attention matrix: the router recomputes A p from the layer's q and k.
    eager, sdpa, ids = _mixtral(attn="eager"), _mixtral(attn="sdpa"), _ids()
    ge = swap_moe_routers(eager, "attention", mix=0.9)
    gs = swap_moe_routers(sdpa, "attention", mix=0.9)
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "routed_moe_qk_sdpa"
    assert not any("self_attn" in k and "gate" in k for k in sdpa.state_dict())  # no router inside attention
    with torch.no_grad():
        oe, os_ = eager(ids), sdpa(ids)
    for a, b in zip(ge, gs):
        assert torch.equal(a.last_route.expert_ids, b.last_route.expert_ids)
    for a, b in zip(oe.router_logits, os_.router_logits):
        assert_close_rel(b, a, floor=1e-5, what="router logits")
    assert_close_rel(os_.logits, oe.logits, floor=1e-5, what="logits")
    # The same through the q/k path on eager attention, asked for explicitly.
    qk = _mixtral(attn="eager")
    gq = swap_moe_routers(qk, "attention", mix=0.9, attention_source="qk")
    with torch.no_grad():
        qk(ids)
    assert torch.equal(gq[0].last_route.expert_ids, ge[0].last_route.expert_ids)


def test_attention_router_errors():
    model, ids = _mixtral(attn="sdpa"), _ids()
    swap_moe_routers(model, "attention", attention_source="weights")
    with pytest.raises(RouteError, match="attn_implementation='eager'"):
        model(ids)
    with pytest.raises(RouteError, match="attention_source must be"):
        swap_moe_routers(_mixtral(), "attention", attention_source="matrix")
    model = _mixtral(attn="sdpa")
    swap_moe_routers(model, "attention")
    with pytest.raises(RouteError, match="KV cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("method,kw", [("similarity", {}), ("expert_choice", dict(causal=False)),
                                       ("token_choice", dict(capacity_factor=1.0))])
def test_routers_that_need_the_whole_sequence_refuse_to_decode(method, kw):
    """A decode step after cached tokens would route without the earlier tokens' gates (or within one
    token's capacity): the swapped router says so instead of silently routing differently."""
    model, ids = _mixtral(), _ids()
    swap_moe_routers(model, method, **kw)
    with torch.no_grad():
        model(ids)  # a whole sequence without a cache routes as before
        with pytest.raises(RouteError, match="cached tokens"):
            model.generate(ids, max_new_tokens=2, do_sample=False)
        out = model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)
    assert out.shape == (2, 15)


def test_token_choice_decodes_like_the_full_forward():
    model, ids = _mixtral(), _ids()
    swap_moe_routers(model)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=4, do_sample=False)
        full = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_mixing_router_needs_the_sequence_layout():
    model = _mixtral()
    gates = swap_moe_routers(model, "similarity")
    h = torch.randn(2, 7, 32)
    logits, scores, idx = gates[0](h)  # [batch, seq, hidden] carries the layout itself
    assert logits.shape == (14, 5) and idx.shape == (14, 2)
    with pytest.raises(RouteError, match=r"needs the tokens' \[batch, seq\] layout"):
        gates[0](h.reshape(14, 32))


def test_swap_errors():
    with pytest.raises(RouteError, match="no transformers top-k router"):
        swap_moe_routers(torch.nn.Linear(3, 3))
    with pytest.raises(RouteError, match="not causal"):
        swap_moe_routers(_mixtral(), "expert_choice")
    with pytest.raises(RouteError, match="method must be one of"):
        swap_moe_routers(_mixtral(), "hash")


def test_aux_loss_free_balancing_in_a_model():
    model, ids = _mixtral(), _ids()
    gates = swap_moe_routers(model, balance_bias_rate=0.01)
    assert "model.layers.0.mlp.gate.routed_selection_bias" in model.state_dict()
    model.eval()
    with torch.no_grad():
        model(ids)
    assert bool((gates[0].routed_selection_bias == 0).all())  # no update outside training
    model.train()
    with torch.no_grad():
        model(ids)
    bias, counts = gates[0].routed_selection_bias, gates[0].last_route.counts.float()
    assert torch.equal(torch.sign(bias), torch.sign(counts.mean() - counts)) and bias.abs().sum() > 0
