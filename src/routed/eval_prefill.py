"""``routed eval prefill``: a model dense and routed on the same real prompts.

For each prompt length and routing policy it reports perplexity on held-out real text (and its
ratio to dense), the relative error of every routed layer's attention output against dense SDPA
on the same activations, the route density (dense layers and short calls count as 1), the time,
and passkey retrieval in real text (a number hidden at several depths of a long document,
asked for at the end, answered by greedy decoding). A plot shows quality against density.

The default model is SmolLM2-135M-Instruct from the offline GGUF (:mod:`routed.data.text`);
any causal LM and tokenizer can be passed to :func:`run_prefill_eval`. On the CPU the routed
path runs the exact reference backend, so differences from dense come from routing alone.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

__all__ = ["PrefillEvalConfig", "parse_policy", "perplexity", "passkey_prompt", "run_prefill_eval",
           "plot_quality_vs_density"]


@dataclass
class PrefillEvalConfig:
    """What ``routed eval prefill`` runs.

    Attributes:
        lengths: prompt lengths in tokens for perplexity.
        policies: routing policies as ``"estimator:budget"`` specs (see :func:`parse_policy`).
        block_size, min_seq_len, dense_layers, sink_blocks, local_blocks: shared by every policy
            (a spec may override them).
        windows: perplexity windows (disjoint, consecutive) per length.
        passkey_lengths, passkey_depths: retrieval prompts (depth = fraction of the document
            before the passkey).
        passkey_policies: how many of ``policies`` (from the first) also run the passkey test
            (each trial is a full prefill and a few decode steps).
        first_year, last_year: the State of the Union addresses used as text.
        attn_error: also measure each routed layer's attention error (one extra dense attention
            per layer).
    """

    lengths: tuple = (2048, 4096, 8192)
    policies: tuple = ("pooled:coverage=0.9", "strided:coverage=0.9")
    block_size: int = 64
    min_seq_len: int = 1024
    dense_layers: tuple = ()
    sink_blocks: int = 1
    local_blocks: int = 2
    windows: int = 1
    passkey_lengths: tuple = (2048, 4096, 8192)
    passkey_depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    passkey_policies: int = 1
    first_year: int = 1990
    last_year: int = 2021
    attn_error: bool = True
    seed: int = 0


def parse_policy(spec: str, cfg: Optional[PrefillEvalConfig] = None, **defaults):
    """``"pooled:coverage=0.9"`` / ``"strided:top_k=8,samples=8"`` -> a ``RoutedPrefillPolicy``
    with ``cfg``'s shared settings (a spec's own keys win)."""
    from .integrations.transformers import RoutedPrefillPolicy

    name, _, rest = spec.partition(":")
    kw = dict(defaults)
    if cfg is not None:
        kw.update(block_size=cfg.block_size, min_seq_len=cfg.min_seq_len, dense_layers=tuple(cfg.dense_layers),
                  sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks)
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"policy spec {spec!r}: expected key=value after ':', got {item!r}.")
        key, value = key.strip(), value.strip()
        kw[key] = float(value) if key == "coverage" else int(value) if value.lstrip("-").isdigit() else value
    return RoutedPrefillPolicy(estimator=name, **kw)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, chunk: int = 1024) -> float:
    """Perplexity of ``ids [1, n]`` under ``model`` (one forward; the vocabulary projection runs in
    chunks so the ``n x vocab`` logits never exist at once)."""
    hidden = model.model(ids).last_hidden_state
    n = ids.shape[1]
    total = 0.0
    for i in range(0, n - 1, chunk):
        j = min(i + chunk, n - 1)
        logits = model.lm_head(hidden[:, i:j]).float()
        total += float(torch.nn.functional.cross_entropy(logits[0], ids[0, i + 1:j + 1], reduction="sum"))
    return math.exp(total / (n - 1))


def passkey_prompt(tok, filler_ids: list, length: int, depth: float, key: int) -> tuple[torch.Tensor, str]:
    """A prompt of about ``length`` tokens: real text with a passkey sentence at ``depth``, then
    the question. Returns ``(ids [1, n], answer)``."""
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)["input_ids"]
    question = tok("\n\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    body = length - len(needle) - len(question)
    cut = int(body * depth)
    ids = filler_ids[:cut] + needle + filler_ids[cut:body] + question
    return torch.tensor([ids]), str(key)


def passkey_score(text: str, answer: str) -> tuple[bool, float]:
    """``(correct, digit_accuracy)`` of a model's answer ``text``: the key anywhere in it (commas and
    spaces ignored), and the fraction of the key's digits the answer's first digits get right in
    place (partial credit, which separates models before whole keys come out)."""
    said = "".join(c for c in text if c.isdigit())[:len(answer)]
    return answer in text.replace(",", "").replace(" ", ""), sum(a == b for a, b in zip(said, answer)) / len(answer)


@torch.no_grad()
def answer_logprob(model, ids: torch.Tensor, target: list, ones_mask: bool = False) -> float:
    """Teacher-forced log-probability (natural log, summed over its tokens) of the token ids
    ``target`` right after the prompt ``ids [1, n]`` (on the model's device): one forward of both, the
    logits of the last ``len(target) + 1`` positions, of which all but the last predict the target.
    ``ones_mask``: pass an all-ones ``attention_mask`` (Hugging Face models that want one)."""
    full = torch.cat([ids, torch.tensor([target], dtype=ids.dtype, device=ids.device)], 1)
    mask = {"attention_mask": torch.ones_like(full)} if ones_mask else {}
    logits = model(full, logits_to_keep=len(target) + 1, **mask).logits[0, :-1]
    return float(logits.float().log_softmax(-1).gather(-1, torch.tensor(target, device=logits.device)[:, None]).sum())


@torch.no_grad()
def _passkey_answer(model, tok, ids: torch.Tensor, answer: str) -> dict:
    """Greedy answer (8 new tokens) scored by :func:`passkey_score`, and ``answer_logprob``: the
    teacher-forced log-probability of `` {answer}.`` after the prompt, a graded measure of retrieval
    that compares a routed prefill with dense even where neither model gets the whole key right."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    correct, digits = passkey_score(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), answer)
    target = tok(f" {answer}.", add_special_tokens=False)["input_ids"]
    return dict(correct=correct, digit_accuracy=digits, answer_logprob=answer_logprob(model, ids, target, True))


def _set_attn(model, policy, recorder=None):
    import routed.integrations.transformers as rt

    if policy is None:
        model.set_attn_implementation("sdpa")
    else:
        rt.configure(model, policy, recorder=recorder)


def run_prefill_eval(model, tok, text: str, cfg: PrefillEvalConfig, progress: bool = True) -> dict:
    """Dense and every policy of ``cfg`` on the same prompts. Returns ``{"config", "perplexity":
    [rows], "passkey": [rows]}``; a perplexity row has ``length, policy, ppl, ppl_ratio, density,
    attn_rel_err_mean, attn_rel_err_max, seconds``."""
    import routed.integrations.transformers as rt
    from tqdm.auto import tqdm

    policies = [(None, None)] + [(spec, parse_policy(spec, cfg)) for spec in cfg.policies]
    ids_all = tok(text, add_special_tokens=False)["input_ids"]
    need = max(cfg.lengths) * cfg.windows
    if len(ids_all) < need + max(cfg.passkey_lengths, default=0):
        raise ValueError(f"the text has {len(ids_all)} tokens; perplexity and passkey need "
                         f"{need + max(cfg.passkey_lengths, default=0)}: widen first_year..last_year.")
    result: dict = {"config": asdict(cfg), "perplexity": [], "passkey": []}
    jobs = [(n, w, spec, pol) for n in cfg.lengths for w in range(cfg.windows) for spec, pol in policies]
    dense_ppl: dict = {}
    per: dict = {}
    bar = tqdm(jobs, desc="perplexity", disable=not progress)
    for n, w, spec, pol in bar:
        bar.set_postfix_str(f"{n} tokens, {spec or 'dense'}")
        ids = torch.tensor([ids_all[w * n:(w + 1) * n]])
        rec = rt.PrefillRecorder(compare_dense=cfg.attn_error) if pol is not None else None
        _set_attn(model, pol, rec)
        t = time.perf_counter()
        ppl = perplexity(model, ids)
        secs = time.perf_counter() - t
        s = rec.summary() if rec is not None else {}
        per.setdefault((n, spec), []).append(dict(ppl=ppl, seconds=secs, density=s.get("prefill_density", 1.0),
                                                  err_mean=s.get("attn_rel_err_mean"), err_max=s.get("attn_rel_err_max")))
        if pol is None:
            dense_ppl.setdefault(n, []).append(ppl)
    for (n, spec), runs in per.items():
        # Perplexity over the windows: the geometric mean (= exp of the mean token loss, equal windows).
        ppl = math.exp(sum(math.log(r["ppl"]) for r in runs) / len(runs))
        dense = math.exp(sum(math.log(p) for p in dense_ppl[n]) / len(dense_ppl[n]))
        errs = [r["err_mean"] for r in runs if r["err_mean"] is not None]
        result["perplexity"].append(dict(
            length=n, policy=spec or "dense", ppl=ppl, ppl_ratio=ppl / dense,
            density=sum(r["density"] for r in runs) / len(runs),
            attn_rel_err_mean=sum(errs) / len(errs) if errs else None,
            attn_rel_err_max=max((r["err_max"] for r in runs if r["err_max"] is not None), default=None),
            seconds=sum(r["seconds"] for r in runs) / len(runs)))

    filler = ids_all[need:]
    rng = random.Random(cfg.seed)
    trials = [(n, d, rng.randrange(10000, 99999)) for n in cfg.passkey_lengths for d in cfg.passkey_depths]
    chosen = policies[: 1 + cfg.passkey_policies]  # dense first
    bar = tqdm([(t, spec, pol) for t in trials for spec, pol in chosen], desc="passkey", disable=not progress)
    for (n, depth, key), spec, pol in bar:
        bar.set_postfix_str(f"{n} tokens, depth {depth}, {spec or 'dense'}")
        ids, answer = passkey_prompt(tok, filler, n, depth, key)
        rec = rt.PrefillRecorder() if pol is not None else None
        _set_attn(model, pol, rec)
        scored = _passkey_answer(model, tok, ids, answer)
        result["passkey"].append(dict(length=n, depth=depth, policy=spec or "dense", **scored,
                                      density=rec.summary()["prefill_density"] if rec is not None else 1.0))
    _set_attn(model, None)
    return result


def passkey_table(result: dict) -> list[dict]:
    """Per (policy, length) from ``result["passkey"]``: ``accuracy``, ``digit_accuracy``, the mean
    ``answer_logprob`` and, paired over the same prompts, ``logprob_vs_dense`` (the policy's answer
    log-probability minus dense's, averaged: 0 is retrieval as good as dense, negative worse), and
    the mean ``density``. Rows from older reports without the graded fields get None there."""
    groups: dict = {}
    for r in result["passkey"]:
        groups.setdefault((r["policy"], r["length"]), []).append(r)
    dense = {(r["length"], r["depth"]): r.get("answer_logprob") for r in result["passkey"] if r["policy"] == "dense"}

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    rows = []
    for (p, n), rs in groups.items():
        diffs = [r.get("answer_logprob") - dense[(n, r["depth"])] for r in rs
                 if r.get("answer_logprob") is not None and dense.get((n, r["depth"])) is not None]
        rows.append(dict(policy=p, length=n, accuracy=sum(r["correct"] for r in rs) / len(rs), trials=len(rs),
                         digit_accuracy=mean(r.get("digit_accuracy") for r in rs),
                         answer_logprob=mean(r.get("answer_logprob") for r in rs), logprob_vs_dense=mean(diffs),
                         density=mean(1.0 if r["density"] is None else r["density"] for r in rs)))
    return rows


def plot_quality_vs_density(result: dict, path: str, title: Optional[str] = None) -> None:
    """Perplexity ratio to dense (left) and passkey accuracy (right) against density, one marker
    per policy, one colour per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths = sorted({r["length"] for r in result["perplexity"]})
    policies = sorted({r["policy"] for r in result["perplexity"]} - {"dense"})
    markers = "osD^vP*X"
    for li, n in enumerate(lengths):
        for pi, p in enumerate(policies):
            for r in result["perplexity"]:
                if r["length"] == n and r["policy"] == p:
                    ax1.scatter(r["density"], r["ppl_ratio"], color=f"C{li}", marker=markers[pi % len(markers)],
                                label=f"{p} @ {n}")
    ax1.axhline(1.01, color="gray", ls="--", lw=1)
    ax1.axhline(1.0, color="black", lw=0.8)
    ax1.axvline(0.25, color="gray", ls=":", lw=1)
    ax1.set_xlabel("density (routed key blocks / causal key blocks)")
    ax1.set_ylabel("perplexity / dense perplexity")
    ax1.set_title("perplexity on held-out text (1% line dashed)")
    ax1.legend(fontsize=7)
    table = passkey_table(result)
    for li, n in enumerate(sorted({r["length"] for r in table})):
        for pi, p in enumerate(sorted({r["policy"] for r in table})):
            for r in table:
                if r["length"] == n and r["policy"] == p:
                    m = "_" if p == "dense" else markers[(policies.index(p) if p in policies else 0) % len(markers)]
                    ax2.scatter(r["density"], r["accuracy"], color=f"C{li}", marker=m, s=80 if p == "dense" else 36,
                                label=f"{p} @ {n}")
    ax2.set_xlabel("density")
    ax2.set_ylabel("passkey accuracy")
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_title("passkey retrieval in real text")
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
