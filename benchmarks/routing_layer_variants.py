"""Which of the Routing Transformer layer's memory savings pay for their time (GPU).

The layer (``RoutingAttention``) keeps its memory down three ways: the k-means commitment loss on the
slot-order copies the attention saves anyway (so no projection stays alive for its backward), V
projected per head group (so the local heads' saved values do not keep the routed heads' alive) and
``o_proj`` as one GEMM per head group (no cat of the heads' outputs for it to save). This script
switches the last two off one at a time by patching the layer's methods in this process only, and
reports each variant's forward+backward step replayed as a CUDA graph and its peak memory (above
weights, inputs and the output's gradient), at the shapes of ``clustered_attention.py``'s routing rows.

    python benchmarks/routing_layer_variants.py --lengths 8192 65536 --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clustered_attention import guarded, lm_config, peak_mem, rope  # noqa: E402  (beside this script)
from routed.bench import graphed_ms  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.layers.routing_attention import RoutingAttention  # noqa: E402


def _v_unsplit(self, proj, x):  # one GEMM, the groups as views of it
    sizes = [self.kv_local * self.head_dim, self.kv_routed * self.head_dim]
    return list(proj(x).split(sizes, -1))


def _o_cat(self, outs):  # the heads' cat, then one o_proj GEMM
    return self.o_proj(torch.cat(outs, -1) if len(outs) > 1 else outs[0])


VARIANTS = {
    "as_built": {},
    "v_one_gemm": {"_per_head_group": _v_unsplit},
    "o_proj_on_cat": {"_project_out": _o_cat},
    "both_off": {"_per_head_group": _v_unsplit, "_project_out": _o_cat},
}


def run(n: int, variant: str, dev, dtype, hidden=1024, heads=16, local_heads=8, window=256) -> dict:
    originals = {name: getattr(RoutingAttention, name) for name in VARIANTS[variant]}
    for name, fn in VARIANTS[variant].items():
        setattr(RoutingAttention, name, fn)
    try:
        torch.manual_seed(0)
        d = hidden // heads
        cfg = lm_config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads, head_dim=d,
                        routing_heads=heads - local_heads, kmeans_clusters=n // window, routing_window=window,
                        routing_local_window=window)
        layer = RoutingAttention(cfg, 0).to(dev, dtype).train()
        x = torch.randn(1, n, hidden, device=dev, dtype=dtype, requires_grad=True)
        pe = rope(n, d, dev, dtype)
        g_out = torch.randn(1, n, hidden, device=dev, dtype=dtype)

        def step():
            out, aux = layer(x, pe)
            torch.autograd.backward([out, aux], [g_out, None])

        step()
        row = {"n": n, "variant": variant, "peak_mib": guarded(lambda: peak_mem(step, dev))}
        graphed = guarded(lambda: graphed_ms(step))
        row.update(graphed if isinstance(graphed, dict) else {"graph_error": graphed})
        return row
    finally:
        for name, fn in originals.items():
            setattr(RoutingAttention, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the variants (interleaved)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("routing_layer_variants.py measures CUDA graphs and CUDA memory: it needs a GPU.")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for n in args.lengths:
        for r in range(args.repeats):
            for v in args.variants:
                row = run(n, v, dev, dtype)
                row["round"] = r
                rows.append(row)
                print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_header(), "command": command_line(), "rows": rows}, indent=1))
    print("\nn | variant | graphed ms per round | peak MiB")
    for n in args.lengths:
        for v in args.variants:
            mine = [r for r in rows if r["n"] == n and r["variant"] == v]
            ms = " / ".join(f"{r.get('graph_ms_per_step', float('nan')):.3f}" for r in mine)
            print(f"{n} | {v} | {ms} | {mine[0]['peak_mib']:.1f}")


if __name__ == "__main__":
    main()
