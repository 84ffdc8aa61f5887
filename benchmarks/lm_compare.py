"""Dense vs sliding window vs MoBA vs NSA language models at equal size and equal training tokens.

Two parts, each optional:

* **train** (``--variants``): the same decoder (``--hidden-size``, ``--layers``, heads, context
  ``--seq-len``) with a different attention in every layer, trained on the same State of the Union
  token stream (GPT-2 BPE; 1790-2000 for training, 2001-2021 held out) for ``--train-tokens``
  tokens each. Reported per variant: parameters, training tokens/s, validation perplexity, passkey
  retrieval at the trained length and at twice it, and the loss curves (one PNG).
* **speed** (``--speed``): on random inputs, bf16 on CUDA: one attention module's forward+backward
  at ``--speed-lens`` for every variant against the dense module; the whole model's prefill
  (forward, batch 1) at ``--prefill-len``; the NSA module against the same module in its dense mode
  at ``--long-len``; and, at ``--router-len``, the routers' own time against the attention time
  the route saves (the issue's 10-15% budget).

Results merge into ``--out`` (JSON with a machine header), so variants can run in separate calls.

On the GPU machine (no network): carry the corpora and tokenizer archives and point the cache at
them, e.g. ``mkdir -p .routed-cache && cp ~/.cache/routed/*.tgz ~/.cache/routed/tokens -r
.routed-cache/`` here, then there::

    ROUTED_CACHE=.routed-cache PYTHONPATH=src python benchmarks/lm_compare.py --variants dense moba \\
        --out benchmarks/results/h100/lm_compare.json
    ROUTED_CACHE=.routed-cache PYTHONPATH=src python benchmarks/lm_compare.py --variants sliding_window nsa \\
        --out benchmarks/results/h100/lm_compare.json
    PYTHONPATH=src python benchmarks/lm_compare.py --variants --speed --out benchmarks/results/h100/lm_compare.json

``--smoke`` shrinks everything to run on the CPU in about a minute (a pipeline check, not a result).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed.bench import graphed_ms, time_median_ms  # noqa: E402
from routed.env import machine_header  # noqa: E402
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM  # noqa: E402
from routed.train import load_tokens, passkey_accuracy, train_model  # noqa: E402

VARIANTS = ("dense", "sliding_window", "moba", "nsa")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="attention variants to train (none: skip)")
    p.add_argument("--speed", action="store_true", help="run the speed part")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU pipeline check")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-tokens", type=int, default=16_000_000)
    p.add_argument("--max-minutes", type=float, default=None, help="per variant training time cap")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8, help="MoBA blocks per query block")
    p.add_argument("--nsa-top-n", type=int, default=8)
    p.add_argument("--window-blocks", type=int, default=8, help="sliding window / NSA window, in blocks")
    p.add_argument("--nsa-compress-block", type=int, default=32)
    p.add_argument("--nsa-compress-stride", type=int, default=16)
    p.add_argument("--cuda-graph", action="store_true", help="replay each training step as a CUDA graph")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile each model in this mode (e.g. reduce-overhead)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field for every variant, as in routed train (e.g. mosa_selection=threshold)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--passkey-trials", type=int, default=20)
    p.add_argument("--passkey-fraction", type=float, default=0.0,
                   help="fraction of training windows that are passkey prompts (0: plain text only)")
    p.add_argument("--speed-lens", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--prefill-len", type=int, default=32768)
    p.add_argument("--long-len", type=int, default=65536)
    p.add_argument("--router-len", type=int, default=32768)
    p.add_argument("--corpus", default="sotu")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--text-file", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="lm_compare.json")
    p.add_argument("--plot", default=None, help="loss curves PNG (default: next to --out)")
    p.add_argument("--label", default="", help="a title prefix for the plot, also stored in the JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden_size, args.layers, args.heads, args.kv_heads = 64, 2, 4, 2
        args.seq_len, args.batch_size, args.train_tokens, args.warmup = 256, 4, 4 * 256 * 6, 2
        args.block_size, args.top_k, args.nsa_top_n, args.window_blocks = 32, 2, 2, 2
        args.eval_every, args.eval_batches, args.passkey_trials = 3, 1, 1
        args.speed_lens, args.prefill_len, args.long_len, args.router_len = [512], 512, 1024, 512
    return args


def _train_namespace(args, attention: str) -> SimpleNamespace:
    """The ``routed train`` options for one variant (everything but the attention shared)."""
    return SimpleNamespace(
        attention=attention, layers=args.layers, hidden_size=args.hidden_size, heads=args.heads,
        kv_heads=args.kv_heads, block_size=args.block_size, route_q_block_size=None,
        window_blocks=args.window_blocks, top_k=args.top_k, nsa_top_n=args.nsa_top_n,
        nsa_compress_block=args.nsa_compress_block, nsa_compress_stride=args.nsa_compress_stride, dense_mode=False,
        backend=None, router_backend=None, seq_len=args.seq_len, max_len=2 * args.seq_len,
        batch_size=args.batch_size, steps=None, train_tokens=args.train_tokens, max_minutes=args.max_minutes,
        lr=args.lr, min_lr_ratio=0.1, warmup=args.warmup, weight_decay=0.1, grad_clip=1.0,
        eval_every=args.eval_every, eval_batches=args.eval_batches, device=args.device, threads=0,
        compile=args.compile, cuda_graph=args.cuda_graph, seed=args.seed, passkey_fraction=args.passkey_fraction,
        option=args.option)


def train_variants(args, device, save=lambda out: None) -> dict:
    """Every variant in turn; ``save(out)`` after each, so a run cut short keeps the ones it finished."""
    train_ids, val_ids, tok = load_tokens(args.corpus, args.tokenizer, args.text_file)
    out = {}
    for attention in args.variants:
        ns = _train_namespace(args, attention)
        res = train_model(ns, train_ids, val_ids, tok, progress=not args.no_progress)
        m = res.metrics
        passkey = passkey_accuracy(res.model, tok, val_ids.tolist(), [args.seq_len, 2 * args.seq_len],
                                   args.passkey_trials, device, seed=args.seed)
        out[attention] = {
            "parameters": m["parameters"], "parameters_without_embeddings": m["parameters_without_embeddings"],
            "tokens": m["tokens"], "train_tokens_per_second": m["train_tokens_per_second"],
            "steady_tokens_per_second": m["steady_tokens_per_second"], "train_seconds": m["train_seconds"],
            "val_loss": m["final"]["loss"], "val_ppl": m["final"]["ppl"], "passkey": passkey,
            "curve": [{"tokens": h["tokens"], "loss": h["loss"]} for h in m["history"]],
            "evals": m["evals"], "config": m["config"]}
        print(f"{attention}: ppl {m['final']['ppl']:.3f}, {m['train_tokens_per_second']:.0f} tokens/s "
              f"({m['steady_tokens_per_second']:.0f} over the second half), passkey "
              + ", ".join(f"{r['length']}: {r['correct']}/{r['trials']} ({r['digit_accuracy']:.0%} of digits, "
                          f"reading the key worth {r['retrieval_gain']:.2f} nats)" for r in passkey), flush=True)
        del res
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(out)
    return out


# --------------------------------------------------------------------------------------------------
def _time(fn, device, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (autotuning, allocations); CUDA
    events on a GPU, two wall-clock runs on the CPU."""
    return time_median_ms(fn, device, reps if device.type == "cuda" else 2)


