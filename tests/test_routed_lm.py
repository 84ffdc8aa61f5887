"""The routed LM: KV-cache decoding equals a full forward, generate() works, checkpoints round-trip,
any registered layer plugs in, bad configurations raise."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from routed.layers.lm_attention import DenseAttention
from routed.layers.registry import register_attention
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM
from routed.route import RouteError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton tests: the GPU, or the CPU's interpreter


def _model(attention, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=len(attention) if isinstance(attention, list) else 2,
                num_attention_heads=4, num_key_value_heads=2, attention_types=attention, attention_block_size=16,
                window_blocks=2, moba_top_k=2, nsa_compress_block=8, nsa_compress_stride=4, nsa_top_n=3,
                max_position_embeddings=128, attention_backend="reference", router_backend="reference")
    base.update(kw)
    return RoutedLMForCausalLM(RoutedLMConfig(**base)).eval()


CASES = [("dense", {}), ("sliding_window", {}), ("moba", {"route_q_block_size": 1}), ("nsa", {"route_q_block_size": 1}),
         (["nsa", "moba", "sliding_window", "dense"], {"route_q_block_size": 1})]


@pytest.mark.parametrize("attention,kw", CASES, ids=["dense", "sliding_window", "moba", "nsa", "mixed"])
def test_kv_cache_decoding_equals_full_forward(attention, kw):
    model = _model(attention, **kw)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        prefill = 29
        steps = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_starting_mid_block():
    """Chunks of several new tokens that start inside a block (per-query routing for MoBA and
    NSA; the window's per-query route) give the full pass's logits."""
    model = _model(["moba", "nsa", "sliding_window"], route_q_block_size=1)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        parts = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 23), (23, 41), (41, 60))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_generate_is_greedy_decoding():
    model = _model("moba", route_q_block_size=1)
    prompt = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


def test_checkpoint_round_trip(tmp_path):
    model = _model(["nsa", "moba"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = RoutedLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention_types == ["nsa", "moba"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_loss_is_next_token_cross_entropy_and_backprops():
    model = _model("nsa").train()
    ids = torch.randint(0, 97, (2, 33))
    out = model(ids, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "compress" not in n or "layers" in n)


def test_any_registered_layer_plugs_in():
    @register_attention("test_scaled_dense")
    class ScaledDense(DenseAttention):
        """A toy layer: dense attention whose output is halved, with an auxiliary loss."""

        def forward(self, *args, **kwargs):
            out, _ = super().forward(*args, **kwargs)
            return 0.5 * out, out.new_tensor(0.25)

    model = _model(["test_scaled_dense", "dense"])
    assert isinstance(model.model.layers[0].self_attn, ScaledDense)
    ids = torch.randint(0, 97, (1, 10))
    out = model(ids, labels=ids)
    plain = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, plain + 0.25)  # the layer's aux loss joins the loss


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown attention layer 'mobaa'"):
        _model("mobaa")
    with pytest.raises(ValueError, match="attention_types has 3 entries but num_hidden_layers=2"):
        RoutedLMConfig(num_hidden_layers=2, attention_types=["dense"] * 3)
    with pytest.raises(RouteError, match="moba_top_k=9 exceeds the 8 key blocks"):
        _model("moba", moba_top_k=9)
    with pytest.raises(RouteError, match="must divide both"):
        _model("nsa", nsa_compress_stride=8, nsa_compress_block=12)
    with pytest.raises(ValueError, match="does not support padding"):
        model = _model("dense")
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))


def test_layer_types_alias_and_hf_cache_kinds():
    cfg = RoutedLMConfig(num_hidden_layers=2, layer_types=["moba", "dense"])
    assert cfg.attention_types == ["moba", "dense"]
    assert cfg.layer_types == ["full_attention", "full_attention"]  # what transformers' caches read


def test_aux_losses_reach_the_output_and_the_loss():
    """Layers with auxiliary losses (k-means commitment): ``aux_loss`` is their sum and ``loss``
    is the cross-entropy plus it, so training code that computes its own cross-entropy can add it."""
    import torch.nn.functional as F

    model = _model(["routing", "dense"], kmeans_clusters=3, routing_window=8, routing_local_window=8).train()
    ids = torch.randint(0, 97, (2, 40))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.requires_grad and float(out.aux_loss.detach()) > 0
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    assert _model("dense")(ids).aux_loss is None


@pytest.mark.parametrize("attention", ["sliding_window", "moba", "nsa", "routing", "mosa"])
def test_training_step_compiles_without_graph_breaks(attention):
    """``torch.compile(fullgraph=True)`` traces a whole training step on the Triton kernels, routers
    included (their launches are custom ops, fixed-geometry routes are built by arithmetic), and the
    compiled loss and gradients equal the eager ones: what ``mode="reduce-overhead"`` needs to
    replay the step as CUDA graphs."""
    model = _model(attention, num_hidden_layers=1, attention_backend="triton", router_backend="triton",
                   mosa_selection="threshold").to(DEVICE).train()
    ids = torch.randint(0, 97, (2, 75), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def step(ids):
        out = model(ids, labels=ids)
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_and_grads(step)  # first use: k-means initialises its centroids from the data, kernels compile
    state = {n: t.clone() for n, t in model.state_dict().items()}
    want_loss, want = loss_and_grads(step)
    model.load_state_dict(state)  # the same centroids (a training step moves them) for the compiled step
    torch._dynamo.reset()
    got_loss, got = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(got) > 5
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
