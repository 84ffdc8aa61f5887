"""Multi-query associative recall (MQAR, Zoology: Arora et al., 2023): generate it, train a small
routed LM per attention type on it, report recall.

    PYTHONPATH=src python benchmarks/mqar.py --out mqar.json [--smoke]
        [--attention dense sliding_window routing mosa] [--seq-lens 2048 4096 8192]
        [--option kmeans_clusters=16 --option routing_window=64 ...]

A sequence opens with ``kv_pairs`` key-value pairs (``--key-vocab shared``: distinct tokens of one
pool; ``split``: keys from the lower half of the vocabulary, values from the upper half, as in
Zoology), then repeats every key once at a random later even slot (gaps drawn from a power law,
Zoology's ``power_a``); every other position holds filler (``--noise``: random tokens that are
none of the sequence's keys, or token 0). At each repeated key the model must predict its value,
which (as in Zoology) never appears in the input after the query. The model is trained with
cross-entropy on those query positions only (plus the layers' auxiliary losses) and scored by
greedy accuracy there (teacher forcing, one forward per sequence), on held-out sequences. Each
attention type gets the same model size, steps, data and seed.

Why ``shared`` is the default: with Zoology's split vocabulary a token's half says whether it is a
value, so the model first learns "spread the prediction over the context's values" (loss ln(pairs),
recall 1/pairs) and stays there for a long time (thousands of steps at these sizes; Zoology trains
64 epochs of 100k sequences); with one pool that shortcut does not exist and the lookup (a
previous-token head feeding a key-matching head) is learned within a few hundred steps. Random
filler (``--noise random``) is learned later than token 0 and levels off lower; longer sequences
and more pairs delay the onset (CPU, 2 layers of 128, batch 32, lr 3e-3, vocab 256, token-0
filler: 8 pairs at 128 tokens 0.92 recall after 800 steps, split vocabulary 0.13; random filler
0.56 after 1500; 16 pairs at 128 tokens 0.32 after 800, onset near step 600).

MoSA runs with ``mosa_selection=threshold`` unless ``--option`` says otherwise: the top-k selection
compares the whole sequence, so later tokens would steer which earlier tokens are picked, a channel
a causal recall score must not have.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import routed.layers.mosa  # noqa: E402,F401  (registers "mosa")
import routed.layers.routing_attention  # noqa: E402,F401  (registers "routing")
from routed.env import command_line, machine_header  # noqa: E402
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM  # noqa: E402
from routed.train import parse_options  # noqa: E402


def mqar(num: int, seq_len: int, vocab: int, kv_pairs: int, *, power_a: float = 0.01, split_vocab: bool = True,
         noise: str = "random", generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's multi-query associative recall.

    Returns ``inputs [num, seq_len]`` int64 token ids and ``labels [num, seq_len]``: at the position
    of each repeated key, the value the model must predict there (``-100`` elsewhere). As in
    Zoology, the value is only a label: the slot after a query holds filler, so no answer is shown
    in the input (shown answers let a model rule out the values already asked for, a shortcut that
    reaches ``H(P)/P`` recall without any retrieval).

    ``split_vocab``: keys from ``[1, vocab/2)``, values from ``[vocab/2, vocab)`` (Zoology's layout);
    False draws the ``2 * kv_pairs`` tokens of a sequence from one pool ``[1, vocab)`` (first half
    keys, second half values), so no token says by itself that it is a value. ``noise``: what the
    non-pair, non-query positions hold: ``"random"`` tokens of ``[1, vocab)`` that are none of the
    sequence's keys (a key never repeats except as its query, so every query has one answer), or
    ``"zero"`` (token 0, never a key or value: Zoology's ``random_non_queries=False``, used in its
    paper's MQAR figures).
    """
    context = 2 * kv_pairs
    space = (seq_len - context) // 2
    if kv_pairs < 1 or space < kv_pairs or vocab < 2 * kv_pairs + 2:
        raise ValueError(f"seq_len={seq_len} holds {space} query slots after {kv_pairs} pairs, and vocab={vocab} "
                         f"needs at least {2 * kv_pairs + 2} tokens; lower --kv-pairs or raise --seq-len/--vocab.")
    if noise not in ("random", "zero"):
        raise ValueError(f"noise={noise!r}: use 'random' or 'zero'.")
    if split_vocab:
        half = vocab // 2
        keys = torch.stack([torch.randperm(half - 1, generator=generator)[:kv_pairs] + 1 for _ in range(num)])
        values = torch.stack([torch.randperm(vocab - half, generator=generator)[:kv_pairs] + half
                              for _ in range(num)])
    else:
        kv = torch.stack([torch.randperm(vocab - 1, generator=generator)[:context] + 1 for _ in range(num)])
        keys, values = kv[:, :kv_pairs], kv[:, kv_pairs:]
    # Query gaps: a power law over the free slots (near slots likelier), distinct per sequence.
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.stack([torch.multinomial(p, kv_pairs, replacement=False, generator=generator) for _ in range(num)])
    tail_len = seq_len - context
    if noise == "zero":
        tail = torch.zeros(num, tail_len, dtype=torch.long)
    else:  # the r-th token of [1, vocab) that is not one of the row's keys, r uniform
        r = torch.randint(0, vocab - 1 - kv_pairs, (num, tail_len), generator=generator)
        s = keys.sort(1).values
        below = s - 1 - torch.arange(kv_pairs)  # non-keys of [1, vocab) below each sorted key
        tail = 1 + r + torch.searchsorted(below.contiguous(), r, right=True)
    labels = torch.full_like(tail, -100)
    tail.scatter_(1, 2 * gaps, keys)
    labels.scatter_(1, 2 * gaps, values)
    kvs = torch.stack([keys, values], -1).reshape(num, context)
    return torch.cat([kvs, tail], 1), torch.cat([torch.full_like(kvs, -100), labels], 1)