def _config(args, attention: str, max_len: int, dense: bool = False) -> RoutedLMConfig:
    return RoutedLMConfig(
        vocab_size=50257, hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max_len, attention_types=attention,
        attention_block_size=args.block_size, window_blocks=args.window_blocks, moba_top_k=args.top_k,
        nsa_top_n=args.nsa_top_n, nsa_compress_block=args.nsa_compress_block,
        nsa_compress_stride=args.nsa_compress_stride, attention_dense=dense)


def _layer(args, attention: str, n: int, device, dtype, dense: bool = False):
    from routed.layers.registry import attention_class

    cfg = _config(args, attention, n, dense)
    torch.manual_seed(0)
    return attention_class(attention)(cfg, 0).to(device, dtype), cfg


def _rope(cfg, n, device, dtype):
    from routed.models.routed_lm import RotaryEmbedding

    rot = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(device)
    return rot(torch.empty(0, device=device, dtype=dtype), torch.arange(n, device=device)[None])


def speed(args, device, save=lambda res: None) -> dict:
    """The speed part; ``save(res)`` is called after each piece, so a run cut short keeps what it measured.
    The routers' cost runs first: it is the cheapest piece and decides the 10-15% budget."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res: dict = {"dtype": str(dtype).replace("torch.", ""), "module_fwd_bwd": [], "prefill": [], "nsa_long": None,
                 "router_cost": []}
    res["router_cost"] = router_cost(args, device, dtype)
    save(res)
    # One attention module, forward+backward, against the dense module.
    for n in args.speed_lens:
        row = {"seq_len": n}
        for attention in VARIANTS:
            layer, cfg = _layer(args, attention, n, device, dtype)
            x = torch.randn(1, n, args.hidden_size, device=device, dtype=dtype, requires_grad=True)
            pe = _rope(cfg, n, device, dtype)

            def step():
                out, _ = layer(x, pe)
                out.sum().backward()

            row[f"{attention}_ms"] = _time(step, device)
            del layer, x
        for attention in VARIANTS[1:]:
            row[f"{attention}_speedup"] = row["dense_ms"] / row[f"{attention}_ms"]
        res["module_fwd_bwd"].append(row)
        print("fwd+bwd", row, flush=True)
        save(res)
    # The whole model's prefill (forward, no logits but the last).
    n = args.prefill_len
    ids = torch.randint(0, 50257, (1, n), device=device)
    for attention in VARIANTS:
        torch.manual_seed(0)
        model = RoutedLMForCausalLM(_config(args, attention, n)).to(device, dtype).eval()
        with torch.no_grad():
            ms = _time(lambda: model(ids, logits_to_keep=1), device, reps=5)
        res["prefill"].append({"attention": attention, "seq_len": n, "ms": ms})
        print("prefill", res["prefill"][-1], flush=True)
        del model
        for r in res["prefill"]:
            r["speedup_vs_dense"] = res["prefill"][0]["ms"] / r["ms"]
        save(res)
    # NSA module against the same module in dense mode (forward).
    n = args.long_len
    nsa, cfg = _layer(args, "nsa", n, device, dtype)
    x = torch.randn(1, n, args.hidden_size, device=device, dtype=dtype)
    pe = _rope(cfg, n, device, dtype)
    with torch.no_grad():
        routed_ms = _time(lambda: nsa(x, pe), device)
        nsa.dense_mode = True
        dense_ms = _time(lambda: nsa(x, pe), device)
    res["nsa_long"] = {"seq_len": n, "nsa_ms": routed_ms, "same_module_dense_ms": dense_ms,
                       "speedup": dense_ms / routed_ms}
    print("nsa long", res["nsa_long"], flush=True)
    del nsa, x
    save(res)
    return res


def router_cost(args, device, dtype) -> list[dict]:
    """Router time against the attention time its route saves (dense attention - routed attention),
    on the q, k, v a layer would see (random), forward."""
    from routed import routed_attention
    from routed.layers.lm_attention import causal_sdpa

    n, d = args.router_len, args.hidden_size // args.heads
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, args.heads, n, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, args.kv_heads, n, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, args.kv_heads, n, d, device=device, dtype=dtype, generator=g)
    rows = []
    with torch.no_grad():
        dense_ms = _time(lambda: causal_sdpa(q, k, v), device)
        moba, _ = _layer(args, "moba", n, device, dtype)
        route = moba.router(q, k)
        rows.append(_cost_row("moba", _time(lambda: moba.router(q, k), device),
                              _time(lambda: routed_attention(q, k, v, route), device), dense_ms, route.density(),
                              _graph_ms(lambda: moba.router(q, k), device)))
        nsa, _ = _layer(args, "nsa", n, device, dtype)
        kc = nsa.compress_k(nsa.compress(k))
        _, lse = nsa.compressed_attention(q, kc, nsa.compress_v(nsa.compress(v)), n)
        route = nsa.router(q, kc, lse, n)
        rows.append(_cost_row("nsa_selection", _time(lambda: nsa.router(q, kc, lse, n), device),
                              _time(lambda: routed_attention(q, k, v, route), device), dense_ms, route.density(),
                              _graph_ms(lambda: nsa.router(q, kc, lse, n), device)))
    for r in rows:
        print("router cost", r, flush=True)
    rows.append(_kernel_checks(q, k, moba, device))
    print("router kernel checks", rows[-1], flush=True)
    return rows


def _kernel_checks(q, k, moba, device) -> dict:
    """On this GPU, at this size: the fused top-k route kernel against the PyTorch route builder on the
    same scores, and the one-launch mask-split counts against their PyTorch forms (both exact)."""
    from routed.ops.block_sparse import triton_ops
    from routed.route import transpose_block_ids
    from routed.routers.blocks import block_topk_route

    geo = dict(top_k=moba.router.top_k, q_len=q.shape[2], kv_len=k.shape[2], q_block_size=moba.router.q_block_size,
               kv_block_size=moba.router.block_size, sink_blocks=1, local_blocks=2)
    with torch.no_grad():
        s = moba.router.scores(q, k)
        a, b = (block_topk_route(s, **geo, backend=be) for be in ("triton", "reference"))
        route_equal = bool(torch.equal(a.kv_block_ids, b.kv_block_ids) and torch.equal(a.kv_block_counts,
                                                                                         b.kv_block_counts))
        ids, counts = a.kv_block_ids, a.kv_block_counts
        args = (a.q_len, a.kv_len, a.q_block_size, a.kv_block_size, True)
        clean_equal = bool(torch.equal(triton_ops.clean_block_counts(ids, counts, *args, False),
                                       triton_ops._clean_block_counts_torch(ids, counts, *args)))
        t_ids, t_counts, _, t_masked = triton_ops._transposed(ids, a.num_kv_blocks, (*args, False))
        w_ids, w_counts = transpose_block_ids(ids, a.num_kv_blocks)
        masked_equal = t_masked is None or bool(torch.equal(
            t_masked, triton_ops.masked_query_counts(w_ids, w_counts, *args, False)))
    return {"router": "kernel_checks", "topk_route_equal": route_equal, "clean_counts_equal": clean_equal,
            "masked_counts_equal": masked_equal, "transpose_in_one_launch": t_masked is not None,
            "ok": route_equal and clean_equal and masked_equal}


def _graph_ms(fn, device):
    """The router's GPU time alone, replayed from a CUDA graph (what it costs inside a graphed or
    compiled model, where its launches cost no host time); None off CUDA or when it cannot be captured."""
    return graphed_ms(fn).get("graph_ms_per_step") if device.type == "cuda" else None


def _cost_row(name, router_ms, routed_ms, dense_ms, density, router_graph_ms=None) -> dict:
    """``router_ms`` is a standalone call's wall time (mostly host time at 32k); ``router_graph_ms``
    its GPU time."""
    saved = dense_ms - routed_ms
    row = {"router": name, "router_ms": router_ms, "routed_attention_ms": routed_ms, "dense_attention_ms": dense_ms,
           "saved_ms": saved, "router_over_saved": router_ms / saved if saved > 0 else math.inf, "density": density}
    if router_graph_ms is not None:
        row["router_graph_ms"] = router_graph_ms
        row["router_graph_over_saved"] = router_graph_ms / saved if saved > 0 else math.inf
    return row


def plot_curves(train: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, r) in enumerate(train.items()):
        tok = [c["tokens"] / 1e6 for c in r["curve"]]
        loss = [c["loss"] for c in r["curve"]]
        k = max(1, len(loss) // 30)
        smooth = [sum(loss[max(0, j - k + 1):j + 1]) / len(loss[max(0, j - k + 1):j + 1]) for j in range(len(loss))]
        color = f"C{i}"
        ax.plot(tok, smooth, color=color, label=f"{name} (val ppl {r['val_ppl']:.2f})")
        ax.plot([e["tokens"] / 1e6 for e in r["evals"]], [e["loss"] for e in r["evals"]], "o", color=color, ms=3)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats): train (line), validation (dots)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = machine_header()
    result.setdefault("train", {})
    result["smoke"] = bool(args.smoke)
    result["label"] = args.label or ("CPU SMOKE (pipeline check, not a result)" if args.smoke else "")
    result["args"] = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.variants:
        trained_before = dict(result["train"])

        def save_train(done):
            result["train"] = {**trained_before, **done}
            out.write_text(json.dumps(result, indent=2))

        train_variants(args, device, save_train)
    if args.speed:

        def save(res):
            result["speed"] = res
            out.write_text(json.dumps(result, indent=2))

        speed(args, device, save)
    out.write_text(json.dumps(result, indent=2))
    if result["train"]:
        plot = Path(args.plot) if args.plot else out.with_suffix(".png")
        any_cfg = next(iter(result["train"].values()))
        plot_curves(result["train"], plot,
                    f"{result['label'] + ': ' if result['label'] else ''}"
                    f"{any_cfg['parameters'] / 1e6:.1f}M-parameter LMs, context {args.seq_len}, "
                    f"{args.corpus}, equal tokens")
        print(f"wrote {out} and {plot}")
    else:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
