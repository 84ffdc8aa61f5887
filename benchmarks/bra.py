"""Bi-Level Routing Attention on a GPU: correctness, then speed and memory of this BRA (block-sparse
kernels over region-major tokens) against the paper's gather formulation of the same algorithm and
against dense SDPA attention over the same tokens, at every routed BiFormer-S stage.

    PYTHONPATH=src python benchmarks/bra.py --out bra.json [--smoke]

BiFormer-S: stage dims 64/128/256 (heads of 32 channels), top-k 1/4/16 regions, regions of 8x8,
4x4 and 2x2 tokens (n_win 7 at 224, 16 at 512, 32 at 1024, so region sizes stay the paper's);
stage 4 is plain attention in BiFormer and is not routed. Two levels are timed: the attention core
(q, k, v, route -> out) and the whole module (qkv, routing, attention, LePE, output projection;
the dense variant swaps only the attention for SDPA over all tokens). Medians of CUDA-event
timings (triton.testing.do_bench); peak memory is the forward+backward peak above the inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_layers (--profile-module)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed import routed_attention  # noqa: E402
from routed.bench import graph_replay_ms  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.layers.bra import BiLevelRoutingAttention, bra_gather_attention  # noqa: E402
from routed.ops.block_sparse.triton_ops import tuned_configs  # noqa: E402
from routed.routers.regions2d import RegionGrid, region_topk_route  # noqa: E402
from routed.testing import poisoned_outputs, rel_err  # noqa: E402

STAGES = [(64, 1, 4), (128, 4, 8), (256, 16, 16)]  # (dim, topk, stride) of BiFormer-S stages 1-3
# input side -> (n_win, batch). The batches fill the GPU (the "batch as large as fits" for a
# comparison the host does not decide: at 1/8 of these every routed step read ~1 ms of host time);
# the gather formulation's module peaks at ~5 GiB with them.
RESOLUTIONS = {224: (7, 1024), 512: (16, 128), 1024: (32, 32)}


def bench(fn, rep_ms=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def peak_mem(fn) -> float:
    """Peak bytes allocated by ``fn`` above what was live before it (MiB)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def guarded(fn):
    """Run ``fn``; an out-of-memory error becomes None (the gather baseline runs out first)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return None


def check(dev) -> list[dict]:
    """BRA through the Triton kernels vs the gather formulation in float32 (same routing), at
    region sizes 64, 16, 4 and on a padded map; forward and input gradient."""
    rows = []
    for dim, n_win, topk, hw in [(64, 7, 1, (56, 56)), (128, 7, 4, (28, 28)), (256, 7, 16, (14, 14)),
                                 (64, 7, 4, (50, 45))]:
        torch.manual_seed(0)
        routed_m = BiLevelRoutingAttention(dim, dim // 32, n_win, topk, backend="triton").to(dev)
        gather_m = BiLevelRoutingAttention(dim, dim // 32, n_win, topk, impl="gather").to(dev)
        gather_m.load_state_dict(routed_m.state_dict())
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(4, *hw, dim, device=dev)
            xa, xb = x.clone().to(dtype).requires_grad_(), x.clone().requires_grad_()
            with poisoned_outputs():
                out = routed_m.to(dtype)(xa)
            ref = gather_m(xb)
            g = torch.randn_like(ref)
            with poisoned_outputs():
                (out.float() * g).sum().backward()
            (ref * g).sum().backward()
            row = dict(dim=dim, n_win=n_win, topk=topk, hw=list(hw), dtype=str(dtype).split(".")[-1],
                       out_rel_err=rel_err(out.float(), ref), dx_rel_err=rel_err(xa.grad.float(), xb.grad))
            row["ok"] = row["out_rel_err"] < (2e-2 if dtype == torch.bfloat16 else 1e-4) and \
                row["dx_rel_err"] < (3e-2 if dtype == torch.bfloat16 else 1e-4)
            rows.append(row)
            print("check", row)
        routed_m.float()
    return rows


def randn(*shape, dev, dtype, seed, requires_grad=False):
    """Normal noise drawn on the CPU (a failed CUDA-graph capture would leave the CUDA generator
    unusable for every later row)."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)
    return t.requires_grad_(requires_grad)


