"""`routed train` / `routed eval lm` logic on the CPU: a tiny model's loss falls in a few steps on
inline text; checkpoint, metrics and loss curve are written; evaluation reads them back."""

import argparse
import json
import math

import pytest
import torch

from routed.train import (ByteTokenizer, add_eval_lm_arguments, add_train_arguments, lr_at, mix_passkeys,
                          passkey_accuracy, run_eval_lm, run_train)

TEXT = ("The Congress shall have power to lay and collect taxes, duties, imposts and excises, to pay the debts "
        "and provide for the common defence and general welfare of the United States. ") * 60


def _train_args(tmp_path, attention, *extra):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    (tmp_path / "text.txt").write_text(TEXT)
    return p.parse_args([
        "--attention", attention, "--corpus", "file", "--text-file", str(tmp_path / "text.txt"), "--tokenizer",
        "bytes", "--layers", "2", "--hidden-size", "64", "--heads", "4", "--kv-heads", "2", "--seq-len", "64",
        "--batch-size", "8", "--steps", "30", "--lr", "3e-3", "--warmup", "5", "--eval-every", "15",
        "--eval-batches", "1", "--block-size", "16", "--top-k", "2", "--nsa-top-n", "2", "--window-blocks", "2",
        "--nsa-compress-block", "8", "--nsa-compress-stride", "4", "--out", str(tmp_path / "run"), "--no-progress",
        "--device", "cpu", *extra])


def test_tiny_model_trains_and_its_loss_falls(tmp_path):
    """One MoBA layer and one NSA layer (one run covers both)."""
    torch.manual_seed(0)
    metrics = run_train(_train_args(tmp_path, "moba,nsa"))
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # from ~ln(256) = 5.5 towards the text's entropy
    assert metrics["evals"][-1]["loss"] < metrics["evals"][0]["loss"] + 0.05
    run = tmp_path / "run"
    assert (run / "checkpoint" / "model.safetensors").exists() and (run / "checkpoint" / "config.json").exists()
    assert (run / "loss.png").stat().st_size > 1000
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["config"]["attention_types"] == ["moba", "nsa"] and saved["train_tokens_per_second"] > 0

    p = argparse.ArgumentParser()
    add_eval_lm_arguments(p)
    ev = run_eval_lm(p.parse_args(["--checkpoint", str(run / "checkpoint"), "--corpus", "file", "--text-file",
                                   str(tmp_path / "text.txt"), "--tokenizer", "bytes", "--seq-len", "64", "128",
                                   "--windows", "2", "--passkey-lengths", "96", "--passkey-trials", "1",
                                   "--device", "cpu", "--out", str(tmp_path / "eval.json")]))
    assert [r["seq_len"] for r in ev["perplexity"]] == [64, 128]
    assert abs(math.log(ev["perplexity"][0]["ppl"]) - saved["evals"][-1]["loss"]) < 0.5
    assert ev["passkey"][0]["trials"] == 1 and (tmp_path / "eval.json").exists()


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_passkey_prompt_and_scoring_with_an_oracle():
    """A model that always answers the key it was shown scores 1.0 (the scoring is right)."""
    tok = ByteTokenizer()

    class Oracle(torch.nn.Module):
        def forward(self, ids, cache=None, use_cache=None, logits_to_keep=0):
            text = tok.decode(ids[0].tolist()) if ids.shape[1] > 1 else None
            if text is not None:
                self.answer = list(f" {text.split('The pass key is ')[1][:5]}".encode()) + [10]
                self.i = 0
            nxt = self.answer[self.i]
            self.i += 1
            logits = torch.zeros(1, 1, 256)
            logits[0, 0, nxt] = 1.0
            return type("Out", (), {"logits": logits})()

    rows = passkey_accuracy(Oracle(), tok, list(TEXT.encode()), [300], 3, torch.device("cpu"), retrieval_gain=False)
    assert rows == [{"length": 300, "trials": 3, "correct": 3, "accuracy": 1.0, "digit_accuracy": 1.0}]

    class OneDigitOff(Oracle):  # copies the key but gets its second digit wrong: partial credit only
        def forward(self, ids, **kw):
            out = super().forward(ids, **kw)
            if self.i == 3:  # the answer's second digit (after the space and the first)
                nxt = int(out.logits[0, 0].argmax())
                out.logits[0, 0] = 0.0
                out.logits[0, 0, ord("0") + (nxt - ord("0") + 1) % 10] = 1.0
            return out

    rows = passkey_accuracy(OneDigitOff(), tok, list(TEXT.encode()), [300], 3, torch.device("cpu"),
                            retrieval_gain=False)
    assert rows[0]["correct"] == 0 and rows[0]["digit_accuracy"] == pytest.approx(0.8)


