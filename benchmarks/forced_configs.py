"""Launch-config experiments on the block-sparse kernels that the quick autotuner does not reach, each
config forced in turn (ROUTED_AUTOTUNE=0 runs the first candidate of the list it is given) in one
process, with FlexAttention on the identical block mask beside them (issue 3's shapes: batch 1, 16
query heads, head dim 128, bf16, causal, blocks of 128):

* ``--part dkdv``: dk/dv launch configs (the backward's largest kernel, ~58% of forward+backward),
  including the tutorial-style small query tiles with 4 warps and deep pipelines that the candidate
  lists lack; per config the dk/dv kernel's own GPU time (CUPTI, inside a replayed CUDA graph), the
  graph-replayed forward+backward against Flex's, and dK/dV against the first config's.
* ``--part fwd``: forward tiles 128x128 against 128x64 (the untuned default) with tensor descriptors.
* ``--part nsa``: the NSA LM layer's training step at 8k (benchmarks/lm_compare.py's configuration:
  blocks of 64, head dim 64, 8 query / 2 KV heads; three branches on the same kernels), first autotuned
  afresh three times (no disk cache: what a new machine picks, and how far the picks' times spread),
  then every candidate of one kernel forced at a time (forward plain and with tensor descriptors, dq,
  dk/dv) with the others at their defaults; per variant the graph-replayed step and its kernels' times.
* ``--part layout``: the kernels with head-major ``[B, H, N, D]`` tensors against the token-major views
  that Hugging Face layers pass (``[B, N, H, D]`` memory; outputs and gradients follow the input's
  layout), at an LM layer's shape, per kernel (CUPTI time inside a replayed CUDA graph).

(Triton's automatic warp specialisation, ``tl.range(..., warp_specialize=True)``, was tried on the
forward and dq walks with this script on the H200 under Triton 3.6: with 8 warps it compiled and
changed no time, with 4 it failed to compile; benchmarks/NOTES.md, eleventh session.)

    PYTHONPATH=src python benchmarks/forced_configs.py --out forced_configs.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("ROUTED_AUTOTUNE", "0")  # the forced config is each list's first
os.environ.setdefault("ROUTED_TMA", "only")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from block_sparse import graph_kernel_times  # noqa: E402
from routed import random_block_route, routed_attention  # noqa: E402
from routed.bench import graph_replay_ms  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.ops.block_sparse import triton_ops  # noqa: E402
from routed.ops.layout import token_major  # noqa: E402
from routed.ops.block_sparse.flex import flex_routed_attention, route_to_block_mask  # noqa: E402

# Configs are (BLOCK_M, BLOCK_N, num_warps, num_stages); for dk/dv BLOCK_M is the walked query tile and
# BLOCK_N the program's own key tile. (name, dk/dv config, tensor descriptors)
DKDV_VARIANTS = [
    ("64x64 w8 s3 (default)", (64, 64, 8, 3), True),
    ("64x128 w8 s2 (H100 pick)", (64, 128, 8, 2), True),
    ("32x128 w8 s3", (32, 128, 8, 3), True),
    ("32x128 w4 s3", (32, 128, 4, 3), True),
    ("32x128 w4 s4", (32, 128, 4, 4), True),
    ("32x128 w4 s5", (32, 128, 4, 5), True),
    ("16x128 w4 s4", (16, 128, 4, 4), True),
    ("32x64 w4 s4", (32, 64, 4, 4), True),
    ("64x64 w4 s4", (64, 64, 4, 4), True),
    ("64x128 w8 s2 plain", (64, 128, 8, 2), False),
    ("32x128 w4 s5 plain", (32, 128, 4, 5), False),
    ("32x64 w4 s3 plain", (32, 64, 4, 3), False),
]
# (name, forward config); dq and dk/dv stay at their defaults
FWD_VARIANTS = [
    ("fwd 128x64 w8 s3 (default)", (128, 64, 8, 3)),
    ("fwd 128x128 w8 s3", (128, 128, 8, 3)),
    ("fwd 128x128 w8 s2", (128, 128, 8, 2)),
]
FIXED_FWD, FIXED_DQ = (128, 128, 8, 3), (128, 64, 8, 3)


def bench(fn):
    import triton.testing

    return graph_replay_ms(fn, lambda f: triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median"))


def force(fwd=FIXED_FWD, dq=FIXED_DQ, dkdv=None, tma=True):
    """Make each kernel's candidate list one config (ROUTED_AUTOTUNE=0 launches the first)."""
    triton_ops.QUICK["fwd_tma"] = triton_ops.QUICK["fwd"] = [fwd]
    triton_ops.QUICK["dq"] = [dq]
    if dkdv is not None:
        triton_ops.QUICK["dkdv"] = [dkdv]
    os.environ["ROUTED_TMA"] = "only" if tma else "0"


