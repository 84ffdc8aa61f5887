"""MoE language models on real text: token-choice vs similarity-aware vs attention-aware routing.

Trains one small decoder LM per router (``--routers``), every MoE layer with ``--experts`` SwiGLU
experts and ``--top-k`` per token, on the State of the Union addresses (GPT-2 BPE; 1790-2000 for
training, 2001-2021 held out), plus with ``--dense`` a dense-MLP LM of the same active parameters.
What is held equal: the seed (so the three MoE models start from identical weights: the routers
add no parameters, the similarity router using the hidden state itself as its features,
``--similarity-dim 0``), the data order, the parameter count, the active parameters, the steps.

Every ``--ckpt-every`` steps (and at step 0) the model is saved (``--ckpt-dir``) and evaluated on
fixed validation windows: perplexity, and per MoE layer each validation token's top-1 expert, its
load imbalance (largest expert load over the mean) and router entropy (of the distribution the
experts were chosen from: after mixing, for the aware routers; and ``gate_entropy``, of each
token's own softmax before mixing, the like-for-like number: averaging distributions raises the
entropy of the mixture whatever the router learned), and ``top1_margin`` (the mean gap between the
largest and second-largest probability the top-1 expert was chosen from: a smaller margin flips
under a smaller drift of the router). Reported per router:

* validation perplexity at the end, on ``--final-windows`` windows, with the standard error over
  windows and the paired difference to token choice (same windows, so the pairing removes the
  windows' own difficulty);
* routing fluctuation rate between consecutive checkpoints: the fraction of validation tokens
  whose top-1 expert changed, per layer and mean over layers, for every interval and averaged over
  the second half of training (when the loss changes slowly and flips are the router's own);
* load imbalance and router entropy at every checkpoint.

Writes JSON with a machine header to ``--out`` and a PNG (perplexity, fluctuation and imbalance
against step) next to it. ``--vocab-size V`` keeps the ``V - 1`` most frequent training tokens and
maps the rest to one ``<unk>`` id (the CPU run uses it: a 50k-wide head would cost most of the
step); 0 keeps GPT-2's whole vocabulary. The unigram perplexity of the same vocabulary is reported
as the floor to beat.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/moe_lm_quality.py --threads 1 --dense  # CPU run
    PYTHONPATH=src python benchmarks/moe_lm_quality.py --smoke                                # ~10 s check
    ROUTED_CACHE=.routed-cache PYTHONPATH=src python benchmarks/moe_lm_quality.py --device cuda \\
        --hidden-size 512 --layers 8 --heads 8 --seq-len 1024 --batch-size 16 --steps 4000 \\
        --vocab-size 0 --experts 16 --dense --out benchmarks/results/h100/moe_lm_quality.json

On a GPU machine without network, carry the corpus and tokenizer archives (``~/.cache/routed``)
and point ``ROUTED_CACHE`` at them, as in ``benchmarks/lm_compare.py``.
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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed.env import machine_header  # noqa: E402
from routed.experts_metrics import routing_fluctuation, top1_experts  # noqa: E402
from routed.layers.moe import RoutedMoE  # noqa: E402
from routed.models.routed_lm import RoutedLMConfig, RoutedLMForCausalLM  # noqa: E402
from routed.train import _autocast, _windows, build_optimizer, load_tokens, lr_at, sample_batch  # noqa: E402

ROUTERS = ("token_choice", "similarity", "attention")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS + ("expert_choice",))
    p.add_argument("--dense", action="store_true", help="also train a dense-MLP LM of the same active parameters")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a ~10 s pipeline check (not a result)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-intermediate-size", type=int, default=None,
                   help="each expert's width (default: the dense SwiGLU width // top-k)")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="Switch load-balancing loss weight")
    p.add_argument("--z-loss-coef", type=float, default=1e-3, help="router z-loss weight")
    p.add_argument("--balance-bias-rate", type=float, default=0.0, help="> 0: auxiliary-loss-free balancing")
    p.add_argument("--mix", type=float, default=0.5, help="weight of the neighbours' gate distributions")
    p.add_argument("--temperature", type=float, default=0.1, help="similarity router's softmax temperature")
    p.add_argument("--similarity-dim", type=int, default=0,
                   help="similarity router's learned feature size (0: the hidden state, no extra parameters)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint + evaluation interval (steps)")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows at every checkpoint")
    p.add_argument("--final-windows", type=int, default=256, help="validation windows of the final perplexity")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192,
                   help="keep the V-1 most frequent training tokens, the rest become <unk> (0: all of GPT-2's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--ckpt-dir", default="/tmp/routed-moe-lm-quality", help="where checkpoints go ('' : none)")
    p.add_argument("--out", default=None, help="JSON path (default results/cpu/moe_lm_quality.json; smoke: "
                                               "moe_lm_quality_smoke.json in --ckpt-dir)")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in --out (other seeds or models; same sizes) and add these")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden_size, args.layers, args.heads, args.experts = 32, 2, 2, 4
        args.seq_len, args.batch_size, args.steps, args.warmup, args.ckpt_every = 64, 2, 12, 2, 4
        args.eval_windows, args.final_windows, args.vocab_size = 4, 8, 1024
    if args.out is None:
        args.out = (str(Path(args.ckpt_dir or "/tmp") / "moe_lm_quality_smoke.json") if args.smoke
                    else str(RESULTS / "cpu" / "moe_lm_quality.json"))
    return args


# --------------------------------------------------------------------------------------------------
def compact_vocab(train: Tensor, val: Tensor, size: int) -> tuple[Tensor, Tensor, dict]:
    """Keep the ``size - 1`` most frequent training tokens (ids ``0 .. size - 2`` by frequency) and
    map every other token to ``size - 1`` (``<unk>``). Returns the remapped ids and what it kept."""
    counts = torch.bincount(train)
    keep = counts.argsort(descending=True)[:size - 1]
    table = torch.full((max(int(train.max()), int(val.max())) + 1,), size - 1, dtype=torch.long)
    table[keep] = torch.arange(keep.numel())
    tr, va = table[train], table[val]
    return tr, va, {"vocab_size": size, "train_unk_fraction": float((tr == size - 1).float().mean()),
                    "val_unk_fraction": float((va == size - 1).float().mean())}


def unigram_ppl(train: Tensor, val: Tensor, vocab: int) -> float:
    """Validation perplexity of the training unigram distribution (add-one smoothed): the floor a
    model that ignores context reaches."""
    p = (torch.bincount(train, minlength=vocab).double() + 1) / (train.numel() + vocab)
    return math.exp(-float(p.log()[val].mean()))


def model_config(args, router: str, vocab: int) -> RoutedLMConfig:
    """The shared architecture; ``router`` None builds the dense-MLP model of equal active parameters."""
    base = dict(vocab_size=vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=args.seq_len)
    width = args.moe_intermediate_size or RoutedLMConfig(**base).intermediate_size // args.top_k
    if router is None:
        return RoutedLMConfig(**base, intermediate_size=width * args.top_k)
    return RoutedLMConfig(**base, mlp_types="moe", num_experts=args.experts, num_experts_per_tok=args.top_k,
                          moe_intermediate_size=width, expert_router=router, router_aux_loss_coef=args.aux_loss_coef,
                          router_z_loss_coef=args.z_loss_coef, expert_mix=args.mix, expert_temperature=args.temperature,
                          expert_similarity_dim=args.similarity_dim, expert_balance_bias_rate=args.balance_bias_rate,
                          expert_causal=router != "expert_choice")


def parameter_counts(model: RoutedLMForCausalLM) -> dict:
    """Total, embedding and active parameters (an MoE layer's experts count ``k / E`` of theirs)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for m in model.modules():
        if isinstance(m, RoutedMoE):
            inactive += (1 - m.top_k / m.num_experts) * (m.gate_up_proj.numel() + m.down_proj.numel())
    return {"parameters": total, "embedding_parameters": model.model.embed_tokens.weight.numel(),
            "active_parameters": int(total - inactive)}


def moe_layers(model) -> list[RoutedMoE]:
    return [m for m in model.modules() if isinstance(m, RoutedMoE)]


@torch.no_grad()
def evaluate(model, windows: Tensor, batch_size: int, device: torch.device) -> dict:
    """Per-window mean next-token loss ``[W]`` and, per MoE layer, every token's top-1 expert
    ``[W * N]``, the expert loads and the router entropy, over the fixed ``windows [W, N + 1]``."""
    model.eval()
    layers = moe_layers(model)
    losses, top1 = [], [[] for _ in layers]
    counts = [torch.zeros(m.num_experts, device=device) for m in layers]
    entropy = [0.0 for _ in layers]
    gate_entropy = [0.0 for _ in layers]
    margin = [0.0 for _ in layers]
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i:i + batch_size].to(device)
        with _autocast(device):
            logits = model(x[:, :-1]).logits
        ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # [b, N]
        losses.append(ce.mean(1))
        for j, m in enumerate(layers):
            top1[j].append(top1_experts(m.last.route))
            counts[j] += m.last.route.counts.float()
            entropy[j] += float(m.last.entropy) * x.shape[0]
            gate_entropy[j] += float(m.last.gate_entropy) * x.shape[0]
            margin[j] += float(m.last.top1_margin) * x.shape[0]
    model.train()
    W = windows.shape[0]
    return {"window_loss": torch.cat(losses).cpu(), "top1": [torch.cat(t).cpu() for t in top1],
            "load": [(c / c.sum()).tolist() for c in counts],
            "imbalance": [float(c.max() / c.mean()) for c in counts], "entropy": [e / W for e in entropy],
            "gate_entropy": [e / W for e in gate_entropy], "top1_margin": [e / W for e in margin]}