class _ContextModel(torch.nn.Module):
    """A byte-level stand-in LM for the passkey scoring: ``next_logits(context bytes)`` gives the logits
    after each prefix; the KV cache is this module's own copy of the context."""

    def forward(self, ids, cache=None, use_cache=None, logits_to_keep=0):
        if cache is None or ids.shape[1] > 1:
            self.context = []
        self.context += ids[0].tolist()
        n = len(self.context)
        keep = logits_to_keep or n
        logits = torch.stack([self.next_logits(self.context[:p + 1]) for p in range(n - keep, n)])
        return type("Out", (), {"logits": logits[None]})()


class _Copier(_ContextModel):
    """Answers the key of the hidden sentence (logit 30 on its next byte) after the question."""

    def next_logits(self, prefix):
        text = bytes(prefix).decode()
        logits = torch.zeros(256)
        asked = "What is the pass key? The pass key is"
        if asked in text and "Remember it." in text:
            answer = " " + text.split("The pass key is ")[1][:5]
            j = len(text) - (text.index(asked) + len(asked))
            if j < len(answer):
                logits[ord(answer[j])] = 30.0
        return logits


class _Bigram(_ContextModel):
    """Reads only the last byte: the hidden sentence cannot change what it says about the key."""

    def next_logits(self, prefix):
        return torch.sin(torch.arange(256.0) * (prefix[-1] + 1))


def test_passkey_retrieval_gain_grades_reading_the_key():
    """``retrieval_gain``: the key's log-probability after the prompt minus after the same prompt whose
    hidden sentence holds a decoy key (every digit different); a copier loses ~30 nats on each of the
    five digits it copies from the decoy instead, a model that cannot read the sentence gains nothing."""
    from routed.train import _decoy_key

    for key in (10000, 99999, 12345, 90909):
        decoy = _decoy_key(key)
        assert 10000 <= decoy <= 99999 and all(a != b for a, b in zip(str(key), str(decoy)))
    tok = ByteTokenizer()
    filler = list(TEXT.encode())
    per_digit = math.log(math.exp(30.0) + 255)  # -log p of a byte next to one with logit 30
    copier = passkey_accuracy(_Copier(), tok, filler, [300, 400], 2, torch.device("cpu"))
    for row in copier:
        assert row["correct"] == 2 and row["answer_logprob"] == pytest.approx(0.0, abs=1e-6)
        assert row["answer_logprob_decoy"] == pytest.approx(-5 * per_digit, rel=1e-6)
        assert row["retrieval_gain"] == pytest.approx(5 * per_digit, rel=1e-6)
    (bigram,) = passkey_accuracy(_Bigram(), tok, filler, [300], 3, torch.device("cpu"))
    assert bigram["answer_logprob"] < -1.0 and bigram["retrieval_gain"] == pytest.approx(0.0, abs=1e-4)


def test_passkey_mix_turns_windows_into_retrieval_prompts():
    """``--passkey-fraction``: picked windows become real text + a hidden key + the question + the key,
    at the window's length; the rest stay; the same seed gives the same windows."""
    tok = ByteTokenizer()
    ids = torch.tensor(list(TEXT.encode()))
    x = torch.stack([ids[i:i + 301] for i in range(0, 8 * 301, 301)])
    assert torch.equal(mix_passkeys(x.clone(), ids, tok, 0.0, torch.Generator().manual_seed(0)), x)
    every = mix_passkeys(x.clone(), ids, tok, 1.0, torch.Generator().manual_seed(0))
    assert every.shape == x.shape and torch.equal(every, mix_passkeys(x.clone(), ids, tok, 1.0,
                                                                      torch.Generator().manual_seed(0)))
    keys = set()
    for row in every:
        text = tok.decode(row.tolist())
        key = text.split("The pass key is ")[1][:5]
        assert key.isdigit() and text.endswith(f"What is the pass key? The pass key is {key}"), text[-80:]
        assert text.count(key) == 3  # twice in the hidden sentence, once as the answer
        keys.add(key)
    assert len(keys) == 8
    half = mix_passkeys(x.clone(), ids, tok, 0.5, torch.Generator().manual_seed(1))
    changed = (half != x).any(1)
    assert 0 < int(changed.sum()) < 8 and torch.equal(half[~changed], x[~changed])


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph replays the training step as a CUDA graph and needs a CUDA GPU"):
        run_train(_train_args(tmp_path, "dense", "--cuda-graph"))
    with pytest.raises(ValueError, match="--passkey-fraction is a fraction of the training windows, got 1.5"):
        run_train(_train_args(tmp_path, "dense", "--passkey-fraction", "1.5"))
    with pytest.raises(ValueError, match="--attention lists 3 names but --layers is 2"):
        run_train(_train_args(tmp_path, "dense,moba,nsa"))
    with pytest.raises(ValueError, match=r"the training text has \d+ tokens; a window of --seq-len 50000 needs 50002"):
        run_train(_train_args(tmp_path, "dense", "--seq-len", "50000"))