def stage_case(side: int, stage: int, dev, dtype, rep_ms: int, batch_mult: int = 1, graphs: bool = True,
               profile_module: bool = False) -> dict:
    dim, topk, stride = STAGES[stage]
    n_win, batch = RESOLUTIONS[side]
    batch = max(1, round(batch * batch_mult))
    hw = side // stride
    heads = dim // 32
    grid = RegionGrid(hw, hw, n_win)
    row = dict(side=side, stage=stage + 1, dim=dim, heads=heads, topk=topk, n_win=n_win, batch=batch, tokens=hw * hw,
               region_tokens=grid.tokens_per_region, density=topk / grid.num_regions)
    torch.manual_seed(0)

    # --- attention core: region-major q, k, v [B, heads, N, 32]
    q, k, v = (randn(batch, heads, grid.seq_len, 32, dev=dev, dtype=dtype, seed=i, requires_grad=True)
               for i in range(3))
    scale = dim ** -0.5
    means = lambda t: grid.region_means(t.detach().transpose(1, 2).flatten(2))  # noqa: E731
    routing = region_topk_route(means(q), means(k), grid, topk, scale)
    do = randn(*q.shape, dev=dev, dtype=dtype, seed=3)
    core = {
        "routed": lambda: routed_attention(q, k, v, routing.route, scale=scale, backend="triton"),
        "gather": lambda: bra_gather_attention(q, k, v, routing.region_ids, grid.tokens_per_region, scale),
    }
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        def dense(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        core[name] = dense
    for name, fn in core.items():
        def fwd_bwd(fn=fn):
            o = fn()
            torch.autograd.grad(o, (q, k, v), do)
        row[f"core_fwd_ms_{name}"] = guarded(lambda fn=fn: bench(lambda: fn(), rep_ms))
        row[f"core_fwdbwd_ms_{name}"] = guarded(lambda: bench(fwd_bwd, rep_ms))
        row[f"core_peak_mib_{name}"] = guarded(lambda: peak_mem(fwd_bwd))
        if graphs:  # the same work without the host: what a graphed or compiled training step sees
            row[f"core_fwdbwd_graph_ms_{name}"] = guarded(lambda: graph_replay_ms(fwd_bwd, bench))
    del q, k, v, do

    # --- whole module, NHWC [B, hw, hw, dim]
    x = randn(batch, hw, hw, dim, dev=dev, dtype=dtype, seed=4, requires_grad=True)
    routed_m = BiLevelRoutingAttention(dim, heads, n_win, topk, backend="triton").to(dev, dtype)
    gather_m = BiLevelRoutingAttention(dim, heads, n_win, topk, impl="gather").to(dev, dtype)
    gx = randn(*x.shape, dev=dev, dtype=dtype, seed=5)

    def dense_module():  # the same module with dense SDPA attention over all tokens
        m = routed_m
        t = m.qkv(x)
        qd, kd, vd = (u.flatten(1, 2).unflatten(-1, (heads, -1)).transpose(1, 2) for u in t.split([dim] * 3, -1))
        o = F.scaled_dot_product_attention(qd, kd, vd, scale=m.scale).transpose(1, 2).reshape(x.shape)
        o = o + m.lepe(t[..., 2 * dim:].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return m.wo(o)

    for name, fn in (("routed", lambda: routed_m(x)), ("gather", lambda: gather_m(x)), ("dense", dense_module)):
        def fwd_bwd(fn=fn):
            fn().backward(gx)
        row[f"module_fwd_ms_{name}"] = guarded(lambda fn=fn: bench(lambda: fn(), rep_ms))
        row[f"module_fwdbwd_ms_{name}"] = guarded(lambda: bench(fwd_bwd, rep_ms))
        row[f"module_peak_mib_{name}"] = guarded(lambda: peak_mem(fwd_bwd))
        if profile_module and name == "routed":  # where the module's time beside the attention goes
            from profile_layers import breakdown  # (imports lm_compare: only when asked)

            row["module_profile_routed"] = breakdown(fwd_bwd, dev, reps=5, top=20)
    return row


def ratio(a, b):
    return None if a is None or b is None else b / a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bra.json")
    ap.add_argument("--sides", type=int, nargs="+", default=[224, 512, 1024])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--smoke", action="store_true", help="one resolution, 1/64 of the batch, short timings")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--rep-ms", type=int, default=100, help="timing budget per measurement")
    ap.add_argument("--batch-mult", type=float, default=1,
                    help="scale each resolution's batch (224: 1024, 512: 128, 1024: 32) by this")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replays of the core")
    ap.add_argument("--profile-module", action="store_true",
                    help="also list the routed module's forward+backward kernels (torch.profiler)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    # The command as run, with the output folder (a path on the benchmark machine) left out.
    result = {"machine": machine_header(), "command": command_line(), "dtype": "bfloat16",
              "autotune": os.environ.get("ROUTED_AUTOTUNE", "1") != "0",
              "block_pack": os.environ.get("ROUTED_BLOCK_PACK", "1") != "0"}
    result["check"] = [] if args.no_check else check(dev)
    rows = result["stages"] = []
    sides = [224] if args.smoke else args.sides
    for side in sides:
        for stage in (s - 1 for s in sorted(args.stages)):
            row = stage_case(side, stage, dev, dtype, 20 if args.smoke else args.rep_ms,
                             args.batch_mult / 64 if args.smoke else args.batch_mult,
                             not args.no_graphs, args.profile_module)
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            result["tuned_configs"] = tuned_configs()
            Path(args.out).write_text(json.dumps(result, indent=1))  # after every row: a cut run keeps its rows

    print(f"\nall checks ok: {all(r['ok'] for r in result['check'])} ({len(result['check'])} run)")
    hdr = ("side stage tokens reg topk | core fwd+bwd ms routed / gather / cudnn | x gather x cudnn | "
           "module fwd+bwd ms routed / gather / dense | x gather x dense | peak MiB routed / gather / dense")
    print(hdr)
    fmt = lambda v: "OOM" if v is None else f"{v:.3f}"  # noqa: E731
    fmr = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        c = [r[f"core_fwdbwd_ms_{n}"] for n in ("routed", "gather", "sdpa_cudnn")]
        m = [r[f"module_fwdbwd_ms_{n}"] for n in ("routed", "gather", "dense")]
        p = [r[f"module_peak_mib_{n}"] for n in ("routed", "gather", "dense")]
        print(f"{r['side']} {r['stage']} {r['tokens']} {r['region_tokens']} {r['topk']} | "
              f"{' / '.join(map(fmt, c))} | {fmr(ratio(c[0], c[1]))} {fmr(ratio(c[0], c[2]))} | "
              f"{' / '.join(map(fmt, m))} | {fmr(ratio(m[0], m[1]))} {fmr(ratio(m[0], m[2]))} | "
              f"{' / '.join(map(fmt, p))}")
    for r in rows:
        prof = r.get("module_profile_routed")
        if prof:
            print(f"{r['side']} stage {r['stage']} routed module: host {prof['host_ms_per_step']:.2f} ms, GPU "
                  f"{prof.get('gpu_ms_per_step', 0):.2f} ms, {prof.get('kernels_per_step')} kernels; top: " + "; ".join(
                      f"{k['name'][:50]} {k['ms']:.3f} x{k['calls']}" for k in prof.get("top_kernels", [])[:8]))
    if any("core_fwdbwd_graph_ms_routed" in r for r in rows):
        print("graph-replayed core fwd+bwd ms routed / gather / cudnn | x gather x cudnn")
        for r in rows:
            g = [r.get(f"core_fwdbwd_graph_ms_{n}") for n in ("routed", "gather", "sdpa_cudnn")]
            print(f"{r['side']} {r['stage']} b{r['batch']} | {' / '.join(map(fmt, g))} | {fmr(ratio(g[0], g[1]))} "
                  f"{fmr(ratio(g[0], g[2]))}")


if __name__ == "__main__":
    main()
