"""Which launch setting breaks the forward at blocks of 16 on the GPU (see check_small_blocks.py):
one failing case run under forced configs (warps, stages), with and without the clean phase
(explicit positions make every block masked), and without GQA.

    PYTHONPATH=src ROUTED_AUTOTUNE=0 ROUTED_TMA=0 python benchmarks/triage_small_blocks.py

It found the Triton 3.6 fault that ``_walked_rows`` (triton_kernels.py) now avoids; kept to re-check
a new Triton or GPU (after the fix every config is exact: H200, 2026-12-01).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed import BlockRoute, random_block_route, routed_attention  # noqa: E402
from routed.ops.block_sparse import triton_ops  # noqa: E402
from routed.testing import rel_err  # noqa: E402

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
n, w = 257, 16
g = torch.Generator().manual_seed(0)
default = list(triton_ops.FWD_CANDIDATES)
for dtype in (torch.float32, torch.bfloat16):
    for hq, hkv, heads in ((4, 2, 2), (2, 2, 2), (2, 1, 1)):
        route = random_block_route(n, block_size=w, blocks=3, heads=heads, causal=True, generator=g, device=dev)
        pos = torch.arange(n, device=dev, dtype=torch.int32)[None]
        masked_route = BlockRoute(route.kv_block_ids, route.kv_block_counts, q_block_size=w, kv_block_size=w,
                                  q_len=n, kv_len=n, causal=True, q_positions=pos, kv_positions=pos)
        q = torch.randn(1, hq, n, 64, generator=g).to(dev, dtype)
        k = torch.randn(1, hkv, n, 64, generator=g).to(dev, dtype)
        v = torch.randn(1, hkv, n, 64, generator=g).to(dev, dtype)
        ref = routed_attention(q.double(), k.double(), v.double(), route, backend="reference")
        for cfg in ((128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 1), (128, 64, 8, 1), (128, 16, 4, 3),
                    (128, 64, 2, 3), (128, 64, 1, 3)):
            triton_ops.FWD_CANDIDATES[:] = [cfg] + default  # the first config runs untuned
            triton_ops.QUICK["fwd"] = [cfg]
            triton_ops._fit_cached.cache_clear()
            errs = []
            for name, r in (("clean+masked", route), ("all masked", masked_route)):
                try:
                    out = routed_attention(q, k, v, r, backend="triton")
                    errs.append(f"{name} {rel_err(out, ref):.1e}")
                except Exception as e:  # noqa: BLE001
                    errs.append(f"{name} {type(e).__name__}")
            print(str(dtype)[6:], f"hq{hq} hkv{hkv} rh{heads}", "cfg(M,N,warps,stages)", cfg, " | ".join(errs),
                  flush=True)
triton_ops.FWD_CANDIDATES[:] = default