def kernel_us(kernels, part):
    if isinstance(kernels, dict):  # the capture failed: its error
        return None
    return sum(k["us_per_replay"] for k in kernels if part in k["name"])


def part_variants(dev, shapes, which):
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    d, hq = 128, 16
    for n, hkv, blocks in shapes:
        q = torch.randn(1, hq, n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
        k = torch.randn(1, hkv, n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
        v = torch.randn(1, hkv, n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
        do = torch.randn_like(q)
        route = random_block_route(n, block_size=128, blocks=blocks, heads=hkv, causal=True, generator=g, device=dev)
        bm = route_to_block_mask(route, 1, hq)

        def fwd_bwd(f):
            def step():
                torch.autograd.grad(f(), (q, k, v), do)
            return step

        flex = lambda: flex_routed_attention(q, k, v, bm, d ** -0.5)[0]  # noqa: E731
        routed = lambda: routed_attention(q, k, v, route, backend="triton")  # noqa: E731
        row = dict(n=n, hkv=hkv, blocks=blocks, flex_fwd_ms=bench(flex), flex_fwd_bwd_ms=bench(fwd_bwd(flex)),
                   variants={})
        ref = None
        variants = DKDV_VARIANTS if which == "dkdv" else [(name, cfg, True) for name, cfg in FWD_VARIANTS]
        for name, cfg, tma in variants:
            force(dkdv=cfg, tma=tma) if which == "dkdv" else force(fwd=cfg)
            try:
                with torch.no_grad():
                    out = routed().float()
                grads = [t.float() for t in torch.autograd.grad(routed(), (q, k, v), do)]
                if ref is None:
                    ref = [out, *grads]
                diffs = [(a - b).abs().max().item() for a, b in zip([out, *grads], ref)]
                kernels = graph_kernel_times(fwd_bwd(routed))
                entry = dict(fwd_ms=bench(routed), fwd_bwd_ms=bench(fwd_bwd(routed)),
                             dkdv_kernel_us=kernel_us(kernels, "dkdv"), fwd_kernel_us=kernel_us(kernels, "fwd_kernel"),
                             max_diff=dict(zip(("out", "dq", "dk", "dv"), diffs)))
                entry["fwd_x_flex"] = row["flex_fwd_ms"] / entry["fwd_ms"]
                entry["fwd_bwd_x_flex"] = row["flex_fwd_bwd_ms"] / entry["fwd_bwd_ms"]
            except Exception as e:  # noqa: BLE001 - a config this Triton cannot compile is a result too
                entry = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            row["variants"][name] = entry
            print(n, hkv, blocks, name, entry, flush=True)
        rows.append(row)
    return rows


def part_layout(dev):
    """An LM layer's attention at 8k: batch 4, 8 query / 2 KV heads, head dim 64, blocks of 64, top 8."""
    rows = []
    g = torch.Generator(device="cpu").manual_seed(2)
    b, n, hq, hkv, d = 4, 8192, 8, 2, 64
    route = random_block_route(n, block_size=64, blocks=8, batch=b, heads=hkv, causal=True, generator=g, device=dev)
    base = [torch.randn(b, n, h, d, generator=g).to(dev, torch.bfloat16) for h in (hq, hkv, hkv, hq)]
    for layout in ("head_major", "token_major"):
        if layout == "token_major":  # views of [B, N, H, D] memory, as a projection's output transposed
            q, k, v, do = (t.transpose(1, 2) for t in base)
        else:
            q, k, v, do = (t.transpose(1, 2).contiguous() for t in base)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

        def step():
            out = routed_attention(q, k, v, route, backend="triton")
            torch.autograd.grad(out, (q, k, v), do)

        with torch.no_grad():
            out = routed_attention(q, k, v, route, backend="triton")
        kernels = graph_kernel_times(step)
        row = dict(layout=layout, out_token_major=token_major(out), fwd_bwd_graph_ms=bench(step),
                   kernels=kernels[:8] if isinstance(kernels, list) else kernels)
        print(layout, json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _nsa_step(n: int):
    import lm_compare
    from profile_layers import _layer_step

    args = lm_compare.parse_args(["--variants"])
    return _layer_step(args, "nsa", n, torch.device("cuda"), torch.bfloat16)


def _nsa_entry(n: int) -> dict:
    step = _nsa_step(n)
    step()  # compiles (and, when tuning is on, tunes) outside the timing
    kernels = graph_kernel_times(step)
    top = kernels[:8] if isinstance(kernels, list) else kernels
    return dict(step_graph_ms=bench(step), kernels=top)


def _force_one(kernel: str, cfg: tuple) -> None:
    """One kernel's candidate list made ``[cfg]`` (the forward's plain and TMA lists alike), the others kept."""
    for name in (("fwd", "fwd_tma") if kernel == "fwd" else (kernel,)):
        triton_ops.QUICK[name] = [cfg]


def part_nsa(n: int = 8192, trials: int = 3, sweep: bool = True) -> dict:
    """Fresh autotuning ``trials`` times, then one kernel's candidates forced at a time (module docstring);
    without ``sweep``, the tuned trials and the untuned default only."""
    out: dict = {"seq_len": n, "tuned": [], "forced": []}
    saved = dict(triton_ops.QUICK)
    cache_env = os.environ.get("ROUTED_AUTOTUNE_CACHE")
    os.environ["ROUTED_AUTOTUNE_CACHE"] = "0"
    os.environ["ROUTED_AUTOTUNE"], os.environ["ROUTED_TMA"] = "quick", "1"
    for trial in range(trials):
        triton_ops._TUNED.clear()
        entry = dict(trial=trial, **_nsa_entry(n), picks=triton_ops.tuned_configs())
        out["tuned"].append(entry)
        print("nsa tuned", trial, f"{entry['step_graph_ms']:.3f} ms", flush=True)
    os.environ["ROUTED_AUTOTUNE"] = "0"
    axes = ([("fwd", "0", c) for c in triton_ops.FWD_CANDIDATES]
            + [("fwd", "only", c) for c in triton_ops.FWD_TMA_CANDIDATES]
            + [("dq", "0", c) for c in triton_ops.DQ_CANDIDATES]
            + [("dkdv", "0", c) for c in triton_ops.DKDV_CANDIDATES]) if sweep else []
    for kernel, tma, cfg in axes:
        triton_ops.QUICK.update(saved)
        _force_one(kernel, cfg)
        os.environ["ROUTED_TMA"] = tma
        try:
            entry = dict(kernel=kernel, tma=tma, config=list(cfg), **_nsa_entry(n))
        except Exception as e:  # noqa: BLE001 - a config this Triton cannot compile (or TMA cannot take) is a result
            entry = dict(kernel=kernel, tma=tma, config=list(cfg),
                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        out["forced"].append(entry)
        print("nsa forced", kernel, tma, cfg, entry.get("step_graph_ms", entry.get("error")), flush=True)
    # the untuned choice as the library makes it, then every kernel's own winner forced together
    triton_ops.QUICK.update(saved)
    os.environ["ROUTED_TMA"] = "1"
    out["untuned_default"] = _nsa_entry(n)
    print("nsa untuned default", f"{out['untuned_default']['step_graph_ms']:.3f} ms", flush=True)
    winners = {}
    for e in out["forced"]:
        best = winners.get(e["kernel"])
        if "step_graph_ms" in e and (best is None or e["step_graph_ms"] < best["step_graph_ms"]):
            winners[e["kernel"]] = e
    for kernel, e in winners.items():
        _force_one(kernel, tuple(e["config"]))
    os.environ["ROUTED_TMA"] = winners.get("fwd", {}).get("tma", "0")
    if winners:
        out["winners_together"] = dict(configs={k: [e["tma"], e["config"]] for k, e in winners.items()},
                                       **_nsa_entry(n))
    triton_ops.QUICK.update(saved)
    if cache_env is None:
        os.environ.pop("ROUTED_AUTOTUNE_CACHE")
    else:
        os.environ["ROUTED_AUTOTUNE_CACHE"] = cache_env
    os.environ["ROUTED_AUTOTUNE"], os.environ["ROUTED_TMA"] = "0", "only"
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="forced_configs.json")
    p.add_argument("--part", nargs="+", default=["layout", "dkdv", "fwd"], choices=["layout", "dkdv", "fwd", "nsa"])
    p.add_argument("--nsa-no-sweep", action="store_true", help="--part nsa: tuned trials and untuned default only")
    p.add_argument("--shapes", nargs="+", default=["8192:16:32", "32768:16:8", "32768:4:32"],
                   help="N:kv_heads:blocks")
    a = p.parse_args()
    dev = torch.device("cuda")
    result = dict(machine=machine_header(), command=command_line(), env={k: os.environ[k] for k in
                                                                            ("ROUTED_AUTOTUNE", "ROUTED_TMA")})
    shapes = [tuple(int(x) for x in s.split(":")) for s in a.shapes]
    for part in a.part:
        if part == "nsa":
            result[part] = part_nsa(sweep=not a.nsa_no_sweep)
        else:
            result[part] = part_layout(dev) if part == "layout" else part_variants(dev, shapes, part)
        Path(a.out).write_text(json.dumps(result, indent=1))
    for r in result.get("layout", []):
        kernels = r["kernels"] if isinstance(r["kernels"], list) else []
        print(f"{r['layout']:<12} f+b graph {r['fwd_bwd_graph_ms']:.3f} ms  " +
              "  ".join(f"{k['name'][:28]} {k['us_per_replay']:.0f}us" for k in kernels[:4]))
    if "nsa" in result:
        r = result["nsa"]
        print(f"[nsa] step at {r['seq_len']}: tuned afresh " +
              ", ".join(f"{t['step_graph_ms']:.3f}" for t in r["tuned"]) + " ms")
        for e in r["forced"]:
            ms = f"{e['step_graph_ms']:.3f} ms" if "step_graph_ms" in e else e["error"][:90]
            print(f"  {e['kernel']:<5} tma {e['tma']:<4} {str(tuple(e['config'])):<18} {ms}")
        if "untuned_default" in r:
            print(f"  untuned default {r['untuned_default']['step_graph_ms']:.3f} ms")
        if "winners_together" in r:
            print(f"  each kernel's winner together {r['winners_together']['step_graph_ms']:.3f} ms "
                  f"{r['winners_together']['configs']}")
    for part in ("dkdv", "fwd"):
        for r in result.get(part, []):
            print(f"[{part}] N {r['n']} hkv {r['hkv']} blocks {r['blocks']}: flex fwd {r['flex_fwd_ms']:.3f} f+b "
                  f"{r['flex_fwd_bwd_ms']:.3f} ms")
            for name, e in r["variants"].items():
                if "error" in e:
                    print(f"  {name:<26} {e['error'][:100]}")
                    continue
                dk = e["dkdv_kernel_us"]
                print(f"  {name:<26} fwd {e['fwd_ms']:.3f} ({e['fwd_x_flex']:.2f}x flex)  f+b {e['fwd_bwd_ms']:.3f} "
                      f"({e['fwd_bwd_x_flex']:.2f}x)  dkdv {dk if dk is None else round(dk)} us  "
                      f"diff dk {e['max_diff']['dk']:.1e}")


if __name__ == "__main__":
    main()
