"""The ``routed`` command line. Each subcommand is one ``_cmd_*`` function registered in
:func:`build_parser`: info, bench, eval (prefill, lm), train, show."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from .env import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    m = data["machine"]
    print(f"routed {m['routed']}  python {m['python']}  torch {m['torch']}  triton {m['triton'] or '-'}")
    print(f"cpu: {m['cpu']} x{m['cpu_count']}   gpu: {m['gpu'] or 'none'}" + (f" (cuda {m['cuda']})" if m["gpu"] else ""))
    print("optional: " + ", ".join(f"{k} {v or '-'}" for k, v in data["optional"].items()))
    if data["triton_interpret"]:
        print("TRITON_INTERPRET=1: Triton kernels run on the CPU in the interpreter (exact, slow)")
    for dev, table in data["backends"].items():
        print(f"backends on {dev}:")
        for name, status in table.items():
            print(f"  {name:<10} {status}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, config_dict, run_bench
    from .env import machine_header

    cfg = BenchConfig(seq_lens=tuple(args.seq_len), density=args.density, batch=args.batch, heads=args.heads,
                      kv_heads=args.kv_heads, head_dim=args.head_dim, block_size=args.block_size,
                      causal=not args.no_causal, dtype=args.dtype, backend=args.backend, backward=args.backward,
                      device=args.device, repeats=args.repeats, seed=args.seed)
    rows = run_bench(cfg, progress=not args.no_progress)
    cols = [("seq_len", "seq"), ("density", "density"), ("dense_ms", "dense ms"), ("routed_ms", "routed ms"),
            ("speedup", "speedup"), ("dense_tflops", "dense TF/s"), ("routed_tflops_on_computed_blocks", "routed TF/s")]
    what = "forward+backward" if cfg.backward else "forward"
    print(f"routed vs dense SDPA attention, {what}, {rows[0]['device']} {rows[0]['dtype']}, batch {cfg.batch}, "
          f"heads {cfg.heads}/{cfg.kv_heads or cfg.heads}, head_dim {cfg.head_dim}, blocks of {cfg.block_size}, "
          f"{'causal' if cfg.causal else 'full'}")
    print("  ".join(f"{h:>11}" for _, h in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>11}" for c, _ in cols))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine_header(), "config": config_dict(cfg), "results": rows}, indent=2))
        print(f"wrote {out}")
    return 0


def _cmd_eval_prefill(args: argparse.Namespace) -> int:
    import torch

    from .data.text import load_smollm2, sotu_text
    from .env import machine_header
    from .eval_prefill import PrefillEvalConfig, passkey_table, plot_quality_vs_density, run_prefill_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PrefillEvalConfig(lengths=tuple(args.lengths), policies=tuple(args.policies), block_size=args.block_size,
                            min_seq_len=args.min_seq_len, dense_layers=tuple(args.dense_layers),
                            sink_blocks=args.sink_blocks, local_blocks=args.local_blocks, windows=args.windows,
                            passkey_lengths=tuple(args.passkey_lengths), passkey_depths=tuple(args.passkey_depths),
                            passkey_policies=args.passkey_policies,
                            first_year=args.first_year, last_year=args.last_year, attn_error=not args.no_attn_error,
                            seed=args.seed)
    model, tok = load_smollm2(device=args.device)
    result = run_prefill_eval(model, tok, sotu_text(cfg.first_year, cfg.last_year), cfg,
                              progress=not args.no_progress)
    result = {"machine": machine_header(), "command": "routed " + " ".join(sys.argv[1:]),
              "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)",
              "text": f"State of the Union addresses {cfg.first_year}-{cfg.last_year}", **result}
    print(f"{'length':>7} {'policy':<26} {'ppl':>8} {'ratio':>7} {'density':>8} {'attn err':>9} {'s':>6}")
    for r in result["perplexity"]:
        err = "" if r["attn_rel_err_mean"] is None else f"{r['attn_rel_err_mean']:.3f}"
        print(f"{r['length']:>7} {r['policy']:<26} {r['ppl']:>8.3f} {r['ppl_ratio']:>7.4f} {r['density']:>8.3f} "
              f"{err:>9} {r['seconds']:>6.1f}")
    result["passkey_accuracy"] = passkey_table(result)
    print(f"{'length':>7} {'policy':<26} {'passkey':>8} {'digits':>7} {'logp(key)':>10} {'vs dense':>9} {'density':>8}")
    for r in result["passkey_accuracy"]:
        print(f"{r['length']:>7} {r['policy']:<26} {r['accuracy']:>8.2f} {r['digit_accuracy']:>7.2f} "
              f"{r['answer_logprob']:>10.3f} {r['logprob_vs_dense']:>+9.3f} {r['density']:>8.3f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    if args.plot:
        plot_quality_vs_density(result, args.plot, title="SmolLM2-135M, routed prefill vs dense (CPU, exact kernels)")
        print(f"wrote {args.plot}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import run_train

    run_train(args)
    return 0


def _cmd_eval_lm(args: argparse.Namespace) -> int:
    from .train import run_eval_lm

    run_eval_lm(args)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .show import run_show

    print(f"wrote {run_show(args)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="routed", description="Content-based routing inside transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, devices, and which backends can run (and why not)")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("bench", help="time routed vs dense attention on the best available device")
    s.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096], help="sequence lengths to time")
    s.add_argument("--density", type=float, default=0.125,
                   help="fraction of the key blocks a dense (causal) pass visits that the route keeps")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--heads", type=int, default=8)
    s.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    s.add_argument("--head-dim", type=int, default=64)
    s.add_argument("--block-size", type=int, default=64)
    s.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    s.add_argument("--backend", default=None, help="routed backend (default: automatic)")
    s.add_argument("--backward", action="store_true", help="time forward+backward")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="routed-bench.json", help="JSON results path ('' to skip)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_bench)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="evaluation", required=True)
    s = ev.add_parser("prefill", help="a pretrained LLM (SmolLM2-135M, offline) dense vs routed prefill: "
                                      "perplexity, attention error, passkey retrieval, density, time")
    s.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="perplexity prompt lengths")
    s.add_argument("--policies", nargs="+", default=["pooled:coverage=0.9", "strided:coverage=0.9"],
                   help="estimator:budget specs, e.g. pooled:coverage=0.9 strided:top_k=8,samples=8")
    s.add_argument("--block-size", type=int, default=64)
    s.add_argument("--min-seq-len", type=int, default=1024)
    s.add_argument("--dense-layers", type=int, nargs="*", default=[])
    s.add_argument("--sink-blocks", type=int, default=1)
    s.add_argument("--local-blocks", type=int, default=2)
    s.add_argument("--windows", type=int, default=1, help="perplexity windows per length")
    s.add_argument("--passkey-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    s.add_argument("--passkey-depths", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    s.add_argument("--passkey-policies", type=int, default=1,
                   help="how many of --policies (from the first) also run the passkey test")
    s.add_argument("--first-year", type=int, default=1990)
    s.add_argument("--last-year", type=int, default=2021)
    s.add_argument("--no-attn-error", action="store_true", help="skip the per-layer attention error (faster)")
    s.add_argument("--device", default=None)
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="routed-eval-prefill.json", help="JSON results path ('' to skip)")
    s.add_argument("--plot", default="routed-eval-prefill.png", help="quality-vs-density plot ('' to skip)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_eval_prefill)

    from .show import add_show_arguments
    from .train import add_eval_lm_arguments, add_train_arguments

    s = ev.add_parser("lm", help="a `routed train` checkpoint: validation perplexity and passkey retrieval")
    add_eval_lm_arguments(s)
    s.set_defaults(func=_cmd_eval_lm)
    s = sub.add_parser("train", help="train a small routed LM (dense, sliding_window, moba, nsa, routing, mosa) "
                                     "on offline text")
    add_train_arguments(s)
    s.set_defaults(func=_cmd_train)
    s = sub.add_parser("show", help="draw where a BiFormer's routing attention sent a query region (PNG)")
    add_show_arguments(s)
    s.set_defaults(func=_cmd_show)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
