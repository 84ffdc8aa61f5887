"""Where one attention layer's forward+backward spends its time: GPU time per kernel (torch.profiler),
host time per step against GPU time per step, and the number of kernels launched, for the LM
layers of benchmarks/lm_compare.py (same configuration) at one length.

    PYTHONPATH=src python benchmarks/profile_layers.py --n 8192 --layers dense sliding_window moba nsa routing mosa

The routers (moba_router, nsa_router) are profiled per call the same way. A layer whose host time
per step exceeds its GPU time is launch-bound: fewer, larger launches (or a
CUDA graph) are what speed it up, not faster kernels; the last column is the step replayed as one
CUDA graph (the time without any host cost), or the row says why it cannot be captured. The table
printed last is one row per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lm_compare  # noqa: E402

from routed.bench import device_time_us, graphed_ms  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _warm_up(step, device) -> None:
    """Two calls first: compiles, k-means initialisation, cached routes."""
    for _ in range(2):
        step()
    _sync(device)


def breakdown(step, device, reps: int = 10, top: int = 12) -> dict:
    """Host and wall milliseconds per call of ``step`` (after two warm-up calls: compiles, k-means
    initialisation, cached routes), and on a GPU the kernel time per call, kernels per call and the
    ``top`` kernels by time (torch.profiler)."""
    _warm_up(step, device)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    host_ms = (time.perf_counter() - t0) / reps * 1e3  # until the last launch was queued
    _sync(device)
    wall_ms = (time.perf_counter() - t0) / reps * 1e3
    row = {"host_ms_per_step": host_ms, "wall_ms_per_step": wall_ms}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                step()
            _sync(device)
        kernels = sorted(((e.key, device_time_us(e) / reps / 1e3, e.count // reps) for e in prof.key_averages()
                          if device_time_us(e) > 0), key=lambda r: -r[1])
        row["gpu_ms_per_step"] = sum(k[1] for k in kernels)
        row["kernels_per_step"] = sum(k[2] for k in kernels)
        row["top_kernels"] = [{"name": k[0][:90], "ms": k[1], "calls": k[2]} for k in kernels[:top]]
    return row


def _layer_step(args, name: str, n: int, device, dtype):
    layer, cfg = lm_compare._layer(args, name, n, device, dtype)
    layer.train()
    x = torch.randn(1, n, args.hidden_size, device=device, dtype=dtype, requires_grad=True)
    pe = lm_compare._rope(cfg, n, device, dtype)

    def step():
        out, aux = layer(x, pe)
        loss = out.float().square().mean() + (aux if aux is not None else 0)
        loss.backward()

    return step


def host_profile(step, device, top: int, reps: int = 10) -> list[dict]:
    """The ``top`` functions by cumulative host time per call of ``step`` (cProfile, after warm-up):
    where a launch-bound layer's host milliseconds go."""
    import cProfile
    import pstats

    _warm_up(step, device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        step()
    prof.disable()
    _sync(device)
    stats = pstats.Stats(prof).stats
    rows = sorted(((f"{Path(fn).name}:{line}:{name}", cc, tt, ct) for (fn, line, name), (cc, _nc, tt, ct, _) in
                   stats.items()), key=lambda r: -r[3])
    return [{"function": f, "calls": c // reps, "self_ms": tt / reps * 1e3, "cum_ms": ct / reps * 1e3}
            for f, c, tt, ct in rows[:top]]


def profile_layer(args, name: str, n: int, device, dtype, top: int) -> dict:
    """One training step (forward, loss, backward) of the LM comparison's ``name`` layer."""
    return {"layer": name, "seq_len": n, **breakdown(_layer_step(args, name, n, device, dtype), device, top=top)}


def profile_router(args, name: str, n: int, device, dtype, top: int) -> dict:
    """One call of the MoBA or NSA selection router (``moba_router`` / ``nsa_router``) on the q, k a
    layer of the LM comparison sees at ``n`` tokens (random), as lm_compare.py's router cost row."""
    layer, cfg = lm_compare._layer(args, name.removesuffix("_router"), n, device, dtype)
    d = args.hidden_size // args.heads
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, args.heads, n, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, args.kv_heads, n, d, device=device, dtype=dtype, generator=g)
    with torch.no_grad():
        if name == "moba_router":
            step = lambda: layer.router(q, k)  # noqa: E731
        else:
            kc = layer.compress_k(layer.compress(k))
            _, lse = layer.compressed_attention(q, kc, layer.compress_v(layer.compress(k)), n)
            step = lambda: layer.router(q, kc, lse, n)  # noqa: E731
        row = {"layer": name, "seq_len": n, **breakdown(step, device, top=top)}
    del layer
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--layers", nargs="+", default=["dense", "sliding_window", "moba", "nsa", "routing", "mosa",
                                                   "moba_router", "nsa_router"],
                   help="LM layers (a training step), or moba_router / nsa_router (one routing call)")
    p.add_argument("--top", type=int, default=12, help="kernels listed per layer")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replay of each layer step")
    p.add_argument("--host-profile", type=int, default=0, metavar="K",
                   help="also cProfile each layer step's host time and keep its K costliest functions")
    p.add_argument("--out", default=None, help="JSON with a machine header")
    a, rest = p.parse_known_args(argv)
    args = lm_compare.parse_args(["--variants", *rest])  # the LM comparison's layer configuration
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"machine": machine_header(), "command": command_line(), "rows": []}
    for n in a.n:
        for name in a.layers:
            profiler = profile_router if name.endswith("_router") else profile_layer
            row = profiler(args, name, n, device, dtype, a.top)
            if a.host_profile and not name.endswith("_router"):
                row["host_functions"] = host_profile(_layer_step(args, name, n, device, dtype), device, a.host_profile)
                for f in row["host_functions"]:
                    print(f"  host {name:<10} {n:>6} {f['cum_ms']:8.3f} ms cum {f['self_ms']:7.3f} self x{f['calls']:<4} "
                          f"{f['function']}")
            result["rows"].append(row)
            for k in row.get("top_kernels", []):
                print(f"  {name:<15} {n:>6} {k['ms']:8.3f} ms  x{k['calls']:<4} {k['name']}")
            if a.out:
                Path(a.out).write_text(json.dumps(result, indent=1))
    if device.type == "cuda" and not a.no_graphs:  # last: a failed capture may leave the stream unusable
        for row in result["rows"]:
            if not row["layer"].endswith("_router"):
                row.update(graphed_ms(_layer_step(args, row["layer"], row["seq_len"], device, dtype)))
                if "graph_error" in row:
                    print(f"  {row['layer']} {row['seq_len']}: no CUDA graph: {row['graph_error']}")
                if a.out:
                    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"{'layer':<15} {'N':>6} | {'host ms':>8} {'wall ms':>8} {'GPU ms':>8} {'kernels':>8} {'graph ms':>8}")
    for r in result["rows"]:
        print(f"{r['layer']:<15} {r['seq_len']:>6} | {r['host_ms_per_step']:8.2f} {r['wall_ms_per_step']:8.2f} "
              f"{r.get('gpu_ms_per_step', float('nan')):8.2f} {r.get('kernels_per_step', 0):8d} "
              f"{r.get('graph_ms_per_step', float('nan')):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
