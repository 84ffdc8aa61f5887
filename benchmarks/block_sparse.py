"""Block-sparse routed attention on a GPU: correctness at full size, then speed against
FlexAttention fed the identical block mask and dense SDPA (cuDNN and flash backends).

    PYTHONPATH=src python benchmarks/block_sparse.py --out results.json [--lengths 8192 32768 131072]

Effective TFLOP/s count the (query, key) pairs actually visible (causal pairs inside the routed
blocks; N(N+1)/2 per head for dense causal): forward 4*D flops per pair, forward+backward 3.5x
that. Times are medians (triton.testing.do_bench, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed import BlockRoute, random_block_route, routed_attention  # noqa: E402
from routed.bench import capture_cuda_graph, device_time_us, graph_replay_ms  # noqa: E402
from routed.env import machine_header  # noqa: E402
from routed.ops.block_sparse.flex import flex_routed_attention, route_to_block_mask  # noqa: E402
from routed.testing import poisoned_outputs, rel_err  # noqa: E402


# Every benchmark shape compiles FlexAttention anew; past dynamo's default limit it would fall
# back to an unfused implementation that materialises seq x seq scores.
torch._dynamo.config.cache_size_limit = 256
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = 256


@contextlib.contextmanager
def bwd_mode(mode: str):
    """Run the block-sparse backward in ``mode`` (ROUTED_BWD: auto, split or atomic)."""
    old = os.environ.get("ROUTED_BWD")
    os.environ["ROUTED_BWD"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ROUTED_BWD")
        else:
            os.environ["ROUTED_BWD"] = old


def do_bench(fn, rep_ms=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def graph_bench(fn):
    """GPU time of ``fn`` replayed from a CUDA graph (no Python or launch overhead), as decode
    loops run in practice; ``None`` if ``fn`` cannot be captured."""
    return graph_replay_ms(fn, do_bench)


def visible_pairs(route: BlockRoute, heads_q: int) -> int:
    """Causal-visible (query, key) pairs inside the routed blocks, summed over query heads."""
    ids, counts = route.kv_block_ids.long(), route.kv_block_counts.long()
    bq, bk, nq, nk = route.q_block_size, route.kv_block_size, route.q_len, route.kv_len
    off = nk - nq
    qi = torch.arange(route.num_q_blocks, device=ids.device).view(1, 1, -1, 1).expand_as(ids)
    live = torch.arange(ids.shape[-1], device=ids.device) < counts[..., None]
    total = 0
    for r in range(bq):  # per query row inside a block: keys of block j at or before it
        qpos = qi * bq + r
        in_range = qpos < nq
        k_lo = ids * bk
        k_hi = torch.clamp(ids * bk + bk, max=nk)
        upto = qpos + off + 1 if route.causal else k_hi
        n = (torch.minimum(k_hi, upto) - k_lo).clamp(min=0)
        total += int((n * (live & in_range)).sum())
    return total * heads_q // ids.shape[1]


def check(args, dev):
    """bf16 kernels vs a float32 reference at full size (forward, lse, dq, dk, dv)."""
    rows = []
    cases = [  # (N, Hq, Hkv, route heads, block, blocks, causal)
        (8192, 16, 16, 16, 128, 8, True),
        (8192, 16, 4, 4, 128, 32, True),
        (8000, 16, 4, 1, 64, 16, True),
        (8192, 16, 4, 4, 128, 8, False),
    ]
    g = torch.Generator(device="cpu").manual_seed(0)
    for n, hq, hkv, hr, bs, blocks, causal in cases:
        route = random_block_route(n, block_size=bs, blocks=blocks, heads=hr, causal=causal, generator=g, device=dev)
        q = torch.randn(1, hq, n, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
        k = torch.randn(1, hkv, n, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
        v = torch.randn(1, hkv, n, 128, generator=g).to(dev, torch.bfloat16).requires_grad_()
        do = torch.randn(1, hq, n, 128, generator=g).to(dev, torch.bfloat16)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref, ref_lse = routed_attention(q32, k32, v32, route, backend="reference", return_lse=True)
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
        # What bf16 itself costs: the float32 reference's output rounded to bf16.
        row = dict(n=n, hq=hq, hkv=hkv, route_heads=hr, block=bs, blocks=blocks, causal=causal,
                   bf16_rounding=rel_err(ref.bfloat16(), ref))
        for mode in ("split", "atomic"):  # both ways of getting dQ
            tag = "" if mode == "split" else "atomic_"
            try:
                with poisoned_outputs(), bwd_mode(mode):
                    out, lse = routed_attention(q, k, v, route, backend="triton", return_lse=True)
                    grads = torch.autograd.grad(out, (q, k, v), do)
            except Exception as e:  # noqa: BLE001 - a variant that cannot run fails the check, visibly
                row[tag + "error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                continue
            row.update({tag + "out": rel_err(out, ref), tag + "lse": rel_err(lse, ref_lse),
                        tag + "dq": rel_err(grads[0], ref_grads[0]), tag + "dk": rel_err(grads[1], ref_grads[1]),
                        tag + "dv": rel_err(grads[2], ref_grads[2])})
        try:  # FlexAttention as a second opinion; a shape it cannot run is recorded, not hidden
            flex_out, _ = flex_routed_attention(q.detach(), k.detach(), v.detach(),
                                                route_to_block_mask(route, 1, hq), 128 ** -0.5)
            row["flex_out"] = rel_err(flex_out, ref)
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        row["ok"] = all(row.get(p + x, 1.0) < 2e-2 for p in ("", "atomic_") for x in ("out", "lse", "dq", "dk", "dv"))
        rows.append(row)
        print("check", {k_: (round(v_, 6) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        del q, k, v, do, ref, ref_lse, ref_grads, q32, k32, v32
        gc.collect()
        torch.cuda.empty_cache()
    # Decode: 1..16 queries at the end of a long cache, the split path vs the reference.
    for nq, hq, hkv, hr in ((1, 16, 4, 4), (16, 16, 16, 16), (4, 32, 8, 8)):
        nk = 65536
        route = random_block_route(nq, nk, block_size=128, blocks=32, heads=hr, causal=True, generator=g, device=dev)
        q = torch.randn(1, hq, nq, 128, generator=g).to(dev, torch.bfloat16)
        k = torch.randn(1, hkv, nk, 128, generator=g).to(dev, torch.bfloat16)
        v = torch.randn(1, hkv, nk, 128, generator=g).to(dev, torch.bfloat16)
        with poisoned_outputs():
            out, lse = routed_attention(q, k, v, route, backend="triton", return_lse=True)
        ref, ref_lse = routed_attention(q.float(), k.float(), v.float(), route, backend="reference", return_lse=True)
        row = dict(decode=True, nq=nq, nk=nk, hq=hq, hkv=hkv, out=rel_err(out, ref), lse=rel_err(lse, ref_lse))
        row["ok"] = row["out"] < 2e-2 and row["lse"] < 2e-2
        rows.append(row)
        print("check", row, flush=True)
    return rows


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(args, dev, save=lambda rows: None):
    """Dense SDPA, FlexAttention and the routed kernel at each length; ``save(rows)`` after every
    row so a run cut short by a time limit still leaves what it measured."""
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    d = 128
    for n in args.lengths:
        for hkv in args.kv_heads:
            hq = 16
            q = torch.randn(1, hq, n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
            k = torch.randn(1, hkv, n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
            v = torch.randn(1, hkv, n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
            do = torch.randn_like(q)
            dense_pairs = n * (n + 1) // 2 * hq
            timings = {}

            def fwd_bwd(f):
                def step():
                    out = f()
                    torch.autograd.grad(out, (q, k, v), do)
                return step

            for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                def dense(backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != hq)
                try:
                    timings[name] = dict(fwd_ms=do_bench(dense), fwd_bwd_ms=do_bench(fwd_bwd(dense)),
                                         peak_mib=peak_mib(fwd_bwd(dense)), pairs=dense_pairs)
                except RuntimeError as e:  # a backend that cannot run this shape says so in the results
                    timings[name] = dict(error=str(e).splitlines()[0][:200])
            for blocks in args.blocks:
                route = random_block_route(n, block_size=128, blocks=blocks, heads=hkv, causal=True, generator=g,
                                           device=dev)
                pairs = visible_pairs(route, hq)
                bm = route_to_block_mask(route, 1, hq)
                routed = lambda: routed_attention(q, k, v, route, backend="triton")  # noqa: E731
                flex = lambda: flex_routed_attention(q, k, v, bm, d ** -0.5)[0]  # noqa: E731
                entry = {}
                for name, f in (("routed", routed), ("flex", flex)):
                    entry[name] = dict(fwd_ms=do_bench(f), fwd_bwd_ms=do_bench(fwd_bwd(f)),
                                       peak_mib=peak_mib(fwd_bwd(f)), pairs=pairs,
                                       # GPU time alone, replayed from a CUDA graph (no host overhead)
                                       fwd_graph_ms=graph_bench(f), fwd_bwd_graph_ms=graph_bench(fwd_bwd(f)))
                for mode in ("split", "atomic"):  # the backward's two ways to dQ, forced ("routed" picks one)
                    try:
                        with bwd_mode(mode):
                            entry[f"routed_bwd_{mode}"] = dict(fwd_bwd_ms=do_bench(fwd_bwd(routed)),
                                                               peak_mib=peak_mib(fwd_bwd(routed)), pairs=pairs)
                    except Exception as e:  # noqa: BLE001 - recorded in the results, not hidden
                        entry[f"routed_bwd_{mode}"] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                entry.update({k_: v_ for k_, v_ in timings.items()})
                for name, e in entry.items():
                    if "fwd_ms" in e:
                        e["fwd_tflops"] = 4 * d * e["pairs"] / e["fwd_ms"] / 1e9
                    if "fwd_bwd_ms" in e:
                        e["fwd_bwd_tflops"] = 3.5 * 4 * d * e["pairs"] / e["fwd_bwd_ms"] / 1e9
                    for key in ("fwd", "fwd_bwd"):
                        if e.get(f"{key}_graph_ms"):
                            mult = 3.5 if key == "fwd_bwd" else 1.0
                            e[f"{key}_graph_tflops"] = mult * 4 * d * e["pairs"] / e[f"{key}_graph_ms"] / 1e9
                row = dict(n=n, hq=hq, hkv=hkv, head_dim=d, block=128, blocks=blocks, density=route.density(),
                           results=entry)
                r, fl, cu = entry["routed"], entry["flex"], entry.get("sdpa_cudnn", {})
                row["fwd_tflops_vs_flex"] = r["fwd_tflops"] / fl["fwd_tflops"]
                row["fwd_bwd_tflops_vs_flex"] = r["fwd_bwd_tflops"] / fl["fwd_bwd_tflops"]
                for key in ("fwd", "fwd_bwd"):
                    if r.get(f"{key}_graph_ms") and fl.get(f"{key}_graph_ms"):
                        row[f"{key}_graph_vs_flex"] = fl[f"{key}_graph_ms"] / r[f"{key}_graph_ms"]
                for mode in ("split", "atomic"):
                    if "fwd_bwd_ms" in entry[f"routed_bwd_{mode}"]:
                        row[f"fwd_bwd_{mode}_vs_flex"] = fl["fwd_bwd_ms"] / entry[f"routed_bwd_{mode}"]["fwd_bwd_ms"]
                if "fwd_tflops" in cu:
                    row["fwd_tflops_vs_cudnn"] = r["fwd_tflops"] / cu["fwd_tflops"]
                    row["fwd_speedup_vs_cudnn"] = cu["fwd_ms"] / r["fwd_ms"]
                rows.append(row)
                save(rows)
                print("bench", json.dumps(row), flush=True)
                del bm
            del q, k, v, do
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def bench_decode(args, dev):
    """1 query against a 128k cache, 32 routed blocks of 128: time vs the bytes it must read."""
    from routed.ops.block_sparse import triton_ops

    rows = []
    g = torch.Generator(device="cpu").manual_seed(2)
    nk, d = 131072, 128
    # Device-to-device copy bandwidth, measured here (bytes read + written).
    buf = torch.empty(2**28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    copy_ms = do_bench(lambda: dst.copy_(buf))
    bw = 2 * buf.numel() / copy_ms / 1e9  # TB/s
    del buf, dst
    # What graph_bench reads for a graph of one tiny kernel: the timing's own floor (events, launch).
    one = torch.zeros(1, device=dev)
    null_graph_ms = graph_bench(lambda: one.add_(1))
    print(f"graph of one tiny kernel: {null_graph_ms * 1e3:.1f} us", flush=True)
    for hq, hkv in ((16, 16), (16, 4), (32, 8)):
        q = torch.randn(1, hq, 1, d, generator=g).to(dev, torch.bfloat16)
        k = torch.randn(1, hkv, nk, d, generator=g).to(dev, torch.bfloat16)
        v = torch.randn(1, hkv, nk, d, generator=g).to(dev, torch.bfloat16)
        route = random_block_route(1, nk, block_size=128, blocks=32, heads=hkv, causal=True, generator=g, device=dev)
        routed = lambda: routed_attention(q, k, v, route, backend="triton")  # noqa: E731
        bytes_read = hkv * 32 * 128 * d * 2 * 2 + q.numel() * 2 * 2
        floor_ms = bytes_read / (bw * 1e12) * 1e3
        bm = route_to_block_mask(route, 1, hq)
        flex = lambda: flex_routed_attention(q, k, v, bm, d ** -0.5)  # noqa: E731

        def dense():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != hq)

        row = dict(nq=1, nk=nk, hq=hq, hkv=hkv, blocks=32, bytes=bytes_read, copy_tb_s=bw, floor_ms=floor_ms,
                   null_graph_ms=null_graph_ms, pdl=triton_ops.decode_pdl(dev),
                   fused_merge=triton_ops.DECODE_FUSED_MERGE)
        for name, f in (("routed", routed), ("flex", flex), ("sdpa_flash_dense", dense)):
            row[f"{name}_ms"] = do_bench(f)
            row[f"{name}_graph_ms"] = graph_bench(f)
        row["routed_graph_over_floor"] = (row["routed_graph_ms"] or float("nan")) / floor_ms
        # The split launch alone (the combine launch swapped for nothing; its output is garbage, only its
        # time counts): how much of the gap to the floor is the split kernel's, how much the second launch's.
        row["routed_split_only_graph_ms"] = graph_bench_without_combine(routed)
        row["graph_kernels"] = graph_kernel_times(routed)
        if args.decode_sweep:
            row["sweep"] = decode_sweep(routed, floor_ms)
        rows.append(row)
        print("decode", json.dumps(row), flush=True)
    return rows


def graph_kernel_times(fn, replays=50):
    """The kernels of ``fn``'s CUDA graph and their own GPU time (CUPTI, microseconds per replay, L2
    not flushed): what the graph holds beside the attention kernels, and how long each one runs."""
    from torch.profiler import ProfilerActivity, profile

    try:
        graph = capture_cuda_graph(fn, warmup=3)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = [dict(name=e.key[:80], per_replay=e.count / replays, us_per_replay=device_time_us(e) / replays)
            for e in prof.key_averages() if device_time_us(e) > 0]
    return sorted(rows, key=lambda r: -r["us_per_replay"])


def decode_sweep(routed, floor_ms):
    """Every decode launch config forced in turn, graph-replayed: what the autotuner chose between."""
    from routed.ops.block_sparse import triton_ops

    sweep = []
    real = triton_ops._decode_candidates
    try:
        for cfg in real(128, False) + real(128, True):
            triton_ops._decode_candidates = lambda *_a, cfg=cfg: (cfg,)
            ms = graph_bench(routed)
            sweep.append(dict(cfg, graph_ms=ms, over_floor=None if ms is None else ms / floor_ms))
            print("decode config", json.dumps(sweep[-1]), flush=True)
    finally:
        triton_ops._decode_candidates = real
    return sweep


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def graph_bench_without_combine(fn):
    from routed.ops.block_sparse import triton_ops

    combine = triton_ops._decode_combine_kernel
    triton_ops._decode_combine_kernel = _NoLaunch()
    try:
        return graph_bench(fn)
    finally:
        triton_ops._decode_combine_kernel = combine


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--kv-heads", type=int, nargs="+", default=[16, 4])
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--decode-sweep", action="store_true", help="also time every decode launch config, forced")
    p.add_argument("--decode-merge", choices=["fused", "combine"], default=None,
                   help="decode's merge of the key splits: by the last split in the same launch, or a second "
                        "kernel (default: the library's DECODE_FUSED_MERGE)")
    p.add_argument("--decode-pdl", choices=["0", "1"], default=None,
                   help="launch decode's combine kernel as a programmatic dependent of the split kernel "
                        "(ROUTED_DECODE_PDL; default: the library's, off)")
    args = p.parse_args()
    if args.decode_pdl is not None:
        os.environ["ROUTED_DECODE_PDL"] = args.decode_pdl
    if args.decode_merge is not None:
        from routed.ops.block_sparse import triton_ops

        triton_ops.DECODE_FUSED_MERGE = args.decode_merge == "fused"
    dev = torch.device("cuda")
    # the output's file name only: the folder is the machine's own business
    result = {"machine": machine_header(), "config": dict(vars(args), out=Path(args.out).name)}
    out = Path(args.out)
    if not args.skip_check:
        result["check"] = check(args, dev)
        out.write_text(json.dumps(result, indent=1))
    if not args.skip_decode:
        result["decode"] = bench_decode(args, dev)
        out.write_text(json.dumps(result, indent=1))
    if not args.skip_bench:
        def save(rows):
            result["bench"] = rows
            out.write_text(json.dumps(result, indent=1))

        save(bench(args, dev, save))
    from routed.ops.block_sparse.triton_ops import tuned_configs

    result["tuned_configs"] = tuned_configs()
    out.write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result):
    for row in result.get("check", []):
        if not row["ok"]:
            print("CHECK FAILED", row)
    if result.get("check"):
        print("check:", "all ok" if all(r["ok"] for r in result["check"]) else "FAILURES")
    for row in result.get("decode", []):
        us = lambda x: float("nan") if x is None else x * 1e3  # noqa: E731
        print(f"decode hq={row['hq']:>2} hkv={row['hkv']:>2}: graph-replayed routed {us(row['routed_graph_ms']):6.1f} us"
              f" = {row['routed_graph_over_floor']:.2f}x the {us(row['floor_ms']):5.1f} us floor (split launch alone "
              f"{us(row.get('routed_split_only_graph_ms')):6.1f}); flex "
              f"{us(row['flex_graph_ms']):6.1f}, dense flash {us(row['sdpa_flash_dense_graph_ms']):6.1f} | eager: routed "
              f"{us(row['routed_ms']):6.1f} flex {us(row['flex_ms']):6.1f} dense {us(row['sdpa_flash_dense_ms']):6.1f} us")
        if isinstance(row.get("graph_kernels"), list):
            print("   kernels per replay (CUPTI, us): " + ", ".join(
                f"{k['name'][:40]} x{k['per_replay']:.0f} {k['us_per_replay']:.1f}" for k in row["graph_kernels"]))
    hdr = (f"{'N':>6} {'hkv':>3} {'blk':>3} {'dens':>5} | {'routed fwd':>10} {'flex fwd':>8} {'cudnn':>6} {'flash':>6}"
           f" TF/s | {'routed f+b':>10} {'flex f+b':>8} TF/s | fwd x flex  x cudnn | f+b x flex | graph fwd/f+b x flex"
           f" | f+b split/atomic x flex | mem MiB r/f/cudnn")
    print(hdr)
    for row in result.get("bench", []):
        e = row["results"]
        tf = lambda name, key: e.get(name, {}).get(key, float("nan"))  # noqa: E731
        print(f"{row['n']:>6} {row['hkv']:>3} {row['blocks']:>3} {row['density']:.3f} | "
              f"{tf('routed', 'fwd_tflops'):>10.0f} {tf('flex', 'fwd_tflops'):>8.0f} {tf('sdpa_cudnn', 'fwd_tflops'):>6.0f} "
              f"{tf('sdpa_flash', 'fwd_tflops'):>6.0f}      | {tf('routed', 'fwd_bwd_tflops'):>10.0f} "
              f"{tf('flex', 'fwd_bwd_tflops'):>8.0f}      | {row['fwd_tflops_vs_flex']:>10.2f} "
              f"{row.get('fwd_tflops_vs_cudnn', float('nan')):>7.2f} | {row['fwd_bwd_tflops_vs_flex']:>10.2f} | "
              f"{row.get('fwd_graph_vs_flex', float('nan')):>9.2f}/{row.get('fwd_bwd_graph_vs_flex', float('nan')):.2f} | "
              f"{row.get('fwd_bwd_split_vs_flex', float('nan')):>11.2f}/"
              f"{row.get('fwd_bwd_atomic_vs_flex', float('nan')):.2f} | "
              f"{tf('routed', 'peak_mib'):.0f}/{tf('flex', 'peak_mib'):.0f}/{tf('sdpa_cudnn', 'peak_mib'):.0f}")


if __name__ == "__main__":
    main()
