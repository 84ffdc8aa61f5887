"""What the compiler makes of the block-sparse kernels, without a GPU: registers, spills, shared
memory and the matrix / reduction instructions of every launch config the autotuner may pick.

    python benchmarks/kernel_report.py [--arch 90] [--out kernel_report.json]

Triton compiles for a named target (``GPUTarget("cuda", 90, 32)``: Hopper) on any machine, and its
wheel carries ``ptxas`` and ``cuobjdump``; so this runs on a CPU and costs no device time. It
answers what timings cannot on their own: a config whose kernel spills registers to the stack
(``STACK`` > 0, ``LDL``/``STL`` in the SASS) pays local-memory traffic in its inner loop, and a matrix
kernel that shows no ``HGMMA`` is off Hopper's tensor-core path. The installed Triton may differ
from the GPU machine's (the JSON header records the version), so read the numbers as leads.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed.env import command_line, machine_header  # noqa: E402
from routed.ops.block_sparse import triton_kernels as K  # noqa: E402
from routed.ops.block_sparse import triton_ops as ops  # noqa: E402
from routed.ops.block_topk import triton_kernels as router_kernels  # noqa: E402

FLOAT32_POINTERS = {"Lse", "Delta", "DQAcc", "DKAcc", "DVAcc", "PartOut", "PartLse", "LSE", "Out"}
INT32_POINTERS = {"Ids", "Counts", "Arrivals", "CleanCounts", "TIds", "TCounts", "TMaskedCounts", "TOffsets",
                  "ShareOffsets", "QPos", "KPos", "QSeg", "KSeg"}
DESCRIPTORS = {"KDesc": "BLOCK_N", "VDesc": "BLOCK_N", "QDesc": "BLOCK_M", "DODesc": "BLOCK_M"}


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def signature(fn, const: dict, head_dim: int) -> tuple[dict, dict]:
    """Triton signature and constexprs of ``fn`` for bf16 tensors, int32 routes, float32 stats."""
    sig, cexpr = {}, {}
    for name in fn.arg_names:
        if name in const:
            sig[name], cexpr[name] = "constexpr", const[name]
        elif name in DESCRIPTORS:
            if const.get("USE_TMA"):
                sig[name] = f"tensordesc<bf16[1,1,{const[DESCRIPTORS[name]]},{head_dim}]>"
            else:
                sig[name], cexpr[name] = "constexpr", None
        elif name[0].isupper():
            sig[name] = "*fp32" if name in FLOAT32_POINTERS else "*i32" if name in INT32_POINTERS else "*bf16"
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
    return sig, cexpr


def report(fn, const: dict, num_warps: int, num_stages: int, arch: int, head_dim: int) -> dict:
    sig, cexpr = signature(fn, const, head_dim)
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cexpr), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{fn.__name__}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dump = lambda flag: subprocess.run([_cuobjdump(), flag, str(cubin)], capture_output=True,  # noqa: E731
                                           text=True, check=True).stdout
        usage, sass = dump("--dump-resource-usage"), dump("--dump-sass")

    def field(name):
        m = re.search(rf"{name}:(\d+)", usage)
        return int(m.group(1)) if m else None

    def count(opcode):  # SASS instructions of an opcode, with or without modifiers (HGMMA.64x128x16...)
        return len(re.findall(rf"\b{opcode}[.\s]", sass))

    return dict(registers=field("REG"), stack_bytes=field("STACK"), shared_bytes=kernel.metadata.shared,
                spill_instructions=count("STL") + count("LDL"), hgmma=count("HGMMA"), hmma=count("HMMA"),
                reductions=count("REDG") + count("RED"), atomics=count("ATOMG") + count("ATOM"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="query and key block size")
    p.add_argument("--out", default="")
    p.add_argument("--only", nargs="+", default=None, choices=["fwd", "dq", "dkdv", "decode", "nsamass"],
                   help="report these kernels only")
    a = p.parse_args()
    d, blk = a.head_dim, a.block
    common = dict(Q_BLOCK=blk, KV_BLOCK=blk, HEAD_DIM=d, BLOCK_D=d, HEAD_DIM_V=d, BLOCK_DV=d, CAUSAL=True,
                  HAS_POS=False, HAS_SEG=False, DOT_PRECISION="tf32")
    jobs = []  # (kernel name, variant, fn, constexprs, warps, stages)
    for cands, tma in ((ops.FWD_CANDIDATES, False), (ops.FWD_TMA_CANDIDATES, True)):
        for m, n, w, st in cands:
            for group_major in (False, True):
                jobs.append(("fwd", f"{m}x{n} w{w} s{st}{' tma' if tma else ''}{' group-major' if group_major else ''}",
                             K._block_sparse_fwd_kernel,
                             dict(common, BLOCK_M=m, BLOCK_N=n, USE_TMA=tma, Q_TILE_ALIGNED=True, GATHER_KV=False,
                                  GROUP_MAJOR=group_major, Q_PACK=1), w, st))
    for m, n, w, st in ops.DQ_CANDIDATES:
        jobs.append(("dq", f"{m}x{n} w{w} s{st}", K._block_sparse_bwd_dq_kernel,
                     dict(common, BLOCK_M=m, BLOCK_N=n, USE_TMA=False, Q_TILE_ALIGNED=True, GATHER_KV=False,
                          GROUP_MAJOR=False, Q_PACK=1), w, st))
    for m, n, w, st in ops.DKDV_CANDIDATES:
        for atomic, shares in ((False, 0), (True, 0), (False, 2)):  # shares 2: listed shares, atomic sums
            jobs.append(("dkdv", f"{m}x{n} w{w} s{st}{' atomic-dq' if atomic else ''}{' listed-shares' if shares else ''}",
                         K._block_sparse_bwd_dkdv_kernel,
                         dict(common, BLOCK_M=m, BLOCK_N=n, USE_TMA=False, KV_TILE_ALIGNED=True, GATHER_Q=False,
                              ATOMIC_DQ=atomic, T_COMPACT=False, SHARES=shares, KV_PACK=1), w, st))
    for pps, n, w, st in ops.DECODE_CANDIDATES:
        for fused, tma in ((False, False), (True, False), (False, True)):  # fused: 32 splits' partials per row
            jobs.append(("decode", f"{pps}/SM n{n} w{w} s{st}{' fused-merge' if fused else ''}{' tma' if tma else ''}",
                         K._block_sparse_decode_split_kernel,
                         dict(KV_BLOCK=blk, BLOCK_M=16, BLOCK_N=min(n, blk), HEAD_DIM=d, BLOCK_D=d, HEAD_DIM_V=d,
                              BLOCK_DV=d, CAUSAL=True, HAS_POS=False, HAS_SEG=False, DOT_PRECISION="tf32",
                              FUSED_MERGE=fused, BLOCK_S=32 if fused else 2, USE_TMA=tma, PDL=False), w, st))
    # NSA's selection mass (the router's largest kernel): a 4-head KV group, query blocks of 64, head dim 64
    for cfg in router_kernels.nsa_mass_configs(4, 64):
        jobs.append(("nsamass", f"rows {4 * cfg['TILE_Q']} n{cfg['BLOCK_N']} w{cfg['num_warps']}",
                     router_kernels._nsa_compressed_mass_kernel,
                     dict(HEAD_DIM=64, BLOCK_D=64, GROUP_P=4, TILE_Q=cfg["TILE_Q"], BLOCK_N=cfg["BLOCK_N"],
                          DOT_PRECISION="tf32"), cfg["num_warps"], 3))
    if a.only:
        jobs = [j for j in jobs if j[0] in a.only]
    rows = []
    print(f"{'kernel':<7} {'config':<32} {'regs':>4} {'stack B':>7} {'spill ins':>9} {'smem KiB':>8} {'HGMMA':>5} "
          f"{'HMMA':>4} {'RED':>4}", flush=True)
    for kernel, variant, fn, const, w, st in jobs:
        try:
            r = report(fn, const, w, st, a.arch, d)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a finding too
            r = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}")
        rows.append(dict(kernel=kernel, config=variant, **r))
        if "error" in r:
            print(f"{kernel:<7} {variant:<32} does not compile: {r['error']}", flush=True)
        else:
            print(f"{kernel:<7} {variant:<32} {r['registers']:>4} {r['stack_bytes']:>7} {r['spill_instructions']:>9} "
                  f"{r['shared_bytes'] / 1024:>8.1f} {r['hgmma']:>5} {r['hmma']:>4} {r['reductions']:>4}", flush=True)
    if a.out:
        header = machine_header()
        header["compile_target"] = f"sm_{a.arch}"
        header["command"] = command_line()
        Path(a.out).write_text(json.dumps(dict(machine=header, head_dim=d, block=blk, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
