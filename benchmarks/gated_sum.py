"""NSA's gated branch sum on a GPU: the fused kernel against the same sum written in autograd ops
(what the NSA layer ran before), forward and forward+backward, replayed from CUDA graphs. Checked
first against float64 at full size.

    PYTHONPATH=src python benchmarks/gated_sum.py --out gated_sum.json [--shapes 1x8x8192x64 4x8x8192x64]

Shapes are ``BxHxNxD`` with three branches (compressed, selected, window), bf16; the gates are
``[B, N, 3, H]`` logits, as the NSA layer's gate projection gives them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed.bench import graphed_ms  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.ops.gated_sum import gated_sum, gated_sum_reference  # noqa: E402
from routed.testing import rel_err  # noqa: E402


def autograd_ops(z, branches):
    """The NSA layer's previous gated sum: sigmoid, broadcast multiplies and adds in the branches' dtype."""
    g = torch.sigmoid(z).permute(2, 0, 3, 1).unsqueeze(-1).to(branches[0].dtype)
    return g[0] * branches[0] + g[1] * branches[1] + g[2] * branches[2]


def one_shape(B, H, N, D):
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(N)
    z = torch.randn(B, N, 3, H, device=dev, dtype=dt, generator=g).requires_grad_()
    brs = [torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g).requires_grad_() for _ in range(3)]
    dout = torch.randn(B, H, N, D, device=dev, dtype=dt, generator=g)
    row = {"shape": [B, H, N, D], "branches": 3}
    ins64 = [t.detach().double().requires_grad_() for t in (z, *brs)]
    ref = gated_sum_reference(ins64[0], ins64[1:])
    want = torch.autograd.grad(ref, ins64, dout.double())
    for name, fn in (("fused", lambda: gated_sum(z, brs)), ("autograd_ops", lambda: autograd_ops(z, brs))):
        out = fn()
        got = torch.autograd.grad(out, (z, *brs), dout)
        row[f"{name}_out_rel_err"] = rel_err(out, ref)
        row[f"{name}_grad_rel_err"] = max(rel_err(a, b) for a, b in zip(got, want))
        row[f"{name}_fwd_graph_ms"] = graphed_ms(lambda: fn(), reps=50).get("graph_ms_per_step")

        def fwd_bwd():
            torch.autograd.grad(fn(), (z, *brs), dout)

        row[f"{name}_fwd_bwd_graph_ms"] = graphed_ms(fwd_bwd, reps=50).get("graph_ms_per_step")
    # bytes each way at the minimum: forward reads 3 branches and writes one; backward reads dout and
    # 3 branches, writes 3 branch gradients (the gates are N x 3H, negligible)
    row["fwd_min_bytes"] = 4 * B * H * N * D * 2
    row["bwd_min_bytes"] = 7 * B * H * N * D * 2
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1x8x8192x64", "4x8x8192x64", "1x8x32768x64", "1x16x32768x128"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    res = {"machine": machine_header(), "command": command_line(), "rows": []}
    for s in args.shapes:
        row = one_shape(*map(int, s.split("x")))
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    print("shape              | fused fwd  ops fwd | fused f+b  ops f+b | f+b x | fused rel err out/grad")
    for r in res["rows"]:
        f = lambda v: "  n/a " if v is None else f"{v * 1e3:6.1f}"  # noqa: E731
        ratio = (r["autograd_ops_fwd_bwd_graph_ms"] / r["fused_fwd_bwd_graph_ms"]
                 if r["fused_fwd_bwd_graph_ms"] and r["autograd_ops_fwd_bwd_graph_ms"] else float("nan"))
        print(f"{'x'.join(map(str, r['shape'])):18} | {f(r['fused_fwd_graph_ms'])} us {f(r['autograd_ops_fwd_graph_ms'])} us"
              f" | {f(r['fused_fwd_bwd_graph_ms'])} us {f(r['autograd_ops_fwd_bwd_graph_ms'])} us | {ratio:4.2f} |"
              f" {r['fused_out_rel_err']:.1e}/{r['fused_grad_rel_err']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
