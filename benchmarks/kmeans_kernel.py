"""The k-means router's assigning pass (``ops/nearest_centroid``) on its own: launch variants of the
fused kernel against PyTorch's chain for the same work, at the Routing Transformer layer's shapes of
benchmarks/clustered_attention.py (8 routed heads, head dim 64, windows of 256: ``N / 256`` clusters).

Per variant (products in "ieee" FMA or "tf32x3" tensor-core passes, rows and centroids per program,
warps) the pass that assigns the keys and adds the EMA sums, the same pass without the sums (what
the atomics cost), and the agreement of its clusters with PyTorch's float32 ones (nearly equidistant
centroids may differ in the last bits). Then a training call of the router (``train_step`` forward and
backward) with the kernels and with PyTorch, and its host time (eager launches, no GPU wait).

    PYTHONPATH=src python benchmarks/kmeans_kernel.py --out kmeans_kernel.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from routed.env import command_line, machine_header  # noqa: E402
from routed.ops.nearest_centroid import centroid_stats, triton_ops  # noqa: E402
from routed.routers.kmeans import KMeansRouter  # noqa: E402

# (BLOCK_N, BLOCK_C, num_warps, PRECISION): the first is the FMA launch the kernel began with,
# (128, 64, 8, "tf32x3") the default (triton_ops.ASSIGN_CONFIG)
VARIANTS = [
    (64, 64, 4, "ieee"), (128, 64, 8, "ieee"), (64, 32, 4, "ieee"),
    (64, 64, 4, "tf32x3"), (128, 64, 4, "tf32x3"), (128, 64, 8, "tf32x3"), (128, 128, 8, "tf32x3"),
    (64, 128, 4, "tf32x3"), (32, 64, 4, "tf32x3"), (256, 64, 8, "tf32x3"),
]


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def host_ms(fn, reps: int = 20) -> float:
    """Milliseconds of host time per call (launches queued, no wait), after a synchronised start."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    ms = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    return ms


def torch_chain(k, c):
    """What the router's PyTorch path does for the same outputs (float32 unit keys, similarities, argmax,
    cosines to the chosen centroid, index_add_ sums)."""
    H, C, D = c.shape
    kn = k.float() / torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
    a = torch.einsum("bhnd,hcd->bhnc", kn, c).argmax(-1)
    flat = (torch.arange(H, device=k.device).view(1, H, 1) * C + a).reshape(-1)
    sums = torch.zeros(H * C, D, device=k.device).index_add_(0, flat, kn.reshape(-1, D))
    return a, sums


def case(n: int, heads: int = 8, d: int = 64, window: int = 256) -> dict:
    dev = torch.device("cuda")
    C = max(1, n // window)
    g = torch.Generator(device="cpu").manual_seed(n)
    k = torch.randn(1, n, heads, d, generator=g).to(dev, torch.bfloat16).transpose(1, 2)  # a projection's view
    c = F.normalize(torch.randn(heads, C, d, generator=g), dim=-1).to(dev)
    row = {"n": n, "heads": heads, "d": d, "clusters": C, "variants": []}
    a_ref, sums_ref = torch_chain(k, c)
    row["torch_chain_ms"] = bench(lambda: torch_chain(k, c))
    default = dict(triton_ops.ASSIGN_CONFIG)
    for bn, bc, w, prec in VARIANTS:
        triton_ops.ASSIGN_CONFIG.update(BLOCK_N=bn, BLOCK_C=bc, num_warps=w, PRECISION=prec)
        entry = {"BLOCK_N": bn, "BLOCK_C": bc, "num_warps": w, "PRECISION": prec}
        try:
            a, _, _, sums = centroid_stats(k, c, want_sums=True, backend="triton")
            entry["agree_with_torch"] = (a == a_ref).float().mean().item()
            entry["sums_max_diff"] = (sums - sums_ref.view_as(sums)).abs().max().item()
            entry["assign_sums_ms"] = bench(lambda: centroid_stats(k, c, want_sums=True, backend="triton"))
            entry["assign_only_ms"] = bench(lambda: centroid_stats(k, c, backend="triton"))
        except Exception as e:  # noqa: BLE001 - a config this Triton cannot compile is a result too
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row["variants"].append(entry)
        print(n, json.dumps(entry), flush=True)
    triton_ops.ASSIGN_CONFIG.clear()
    triton_ops.ASSIGN_CONFIG.update(default)
    # a whole training call of the router (keys and one query head per key, as the layer's routed heads)
    q = torch.randn(1, n, heads, d, generator=g).to(dev, torch.bfloat16).transpose(1, 2).unsqueeze(2)
    for backend in ("triton", "reference"):
        router = KMeansRouter(heads, d, C, backend=backend).to(dev)
        kk, qq = k.detach().requires_grad_(), q.detach().requires_grad_()

        def step():
            _, loss = router.train_step(kk, qq)
            loss.backward()

        row[f"train_step_{backend}_ms"] = bench(step)
        row[f"train_step_{backend}_host_ms"] = host_ms(step)
        print(n, backend, row[f"train_step_{backend}_ms"], row[f"train_step_{backend}_host_ms"], flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--out", default="kmeans_kernel.json")
    a = p.parse_args()
    result = {"machine": machine_header(), "command": command_line(), "rows": []}
    for n in a.lengths:
        result["rows"].append(case(n))
        Path(a.out).write_text(json.dumps(result, indent=1))
    for r in result["rows"]:
        print(f"N {r['n']} C {r['clusters']}: torch chain {r['torch_chain_ms']:.3f} ms; train_step triton "
              f"{r['train_step_triton_ms']:.3f} (host {r['train_step_triton_host_ms']:.3f}) / torch "
              f"{r['train_step_reference_ms']:.3f} (host {r['train_step_reference_host_ms']:.3f}) ms")
        for e in r["variants"]:
            name = f"{e['BLOCK_N']}x{e['BLOCK_C']} w{e['num_warps']} {e['PRECISION']}"
            if "error" in e:
                print(f"  {name:<22} {e['error'][:90]}")
            else:
                print(f"  {name:<22} assign+sums {e['assign_sums_ms']:.3f}  assign {e['assign_only_ms']:.3f} ms  "
                      f"agree {e['agree_with_torch']:.5f}  sums diff {e['sums_max_diff']:.1e}")


if __name__ == "__main__":
    main()