def test_option_flags_reach_the_model_config():
    import argparse

    from routed.train import add_train_arguments, model_config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--attention", "routing", "--window-blocks", "2", "--option", "kmeans_clusters=5",
                         "--option", "window_blocks=3", "--option", "mosa_selection=threshold"])
    config = model_config_from_args(args, 100)
    assert (config.kmeans_clusters, config.window_blocks, config.mosa_selection) == (5, 3, "threshold")
    with pytest.raises(ValueError, match="key=value"):
        model_config_from_args(p.parse_args(["--option", "kmeans_clusters"]), 100)


@pytest.mark.gpu
def test_cuda_graphed_training_follows_eager_training(tmp_path):
    """``--cuda-graph`` on a GPU: the same model, data and seed trained eager and replayed as a CUDA
    graph give the same losses step by step (up to bf16 and atomic-order noise), and the replays
    really train (the loss falls)."""
    runs = {}
    for graph in (False, True):
        torch.manual_seed(0)
        extra = ["--device", "cuda", "--steps", "12"] + (["--cuda-graph"] if graph else [])
        runs[graph] = [h["loss"] for h in run_train(_train_args(tmp_path, "moba,nsa", *extra))["history"]]
    eager, graphed = runs[False], runs[True]
    assert len(graphed) == 12 and all(math.isfinite(v) for v in graphed)
    assert max(abs(a - b) for a, b in zip(eager, graphed)) < 0.05, (eager, graphed)
    assert sum(graphed[-3:]) / 3 < sum(graphed[:3]) / 3 - 0.2, graphed


def test_a_step_that_cannot_be_captured_says_what_to_do(monkeypatch):
    """A capture failure (a host sync inside the step, say) names the cause and the way out."""
    import routed.bench
    from routed.train import GraphedTrainStep

    def refuse(step, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(routed.bench, "capture_cuda_graph", refuse)
    with pytest.raises(RuntimeError, match=r"--cuda-graph: the training step cannot be captured .*operation not "
                                           r"permitted.*train without --cuda-graph"):
        GraphedTrainStep(torch.nn.Linear(2, 2))(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("offset", [49000, 70000], ids=["gpt2_ids", "ids_past_uint16"])
def test_token_cache_is_compact_and_loads_as_int64(tmp_path, monkeypatch, offset):
    """The shipped corpora's token cache: GPT-2 ids are stored as uint16 (a quarter of int64's bytes,
    so GCIDE's tokens fit the GPU machine's carry) and come back as int64 equal to the fresh
    encoding; ids that uint16 cannot hold are kept as int64."""
    import routed.train as train

    class FakeGPT2:  # byte ids moved up to GPT-2's (or a larger) id range
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [b + offset for b in text.encode("utf-8")]}

    monkeypatch.setenv("ROUTED_CACHE", str(tmp_path))
    monkeypatch.setattr(train, "_tokenizer", lambda name: FakeGPT2())
    monkeypatch.setattr(train, "_corpus_texts", lambda corpus, text_file: ("train text\n\nmore", "held out"))
    fresh_train, fresh_val, _ = train.load_tokens("gcide", "gpt2")
    saved = torch.load(tmp_path / "tokens" / "gcide-gpt2.pt")
    assert saved["train"].dtype == (torch.uint16 if offset + 255 < 2 ** 16 else torch.long)
    cached_train, cached_val, _ = train.load_tokens("gcide", "gpt2")
    for got, want in ((cached_train, fresh_train), (cached_val, fresh_val)):
        assert got.dtype == torch.long and torch.equal(got, want)
    assert int(fresh_train.min()) >= offset
