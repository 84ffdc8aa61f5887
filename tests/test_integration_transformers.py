"""attn_implementation="routed" in Hugging Face transformers, on tiny random Llama / Qwen2 /
Mistral models (GQA included): exact with a full budget, causal and backend-consistent with a
sparse one, padding and batches of different lengths, decode, and clear errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import routed.integrations.transformers as rt  # noqa: E402
from routed import RouteError  # noqa: E402
from routed.backends import BackendUnavailable  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton backend runs
BS = 16  # block size of every policy here: tiny prompts still span several blocks


def _model(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=512)
    common.update(over)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.MistralConfig(**{"sliding_window": None, **common})
        cls = transformers.MistralForCausalLM
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


def _logits(model, ids, impl, policy=None, recorder=None, **kw):
    if impl == "routed":
        rt.configure(model, policy, recorder=recorder)
    else:
        model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def _policy(**kw):
    base = dict(block_size=BS, min_seq_len=32)
    base.update(kw)
    return rt.RoutedPrefillPolicy(**base)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("estimator", ["pooled", "strided"])
def test_full_budget_equals_sdpa(arch, estimator):
    model = _model(arch)
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids, "sdpa")
    rec = rt.PrefillRecorder()
    got = _logits(model, ids, "routed", _policy(coverage=1.0, estimator=estimator), rec)
    assert rec.summary()["routed_calls"] == 2 and rec.summary()["prefill_density"] == 1.0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_sparse_budget_runs_and_matches_the_reference_backend():
    model = _model("llama", num_attention_heads=4, num_key_value_heads=1).to(DEVICE)
    ids = torch.randint(0, 97, (1, 128), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    dense = _logits(model, ids, "sdpa")
    rec = rt.PrefillRecorder(compare_dense=True)
    ref = _logits(model, ids, "routed", _policy(top_k=3, backend="reference", estimator_backend="reference"), rec)
    s = rec.summary()
    assert s["routed_calls"] == 2 and s["prefill_density"] < 0.7 and s["attn_rel_err_max"] > 0
    got = _logits(model, ids, "routed", _policy(top_k=3, backend="triton", estimator_backend="triton"))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all() and not torch.allclose(got, dense, atol=1e-5)


@pytest.mark.parametrize("estimator", ["pooled", "strided"])
def test_sparse_prefill_never_sees_the_future(estimator):
    """Changing tokens from a block boundary on leaves every earlier logit unchanged: no attention
    to future keys, and no route of an earlier block depends on later tokens."""
    model = _model("qwen2")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (1, 144), generator=g)
    cut = 5 * BS
    other = ids.clone()
    other[:, cut:] = torch.randint(0, 97, (1, 144 - cut), generator=g)
    policy = _policy(top_k=2, estimator=estimator)
    a = _logits(model, ids, "routed", policy)
    b = _logits(model, other, "routed", policy)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=0)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("coverage", [1.0, 0.5])
def test_padded_batch_equals_each_prompt_alone(side, coverage):
    model = _model("mistral")
    g = torch.Generator().manual_seed(4)
    lens = [150, 97, 40]
    n = max(lens)
    ids = torch.randint(1, 97, (3, n), generator=g)
    mask = torch.zeros(3, n, dtype=torch.long)
    for b, length in enumerate(lens):
        if side == "left":
            mask[b, n - length:] = 1
        else:
            mask[b, :length] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    policy = _policy(coverage=coverage)
    rec = rt.PrefillRecorder()
    got = _logits(model, ids, "routed", policy, rec, attention_mask=mask, position_ids=pos)
    assert rec.summary()["routed_calls"] == 2
    for b, length in enumerate(lens):
        sl = slice(n - length, n) if side == "left" else slice(0, length)
        alone = _logits(model, ids[b:b + 1, sl], "routed", policy)
        torch.testing.assert_close(got[b:b + 1, sl], alone, rtol=1e-4, atol=1e-4)
        if coverage == 1.0:
            sdpa = _logits(model, ids[b:b + 1, sl], "sdpa")
            torch.testing.assert_close(got[b:b + 1, sl], sdpa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decode", ["dense", "routed"])
def test_generate_after_routed_prefill(decode):
    model = _model("llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 97, (2, 100), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0  # left padding, as batched generation makes it
    model.set_attn_implementation("sdpa")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    rec = rt.PrefillRecorder()
    rt.configure(model, _policy(coverage=1.0, decode=decode), recorder=rec)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    routed_decodes = [r for r in rec.records if r["q_len"] == 1 and r["path"] == "routed"]
    assert (len(routed_decodes) > 0) == (decode == "routed")


def test_from_pretrained_and_the_mask_function(tmp_path):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "routed" in ALL_ATTENTION_FUNCTIONS and "routed" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    model = _model("llama")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="routed").eval()
    assert loaded.config._attn_implementation == "routed"
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(6))
    rt.set_default_policy(_policy(coverage=1.0))
    try:
        with torch.no_grad():
            got = loaded(ids).logits
    finally:
        rt.set_default_policy(None)
    torch.testing.assert_close(got, _logits(model, ids, "sdpa"), rtol=1e-4, atol=1e-5)


def test_dense_paths_are_recorded_with_their_reason():
    model = _model("mistral", sliding_window=48)
    ids = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(7))
    rec = rt.PrefillRecorder()
    got = _logits(model, ids, "routed", _policy(top_k=2), rec)
    torch.testing.assert_close(got, _logits(model, ids, "sdpa"), rtol=1e-4, atol=1e-5)
    assert rec.summary()["routed_calls"] == 0
    assert any("sliding window" in r for r in rec.summary()["dense_reasons"])
    model = _model("llama")
    rec = rt.PrefillRecorder()
    _logits(model, ids[:, :20], "routed", _policy(top_k=2), rec)
    _logits(model, ids, "routed", _policy(top_k=2, dense_layers=(0,)), rec)
    reasons = rec.summary()["dense_reasons"]
    assert reasons == {"prompt shorter than min_seq_len=32": 2, "layer in dense_layers": 1}


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=4, coverage=0.9), "exactly one budget"), (dict(coverage=1.2), "coverage must be"),
    (dict(top_k=0), "top_k"), (dict(estimator="oracle"), "estimator must be"), (dict(block_size=0), "block_size"),
    (dict(dense_layers=3), "dense_layers"), (dict(min_seq_len=-1), "min_seq_len"), (dict(decode="sparse"), "decode"),
    (dict(backend="cuda"), "backend must be"), (dict(estimator_backend="flex"), "estimator_backend"),
    (dict(estimator="strided", samples=6), "samples"),
])
def test_bad_policies_raise(kwargs, match):
    with pytest.raises(RouteError, match=match):
        rt.RoutedPrefillPolicy(**kwargs)


def test_a_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _model("llama")
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(8))
    with pytest.raises(BackendUnavailable, match="triton"):
        _logits(model, ids, "routed", _policy(top_k=2, estimator_backend="triton"))
    with pytest.raises(TypeError, match="RoutedPrefillPolicy"):
        rt.configure(model, {"top_k": 2})


@pytest.mark.parametrize("estimator", ["pooled", "strided"])
def test_routed_prefill_compiles_without_graph_breaks(estimator):
    """``torch.compile(fullgraph=True)`` traces a routed prefill: transformers materialises the mask
    when compiling, and the traced path turns padding into segment ids instead of analysing the mask
    on the host. Unpadded prompts give the eager routed logits; in a left-padded batch the unpadded
    row is unchanged and the padded row's valid positions are finite."""
    model = _model("llama", num_attention_heads=4, num_key_value_heads=1)
    rt.configure(model, _policy(top_k=3, backend="triton", estimator_backend="triton", estimator=estimator))
    ids = torch.randint(0, 97, (2, 128), generator=torch.Generator().manual_seed(6))

    def forward(x, mask):
        return model(x, attention_mask=mask, use_cache=False).logits

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = forward(ids, None)
        torch.testing.assert_close(compiled(ids, None), eager, rtol=1e-4, atol=1e-5)
        mask = torch.ones_like(ids)
        mask[1, :40] = 0
        got = compiled(ids, mask)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(got[1, 40:]).all()