def run_one(attention: str, seq_len: int, args, options: dict, device) -> dict:
    torch.manual_seed(args.seed)
    cfg = RoutedLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, max_position_embeddings=seq_len, attention_types=attention,
                         **options)
    model = RoutedLMForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    data_gen = torch.Generator().manual_seed(args.seed)
    task = {"split_vocab": args.key_vocab == "split", "noise": args.noise}
    test_x, test_y = mqar(args.test_examples, seq_len, args.vocab, args.kv_pairs, **task,
                          generator=torch.Generator().manual_seed(args.seed + 1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    history, t0 = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = mqar(args.batch_size, seq_len, args.vocab, args.kv_pairs, **task, generator=data_gen)
        x, y = x.to(device), y.to(device)
        mask = y != -100
        with autocast:
            out = model.model(x)
            # The head only where a value is scored (kv_pairs of seq_len positions): all positions'
            # logits were [B, N, vocab] in float32, most of a step's time and memory.
            logits = model.lm_head(out[0][mask])
        loss = F.cross_entropy(logits.float(), y[mask])
        total = loss if out[2] is None else loss + out[2]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "loss": float(loss.detach())})
            print(f"  {attention} {seq_len}: step {step + 1} loss {history[-1]['loss']:.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = total_q = 0
    with torch.no_grad(), autocast:
        for i in range(0, args.test_examples, args.batch_size):
            x, y = test_x[i:i + args.batch_size].to(device), test_y[i:i + args.batch_size].to(device)
            mask = y != -100
            pred = model.lm_head(model.model(x)[0][mask]).argmax(-1)
            correct += int((pred == y[mask]).sum())
            total_q += int(mask.sum())
    return {"attention": attention, "seq_len": seq_len, "recall": correct / max(total_q, 1), "queries": total_q,
            "train_seconds": train_s, "final_loss": history[-1]["loss"] if history else None, "history": history,
            "config": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="mqar.json")
    ap.add_argument("--attention", nargs="+", default=["dense", "sliding_window", "routing", "mosa"])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--kv-pairs", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--test-examples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--key-vocab", choices=["shared", "split"], default="shared",
                    help="shared: a sequence's keys and values are distinct tokens of one pool; split: keys from the "
                         "lower half of the vocabulary, values from the upper half (Zoology's layout; a token then "
                         "tells by itself that it is a value, and the model settles on 'some value of the context' "
                         "(recall ~1/pairs) for a long time before it learns the lookup)")
    ap.add_argument("--noise", choices=["zero", "random"], default="zero",
                    help="filler between the queries: token 0 (Zoology's random_non_queries=False, as in its "
                         "paper's MQAR runs), or random tokens other than the sequence's keys (harder: learned "
                         "later and less far)")
    ap.add_argument("--option", action="append", default=[],
                    help="key=value config field for every model (e.g. kmeans_clusters=32, window_blocks=4)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny: seq 128, 8 pairs, 20 steps, blocks and windows of 16 (runs on the CPU)")
    args = ap.parse_args()
    if args.smoke:
        args.seq_lens, args.kv_pairs, args.vocab, args.hidden, args.steps = [128], 8, 256, 64, 20
        args.batch_size, args.test_examples, args.warmup = 8, 16, 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke_options = dict(attention_block_size=16, window_blocks=2, routing_window=16, kmeans_clusters=4,
                         mosa_sparsity=4) if args.smoke else {}
    options = {"mosa_selection": "threshold", **smoke_options, **parse_options(args.option)}
    result = {"machine": machine_header(), "command": command_line(), "options": options,
              "task": {"kv_pairs": args.kv_pairs, "vocab": args.vocab, "key_vocab": args.key_vocab,
                       "noise": args.noise}, "runs": []}
    for seq_len in args.seq_lens:
        for attention in args.attention:
            row = run_one(attention, seq_len, args, options, device)
            result["runs"].append(row)
            print(f"{attention} @ {seq_len}: recall {row['recall']:.3f} ({row['train_seconds']:.0f} s)", flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))  # after every run: a cut run keeps its rows
    print("\nattention | " + " | ".join(str(n) for n in args.seq_lens))
    for attention in args.attention:
        cells = [f"{r['recall']:.3f}" for n in args.seq_lens for r in result["runs"]
                 if r["attention"] == attention and r["seq_len"] == n]
        print(f"{attention} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
