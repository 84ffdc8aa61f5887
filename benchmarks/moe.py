"""Routed mixture-of-experts layer on a GPU: correctness first, then speed against Hugging Face's
eager Mixtral sparse block (same weights) and a dense SwiGLU MLP with the same active parameters.

    PYTHONPATH=src python benchmarks/moe.py --out moe.json            # the GPU run
    PYTHONPATH=src python benchmarks/moe.py --smoke --out moe_smoke.json  # tiny, any device

Every layer computes the same active FLOPs per token: ``2 * 3 * H * I * k`` forward (gate, up and
down projections of ``k`` experts of width ``I``; the dense MLP has width ``k * I``), 3x that
forward+backward. "routed / dense" is the routed layer's time per active FLOP over the dense MLP's.
Times are medians of CUDA-event-timed calls after warm-up; forward runs under ``torch.no_grad``,
forward+backward differentiates the input and every parameter. The routed layer's time includes
its router (logits, softmax, top-k, sort) and the Switch and z losses it reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed.bench import capture_cuda_graph  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.layers.moe import RoutedMoE  # noqa: E402
from routed.ops.expert_dispatch import expert_mlp, expert_mlp_reference  # noqa: E402
from routed.route import ExpertRoute  # noqa: E402
from routed.testing import poisoned_outputs, rel_err  # noqa: E402


def timed(fn, device, target_s=0.4, min_reps=5, max_reps=40) -> float:
    """Median milliseconds of ``fn()`` after warm-up."""
    cuda = device.type == "cuda"

    def once() -> float:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(2):
        first = once()
    reps = int(min(max_reps, max(min_reps, target_s * 1e3 / max(first, 1e-3))))
    return statistics.median(once() for _ in range(reps))


def graph_time(fn):
    """Median ms of ``fn`` replayed from a CUDA graph, or None if it cannot be captured."""
    try:
        return timed(capture_cuda_graph(fn, warmup=3).replay, torch.device("cuda"))
    except Exception as e:  # noqa: BLE001
        print("graph capture failed:", type(e).__name__, str(e).splitlines()[0][:200])
        return None


def profile(T, H, I, E, k, device, dtype, backend) -> None:
    """Print where the routed layer's forward+backward spends GPU time (top kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    moe = make_moe(H, I, E, k, device, dtype, backend)
    x = torch.randn(1, T, H, device=device, dtype=dtype, requires_grad=True)
    for _ in range(3):
        moe(x).sum().backward()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            moe(x).sum().backward()
        torch.cuda.synchronize()
    print(f"\nprofile: routed forward+backward x3, T={T} E={E} k={k}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    del moe, x
    torch.cuda.empty_cache()


def peak_mib(fn, device) -> float:
    """Peak memory above what was allocated before one call of ``fn`` (MiB; CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def hf_block(moe: RoutedMoE, device, dtype):
    """transformers' MixtralSparseMoeBlock, eager experts, sharing ``moe``'s weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=moe.hidden_size, intermediate_size=moe.intermediate_size,
                        num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                        router_jitter_noise=0.0, experts_implementation="eager")
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(cfg)
    block.gate.weight = moe.router.weight
    block.experts.gate_up_proj = moe.gate_up_proj
    block.experts.down_proj = moe.down_proj
    return block.to(device=device, dtype=dtype)


class DenseSwiGLU(torch.nn.Module):
    def __init__(self, hidden, inter, device, dtype):
        super().__init__()
        self.w13 = torch.nn.Parameter(torch.randn(2 * inter, hidden, device=device, dtype=dtype) * hidden ** -0.5)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, inter, device=device, dtype=dtype) * inter ** -0.5)

    def forward(self, x):
        g, u = F.linear(x, self.w13).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, self.w2)


