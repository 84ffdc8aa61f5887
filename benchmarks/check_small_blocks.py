"""Block-sparse kernels at small blocks (16, 32: smaller than a tile, rows gathered) with the
cluster-window routes the Routing Transformer layer builds (positions, segments, pad slots), on
the GPU against a float64 reference; with and without tensor descriptors.

    PYTHONPATH=src ROUTED_AUTOTUNE=0 python benchmarks/check_small_blocks.py --out small_blocks.json

The first H200 run (Triton 3.6), before the fix in ``_walked_rows`` (triton_kernels.py), is
results/h200/small_blocks_before_fix.json; the fix alone passes every row:
results/h200/small_blocks_fix_only.json. ``bad_rows`` is a diagnostic (rows whose largest error
exceeds 50x the dtype's rounding of the whole output); ``ok`` is the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed import random_block_route, routed_attention  # noqa: E402
from routed.env import machine_header  # noqa: E402
from routed.routers.kmeans import cluster_window_route  # noqa: E402
from routed.testing import poisoned_outputs, rel_err  # noqa: E402


def case(route, hq, hkv, d, dtype, dev, g):
    rows = max(route.kv_block_ids.shape[0], 1 if route.q_positions is None else route.q_positions.shape[0])
    nq, nk = route.q_len, route.kv_len
    q = torch.randn(rows, hq, nq, d, generator=g).to(dev, dtype).requires_grad_()
    k = torch.randn(rows, hkv, nk, d, generator=g).to(dev, dtype).requires_grad_()
    v = torch.randn(rows, hkv, nk, d, generator=g).to(dev, dtype).requires_grad_()
    do = torch.randn(rows, hq, nq, d, generator=g).to(dev, dtype)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = routed_attention(q64, k64, v64, route, backend="reference")
    ref_g = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    with poisoned_outputs():
        out = routed_attention(q, k, v, route, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), do)
    row = {"out": rel_err(out, ref), "dq": rel_err(grads[0], ref_g[0]), "dk": rel_err(grads[1], ref_g[1]),
           "dv": rel_err(grads[2], ref_g[2]), "dtype_rounding": rel_err(ref.to(dtype), ref)}
    bad = (out.double() - ref).abs().amax(-1) > 50 * row["dtype_rounding"] * ref.abs().amax()
    row["bad_rows"] = int(bad.sum())
    if row["bad_rows"]:
        idx = bad.nonzero()[:8].tolist()
        row["first_bad"] = idx
    row["ok"] = all(row[x] < max(20 * row["dtype_rounding"], 1e-5) for x in ("out", "dq", "dk", "dv"))
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU interpreter)")
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    n_list = (70, 100) if a.small else (257, 1000, 4099)
    dtypes = (torch.float32,) if a.small else (torch.float32, torch.bfloat16)
    rows = []
    for tma in ("0", "1"):
        os.environ["ROUTED_TMA"] = tma
        for dtype in dtypes:
            for n in n_list:
                for w in (16, 32, 64):
                    clusters = max(1, n // w)
                    # (kind, route builder, query heads, kv heads), built in this order (one generator)
                    kinds = [
                        ("cluster_window", lambda: cluster_window_route(
                            torch.randint(0, clusters, (4, n), generator=g).to(dev), clusters, w)[0], 2, 1),
                        ("random_causal", lambda: random_block_route(n, block_size=w, blocks=3, heads=2, causal=True,
                                                                     generator=g, device=dev), 4, 2),
                        # queries offset by 7 from the keys: the query positions are then not 16-aligned,
                        # which alone kept Triton 3.6's divisibility analysis from the fault
                        ("random_causal_offset7", lambda: random_block_route(n - 7, n, block_size=w, blocks=3, heads=2,
                                                                             causal=True, generator=g, device=dev),
                         4, 2),
                    ]
                    for kind, build, hq, hkv in kinds:
                        r = dict(kind=kind, tma=tma, dtype=str(dtype)[6:], n=n, window=w,
                                 **case(build(), hq, hkv, 64, dtype, dev, g))
                        rows.append(r)
                        print(r, flush=True)
                    Path(a.out).write_text(json.dumps({"machine": machine_header(), "rows": rows}, indent=1))
    print("all ok:", all(r["ok"] for r in rows))
    for r in rows:
        if not r["ok"]:
            print("FAIL", r)


if __name__ == "__main__":
    main()