def _mean_se(x: Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else 0.0


def train_one(args, name: str, router, seed: int, train_ids: Tensor, eval_win: Tensor, final_win: Tensor,
              vocab: int, device: torch.device) -> dict:
    """Train one model; checkpoints, evaluations and fluctuation between consecutive checkpoints."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    config = model_config(args, router, vocab)
    model = RoutedLMForCausalLM(config).to(device)
    opt = build_optimizer(model, args.lr, args.weight_decay, device)
    gen = torch.Generator().manual_seed(seed)  # the data order: one per seed, shared by every router
    hi = train_ids.numel() - args.seq_len - 1
    ckpt_root = Path(args.ckpt_dir) / f"{name}-seed{seed}" if args.ckpt_dir else None
    checkpoints, history, prev_top1 = [], [], None
    train_s = eval_s = 0.0

    def checkpoint(step: int) -> None:
        nonlocal prev_top1, eval_s
        t0 = time.perf_counter()
        if ckpt_root is not None:
            model.save_pretrained(ckpt_root / f"step{step:06d}")
        ev = evaluate(model, eval_win, args.eval_batch_size, device)
        loss, se = _mean_se(ev["window_loss"])
        row = {"step": step, "tokens": step * args.batch_size * args.seq_len, "val_loss": loss, "val_loss_se": se,
               "val_ppl": math.exp(loss)}
        if ev["top1"]:
            row.update(imbalance=ev["imbalance"], entropy=ev["entropy"], gate_entropy=ev["gate_entropy"],
                       top1_margin=ev["top1_margin"], load=ev["load"])
            if prev_top1 is not None:
                fl = [routing_fluctuation(a, b) for a, b in zip(prev_top1, ev["top1"])]
                row.update(fluctuation=fl, fluctuation_mean=sum(fl) / len(fl))
            prev_top1 = ev["top1"]
        checkpoints.append(row)
        eval_s += time.perf_counter() - t0

    checkpoint(0)
    bar = tqdm(range(args.steps), desc=f"{name} seed {seed}", disable=args.no_progress, dynamic_ncols=True,
               mininterval=5)
    model.train()
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(train_ids, args.seq_len, args.batch_size, gen, hi).to(device)
        t0 = time.perf_counter()
        with _autocast(device):
            out = model(x[:, :-1])
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss = ce if out.aux_loss is None else ce + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ce_v = float(ce.detach())
        train_s += time.perf_counter() - t0
        if not math.isfinite(ce_v):
            raise FloatingPointError(f"{name}: the loss became {ce_v} at step {step}; lower --lr.")
        history.append({"step": step + 1, "loss": ce_v,
                        **({} if out.aux_loss is None else {"aux_loss": float(out.aux_loss.detach())})})
        bar.set_postfix(loss=f"{ce_v:.3f}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            checkpoint(step + 1)
            bar.write(f"{name} step {step + 1}: val ppl {checkpoints[-1]['val_ppl']:.2f}"
                      + (f", fluctuation {checkpoints[-1]['fluctuation_mean']:.4f}"
                         if "fluctuation_mean" in checkpoints[-1] else ""))
    bar.close()
    final = evaluate(model, final_win, args.eval_batch_size, device)
    loss, se = _mean_se(final["window_loss"])
    late = [c["fluctuation_mean"] for c in checkpoints if "fluctuation_mean" in c and c["step"] > args.steps / 2]
    late_layers = [c["fluctuation"] for c in checkpoints if "fluctuation" in c and c["step"] > args.steps / 2]
    return {
        "router": router, "seed": seed, "config": {k: v for k, v in config.to_diff_dict().items()
                                                  if not k.startswith("_")},
        **parameter_counts(model), "steps": args.steps, "tokens": args.steps * args.batch_size * args.seq_len,
        "train_seconds": train_s, "eval_seconds": eval_s,
        "final": {"val_loss": loss, "val_loss_se": se, "val_ppl": math.exp(loss),
                  "val_tokens": final_win.shape[0] * args.seq_len, "imbalance": final["imbalance"],
                  "entropy": final["entropy"], "gate_entropy": final["gate_entropy"],
                  "top1_margin": final["top1_margin"]},
        "fluctuation_late_mean": sum(late) / len(late) if late else None,
        "fluctuation_late_per_layer": ([sum(col) / len(col) for col in zip(*late_layers)] if late_layers else None),
        "checkpoints": checkpoints, "history": history,
        "final_window_loss": final["window_loss"].tolist(),
    }


def _avg(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarize(runs: dict) -> list[dict]:
    """One row per model (means over seeds, and each seed's value), with the paired loss difference
    to token choice over the same validation windows and seeds."""
    rows = []
    base = runs.get("token_choice")
    for name, per_seed in runs.items():
        rs = list(per_seed.values())
        row = {"model": name, "seeds": sorted(per_seed), "parameters": rs[0]["parameters"],
               "active_parameters": rs[0]["active_parameters"], "steps": rs[0]["steps"], "tokens": rs[0]["tokens"],
               "val_ppl": _avg(r["final"]["val_ppl"] for r in rs),
               "val_ppl_per_seed": [r["final"]["val_ppl"] for r in rs],
               "val_loss": _avg(r["final"]["val_loss"] for r in rs),
               "val_loss_se": rs[0]["final"]["val_loss_se"],
               "train_seconds": _avg(r["train_seconds"] for r in rs)}
        if rs[0]["fluctuation_late_mean"] is not None:
            row["fluctuation_late_mean"] = _avg(r["fluctuation_late_mean"] for r in rs)
            row["fluctuation_late_per_seed"] = [r["fluctuation_late_mean"] for r in rs]
            row["fluctuation_last_interval"] = _avg(r["checkpoints"][-1]["fluctuation_mean"] for r in rs)
            row["imbalance_final_mean"] = _avg(_avg(r["final"]["imbalance"]) for r in rs)
            row["entropy_final_mean"] = _avg(_avg(r["final"]["entropy"]) for r in rs)
            if all("gate_entropy" in r["final"] for r in rs):  # files from before it was recorded lack it
                row["gate_entropy_final_mean"] = _avg(_avg(r["final"]["gate_entropy"]) for r in rs)
            if all("top1_margin" in r["final"] for r in rs):
                row["top1_margin_final_mean"] = _avg(_avg(r["final"]["top1_margin"]) for r in rs)
        if base is not None and name != "token_choice":
            diffs = [torch.tensor(per_seed[s]["final_window_loss"]) - torch.tensor(base[s]["final_window_loss"])
                     for s in per_seed if s in base]
            if diffs:
                d, se = _mean_se(torch.cat(diffs))
                row["val_loss_minus_token_choice"], row["val_loss_minus_token_choice_se"] = d, se
        rows.append(row)
    return rows


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, per_seed) in enumerate(runs.items()):
        for j, (seed, r) in enumerate(sorted(per_seed.items())):  # one colour per model, a line style per seed
            cp = r["checkpoints"]
            style = dict(color=colors[i % len(colors)], ls=("-", "--", ":", "-.")[j % 4], marker="o", ms=3,
                         label=f"{name} (seed {seed})")
            axes[0].plot([c["step"] for c in cp[1:]], [c["val_ppl"] for c in cp[1:]], **style)
            fl = [c for c in cp if "fluctuation_mean" in c]
            if fl:
                axes[1].plot([c["step"] for c in fl], [c["fluctuation_mean"] for c in fl], **style)
                axes[2].plot([c["step"] for c in cp], [sum(c["imbalance"]) / len(c["imbalance"]) for c in cp],
                             **style)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("validation perplexity")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("top-1 expert changed since the last checkpoint\n(fraction of validation tokens, mean over layers)")
    axes[2].set_ylabel("load imbalance (max / mean expert load)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# what may change between the calls merged into one result file: which models and seeds, and where things go
_MERGE_MAY_DIFFER = ("routers", "dense", "seeds", "device", "threads", "ckpt_dir", "out", "plot", "merge",
                     "no_progress")


def _recorded_args(args) -> dict:
    """The arguments as the results record them: paths by file name only (no machine folders)."""
    paths = ("out", "ckpt_dir", "text_file")
    return {k: (Path(v).name if k in paths and v else v) for k, v in vars(args).items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    train_ids, val_ids, _ = load_tokens("sotu", "gpt2")
    vocab, data = 50257, {"vocab_size": 50257}
    if args.vocab_size:
        train_ids, val_ids, data = compact_vocab(train_ids, val_ids, args.vocab_size)
        vocab = args.vocab_size
    data.update(corpus="State of the Union (train 1790-2000, validation 2001-2021)", tokenizer="gpt2",
                train_tokens=train_ids.numel(), val_tokens=val_ids.numel(),
                unigram_val_ppl=unigram_ppl(train_ids, val_ids, vocab))
    eval_win = _windows(val_ids, args.seq_len, args.eval_windows)
    final_win = _windows(val_ids, args.seq_len, args.final_windows)
    models = [(r, r) for r in args.routers] + ([("dense", None)] if args.dense else [])
    out = Path(args.out)
    runs: dict = {}  # name -> {seed (str): run}
    earlier_s = 0.0
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        # runs of other sizes or schedules are not comparable: refuse rather than mix them in one table
        differ = {k: (old["args"].get(k), v) for k, v in _recorded_args(args).items()
                  if k not in _MERGE_MAY_DIFFER and k in old["args"] and old["args"][k] != v}
        if differ:
            raise SystemExit(f"--merge: {out} was trained with other settings: " + ", ".join(
                f"--{k.replace('_', '-')} {a!r} there, {b!r} here" for k, (a, b) in differ.items())
                + "; pass the same values (they are under 'args' in that file) or write to another --out.")
        runs, earlier_s = old["runs"], old.get("wall_seconds_all_calls", old.get("wall_seconds", 0.0))
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> dict:  # after every model: a run cut by a time limit keeps the models it finished
        result = {"machine": machine_header(), "args": _recorded_args(args), "data": data,
                  "summary": summarize(runs), "runs": runs, "wall_seconds": time.perf_counter() - t_start}
        result["wall_seconds_all_calls"] = earlier_s + result["wall_seconds"]
        out.write_text(json.dumps(result, indent=1))
        return result

    for seed in args.seeds:
        for name, router in models:
            r = train_one(args, name, router, seed, train_ids, eval_win, final_win, vocab, device)
            runs.setdefault(name, {})[str(seed)] = r
            print(f"{name} seed {seed}: val ppl {r['final']['val_ppl']:.3f} (loss {r['final']['val_loss']:.4f} "
                  f"+- {r['final']['val_loss_se']:.4f}), late fluctuation {r['fluctuation_late_mean']}, "
                  f"{r['train_seconds']:.0f} s", flush=True)
            result = save()
    summary = result["summary"]
    r0 = next(iter(runs.values()))[str(args.seeds[0])]
    plot(runs, Path(args.plot) if args.plot else out.with_suffix(".png"),
         f"MoE LMs on SOTU: {r0['parameters'] / 1e6:.2f}M parameters ({r0['active_parameters'] / 1e6:.2f}M active), "
         f"{args.experts} experts top-{args.top_k}, context {args.seq_len}, {r0['tokens'] / 1e6:.2f}M tokens, "
         f"vocab {vocab}; unigram ppl {data['unigram_val_ppl']:.0f}")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