def make_moe(H, I, E, k, device, dtype, backend, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        moe = RoutedMoE(H, I, E, k, backend=backend)
    return moe.to(dtype)


# --------------------------------------------------------------------------------------------------
def check(device, dtype, backend, smoke) -> dict:
    """Dispatch and the layer against float64 and against HF's eager block, forward and backward."""
    out = {}
    T, H, I, E, k = (203, 64, 32, 6, 2) if smoke else (3001, 256, 128, 16, 4)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(T, H, generator=g).to(device, dtype).requires_grad_()
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)]).to(torch.int32)  # expert E-1 idle
    ids[torch.rand(ids.shape, generator=g) < 0.1] = -1
    w = (torch.rand(T, k, generator=g) * (ids >= 0)).to(device, dtype).requires_grad_()
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, dtype).requires_grad_()
    route = ExpertRoute.from_expert_ids(ids.to(device), w, E)
    leaves = (x, w, w13, w2)
    f64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = expert_mlp_reference(f64[0], route.expert_ids, *f64[1:])
    base = expert_mlp_reference(x, route.expert_ids, w, w13, w2)
    dy = torch.randn(ref.shape, generator=g).to(device)
    want = torch.autograd.grad(ref, f64, dy.double())
    plain = torch.autograd.grad(base, leaves, dy.to(dtype))
    for name, fused in [(backend, None), (backend, False), ("batched", None)]:
        with poisoned_outputs():
            y = expert_mlp(x, route, w13, w2, backend=name, fused=fused)
            got = torch.autograd.grad(y, leaves, dy.to(dtype))
        errs = {"out": rel_err(y, ref), **{n: rel_err(a, r) for n, a, r in
                                          zip(("dx", "dweights", "dgate_up", "ddown"), got, want)}}
        plain_errs = {"out": rel_err(base, ref), **{n: rel_err(a, r) for n, a, r in
                                                   zip(("dx", "dweights", "dgate_up", "ddown"), plain, want)}}
        ok = all(errs[n] <= 3 * plain_errs[n] + 1e-6 for n in errs)
        out[f"dispatch_{name}{'_unfused' if fused is False else ''}"] = {"rel_err": errs, "plain_pytorch_rel_err": plain_errs, "ok": ok}
    # The whole layer against HF's eager block with the same weights.
    moe = make_moe(H, I, E, k, device, dtype, backend)
    block = hf_block(moe, device, dtype)
    xb = torch.randn(2, T // 2, H, generator=g).to(device, dtype)
    with torch.no_grad():
        y_routed, y_hf = moe(xb), block(xb)
        # float64 truth along the route the routed layer took
        r = moe.last.route
        y64 = expert_mlp_reference(xb.reshape(-1, H).double(), r.expert_ids, r.weights.double(),
                                   moe.gate_up_proj.double(), moe.down_proj.double()).view_as(xb)
    out["layer_vs_hf_eager"] = {"rel_err_routed_vs_f64": rel_err(y_routed, y64), "rel_err_hf_vs_f64": rel_err(y_hf, y64),
                                "rel_err_routed_vs_hf": rel_err(y_routed, y_hf)}
    out["layer_vs_hf_eager"]["ok"] = out["layer_vs_hf_eager"]["rel_err_routed_vs_f64"] <= \
        3 * out["layer_vs_hf_eager"]["rel_err_hf_vs_f64"] + 1e-6
    return out


def bench_one(T, H, I, E, k, device, dtype, backend) -> dict:
    moe = make_moe(H, I, E, k, device, dtype, backend)
    block = hf_block(moe, device, dtype)
    dense = DenseSwiGLU(H, k * I, device, dtype)
    x = torch.randn(1, T, H, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    layers = {"routed": moe, "routed_unfused": moe, "hf_eager": block, "dense": dense}
    flops_fwd = 2 * 3 * H * I * k * T
    row = {"tokens": T, "hidden": H, "intermediate": I, "experts": E, "top_k": k, "active_gflop_fwd": flops_fwd / 1e9}
    for name, layer in layers.items():
        params = list(layer.parameters())

        def fwd():
            with torch.no_grad():
                layer(x)

        xg = x.clone().requires_grad_()

        def fwd_bwd():
            for p in params:
                p.grad = None
            xg.grad = None
            layer(xg).backward(dy)

        moe.fused = False if name == "routed_unfused" else None  # the same layer without the Triton kernels
        t_f, t_fb = timed(fwd, device), timed(fwd_bwd, device)
        mem_f, mem_fb = peak_mib(fwd, device), peak_mib(fwd_bwd, device)
        moe.fused = None
        row[name] = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_tflops": flops_fwd / t_f / 1e9,
                     "fwd_bwd_tflops": 3 * flops_fwd / t_fb / 1e9,
                     "fwd_peak_mib": mem_f, "fwd_bwd_peak_mib": mem_fb}
        if name == "routed" and device.type == "cuda":
            # Token-choice routing and grouped_mm never read back to the host: the forward can be
            # captured in a CUDA graph, which removes the eager host overhead of small calls.
            row[name]["fwd_graph_ms"] = graph_time(fwd)
    r, h, d = row["routed"], row["hf_eager"], row["dense"]
    ru = row["routed_unfused"]
    row["unfused_over_fused_fwd"] = ru["fwd_ms"] / r["fwd_ms"]
    row["unfused_over_fused_fwd_bwd"] = ru["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    row["expert_weight_mib"] = 3 * E * H * I * torch.finfo(dtype).bits / 8 / 2**20
    row["speedup_vs_hf_fwd"] = h["fwd_ms"] / r["fwd_ms"]
    row["speedup_vs_hf_fwd_bwd"] = h["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    row["routed_over_dense_fwd"] = r["fwd_ms"] / d["fwd_ms"]
    row["routed_over_dense_fwd_bwd"] = r["fwd_bwd_ms"] / d["fwd_bwd_ms"]
    with torch.no_grad():
        moe(x)
    row["hf_experts_implementation"] = getattr(getattr(block.experts, "config", None), "_experts_implementation", None)
    row["load_max_over_mean"] = float(moe.last.route.counts.float().max() / moe.last.route.counts.float().mean())
    del moe, block, dense, layers, x, dy
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="moe.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any device (a test of the script)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 65536])
    ap.add_argument("--experts", default="8:2,64:8,128:2,128:8", help="experts:top_k pairs")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--backend", default=None, help="dispatch backend (default grouped_mm on a GPU, loop elsewhere)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = args.backend or ("grouped_mm" if device.type == "cuda" else "loop")
    H, I, tokens = args.hidden, args.intermediate, args.tokens
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.experts.split(",")]
    if args.smoke:
        H, I, tokens, pairs = 64, 32, [300], [(8, 2), (4, 4)]
    result = {"machine": machine_header(), "command": command_line(),
              "config": {"dtype": str(dtype), "backend": backend, "hidden": H, "intermediate": I,
                         "router": "token_choice softmax_topk (Mixtral)"}}
    result["check"] = check(device, dtype, backend, args.smoke)
    print(json.dumps(result["check"], indent=1))
    if device.type == "cuda" and not args.smoke:
        profile(8192, H, I, 8, 2, device, dtype, backend)
        profile(65536, H, I, 64, 8, device, dtype, backend)
    rows = []
    for E, k in pairs:
        for T in tokens:
            t0 = time.time()
            rows.append(bench_one(T, H, I, E, k, device, dtype, backend))
            print(f"T={T} E={E} k={k} done in {time.time() - t0:.1f}s", flush=True)
            result["bench"] = rows
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["bench"] = rows
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{result['machine'].get('gpu') or 'cpu'}  {dtype}  backend={backend}  H={H} I={I}  (ms, median)")
    print(f"{'tokens':>7} {'E':>4} {'k':>2} | {'routed':>8} {'HF eager':>9} {'dense':>8} {'xHF':>6} {'r/dense':>7} |"
          f" {'routed':>8} {'HF eager':>9} {'dense':>8} {'xHF':>6} {'r/dense':>7} | {'mem r/HF MiB':>14}")
    print(f"{'':17}| {'forward':^42} | {'forward+backward':^42} |")
    for r in rows:
        f = lambda m: f"{r['routed'][m]:8.2f} {r['hf_eager'][m]:9.2f} {r['dense'][m]:8.2f}"  # noqa: E731
        print(f"{r['tokens']:>7} {r['experts']:>4} {r['top_k']:>2} | {f('fwd_ms')} {r['speedup_vs_hf_fwd']:6.2f} "
              f"{r['routed_over_dense_fwd']:7.2f} | {f('fwd_bwd_ms')} {r['speedup_vs_hf_fwd_bwd']:6.2f} "
              f"{r['routed_over_dense_fwd_bwd']:7.2f} | {r['routed']['fwd_bwd_peak_mib']:6.0f}/"
              f"{r['hf_eager']['fwd_bwd_peak_mib']:<6.0f}")
    print(f"\n{'tokens':>7} {'E':>4} {'k':>2} | routed fwd in a CUDA graph: ms, / dense | unfused / fused: fwd, fwd+bwd")
    for r in rows:
        g = r["routed"].get("fwd_graph_ms")
        gs = "n/a" if g is None else f"{g:.2f}, {g / r['dense']['fwd_ms']:.2f}"
        print(f"{r['tokens']:>7} {r['experts']:>4} {r['top_k']:>2} | {gs:>39} | "
              f"{r['unfused_over_fused_fwd']:.2f}, {r['unfused_over_fused_fwd_bwd']:.2f}")
    ok = all(v.get("ok", True) for v in result["check"].values())
    print("checks:", "ok" if ok else "FAILED")


if __name__ == "__main__":
    main()
