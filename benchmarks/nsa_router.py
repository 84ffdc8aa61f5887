"""NSA's selection router on a GPU, piece by piece: the compressed-mass kernel (every launch config
the autotuner chooses from, and the tuned pick), the spread over selection blocks, the top-k route
kernel and the whole router call, each replayed from a CUDA graph (GPU time: what the router costs
inside a graphed or compiled model). The mass is checked first against the float32 PyTorch twin
at full size.

    PYTHONPATH=src python benchmarks/nsa_router.py --out nsa_router.json [--lengths 8192 32768 65536]

The shape is ``lm_compare.py``'s router-cost row: batch 1, 8 query heads over 2 KV heads, head dim 64,
bf16, selection blocks of 64, compressed blocks of 32 at stride 16, top-8 with 1 sink and 2 local
blocks. Inputs are random (the timing does not depend on what the softmax looks like).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed.bench import graphed_ms
from routed.env import command_line, machine_header
from routed.ops.block_topk.triton_kernels import nsa_compressed_mass_triton, nsa_mass_configs, nsa_mass_launch_with
from routed.routers.blocks import (NSASelectionRouter, _nsa_lse_torch, _nsa_mass_torch, _topk_route,
                                   num_compressed_blocks, spread_to_selection_blocks)


def graph_ms(fn) -> float | None:
    r = graphed_ms(fn, reps=50)
    if "graph_error" in r:
        print("  capture failed:", r["graph_error"], flush=True)
    return r.get("graph_ms_per_step")


def _f(ms) -> str:
    return "n/a" if ms is None else f"{ms:.3f}"


def one_length(n: int, args) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, hkv, d, sel, cb, st = args.heads, args.kv_heads, args.head_dim, 64, 32, 16
    scale = d ** -0.5
    g = torch.Generator(device=dev).manual_seed(n)
    nc = num_compressed_blocks(n, cb, st)
    q = torch.randn(1, hq, n, d, device=dev, dtype=dt, generator=g)
    kc = torch.randn(1, hkv, nc, d, device=dev, dtype=dt, generator=g)
    lse = _nsa_lse_torch(q, kc, n, cb, st, scale, 4096)
    row: dict = {"seq_len": n, "num_compressed": nc}

    with torch.no_grad():
        mass = nsa_compressed_mass_triton(q, kc, lse, n, sel, cb, st, scale)
        ref = _nsa_mass_torch(q, kc, lse, n, sel, cb, st, scale, 4096)
        row["mass_max_rel_err"] = float(((mass - ref).abs() / ref.abs().clamp_min(1e-3)).max())
        row["mass_ok"] = bool(torch.allclose(mass, ref, rtol=1e-4, atol=1e-5))

        configs = []
        out = torch.empty_like(mass)
        for cfg in nsa_mass_configs(hq // hkv, sel):
            ms = graph_ms(lambda c=cfg: nsa_mass_launch_with(c, q, kc, lse, out, n, sel, cb, st, scale))
            configs.append({**cfg, "graph_ms": ms, "ok": bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5))})
        row["mass_configs"] = configs
        # An earlier kernel version, timed in the same run when a copy of it sits beside the current one:
        # that version's triton_kernels.py as routed/ops/block_topk/_v1_kernels.py, its compile_opaque op
        # names suffixed "_v1" (never committed; how results/h200/nsa_router.json got its v1 rows).
        try:
            from routed.ops.block_topk import _v1_kernels as v1
        except ImportError:
            v1 = None
        if v1 is not None:
            row["v1_mass_configs"] = [
                {**cfg, "graph_ms": graph_ms(lambda c=cfg: v1.nsa_mass_launch_with(c, q, kc, lse, out, n, sel, cb, st,
                                                                                   scale)),
                 "ok": bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5))}
                for cfg in v1.nsa_mass_configs(hq // hkv, sel)]
            print("  v1 configs: " + ", ".join(
                f"{c['TILE_Q']}x{c['BLOCK_N']}/{c['num_warps']}w {_f(c['graph_ms'])}" for c in row["v1_mass_configs"]))
        row["mass_tuned_ms"] = graph_ms(lambda: nsa_compressed_mass_triton(q, kc, lse, n, sel, cb, st, scale))
        nsb = math.ceil(n / sel)
        row["spread_ms"] = graph_ms(lambda: spread_to_selection_blocks(mass, cb, st, sel, nsb))
        scores = spread_to_selection_blocks(mass, cb, st, sel, nsb)
        geo = (args.top_n, n, n, sel, sel, 1, 2)  # top-n, q/kv lengths, q/kv blocks, 1 sink, 2 local blocks
        row["topk_ms"] = graph_ms(lambda: _topk_route(scores, *geo, "triton"))
        # the top-k kernel spreading the mass as it reads it (what the router runs), against the PyTorch
        # spread and route on the same mass: rows whose kept blocks differ (near-ties only)
        row["topk_spread_ms"] = graph_ms(lambda: _topk_route(mass, *geo, "triton", spread=(cb, st)))
        fused = _topk_route(mass, *geo, "triton", spread=(cb, st)).kv_block_ids
        ref_ids = _topk_route(scores, *geo, "reference").kv_block_ids
        row["fused_spread_rows_differing"] = int((fused != ref_ids).any(-1).sum())
        router = NSASelectionRouter(sel, args.top_n, compress_block=cb, compress_stride=st, sink_blocks=1,
                                    local_blocks=2)
        row["router_ms"] = graph_ms(lambda: router(q, kc, lse, n))
    best = min((c["graph_ms"] for c in configs if c["graph_ms"] is not None), default=None)
    print(f"n={n}: mass ok={row['mass_ok']} (max rel err {row['mass_max_rel_err']:.2e}); configs "
          + ", ".join(f"{c['TILE_Q']}x{c['BLOCK_N']}/{c['num_warps']}w {_f(c['graph_ms'])}{'' if c['ok'] else ' WRONG'}"
                     for c in configs)
          + f"; best {_f(best)} tuned {_f(row['mass_tuned_ms'])} spread {_f(row['spread_ms'])} "
          f"topk {_f(row['topk_ms'])} topk+spread {_f(row['topk_spread_ms'])} (rows differing "
          f"{row['fused_spread_rows_differing']}) router {_f(row['router_ms'])} ms", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="nsa_router.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--top-n", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("nsa_router.py times CUDA graphs: it needs a CUDA GPU.")
    res = {"machine": machine_header(), "command": command_line(), "args": vars(args), "rows": []}
    for n in args.lengths:
        res["rows"].append(one_length(n, args))
        Path(args.out).write_text(json.dumps(res, indent=1))  # after every length: a cut run keeps its rows
    print(f"{'n':>6} {'mass ok':>7} {'mass':>7} {'spread':>7} {'topk':>7} {'fused':>7} {'router':>7}  "
          "(ms, graph-replayed; fused: top-k spreading in the kernel)")
    for r in res["rows"]:
        print(f"{r['seq_len']:>6} {str(r['mass_ok']):>7} " + " ".join(
            f"{_f(r[k]):>7}" for k in ("mass_tuned_ms", "spread_ms", "topk_ms", "topk_spread_ms", "router_ms")))


if __name__ == "__main__":
    main()
