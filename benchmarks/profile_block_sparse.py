"""Where does the time of one routed attention call go? GPU time per kernel (torch.profiler) and
host time per call of each layer of the stack, at one benchmark shape.

    PYTHONPATH=src python benchmarks/profile_block_sparse.py [--n 8192 --hkv 16 --blocks 8]
"""

import argparse
import time

import torch
import triton
import triton.language as tl
from torch.profiler import ProfilerActivity, profile

from routed import random_block_route, routed_attention
from routed.ops.block_sparse import triton_ops


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, n=50):
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / n * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--hkv", type=int, default=16)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--nq", type=int, default=None, help="queries (default n); 1 for decode")
    p.add_argument("--cprofile", action="store_true", help="also print the Python functions forward+backward "
                   "spends its host time in")
    p.add_argument("--launch-overhead", action="store_true", help="also time the host cost of bare Triton "
                   "launches (2 and 48 arguments, no work) and of our forward with and without tensor descriptors")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only under TRITON_INTERPRET=1, to test this
    d, hq = 128, 16
    nq = a.nq or a.n
    g = torch.Generator().manual_seed(0)
    route = random_block_route(nq, a.n, block_size=128, blocks=a.blocks, heads=a.hkv, generator=g, device=dev)
    q = torch.randn(1, hq, nq, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    k = torch.randn(1, a.hkv, a.n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    v = torch.randn(1, a.hkv, a.n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    do = torch.randn(1, hq, nq, d, generator=g).to(dev, torch.bfloat16)
    scale = d ** -0.5
    t_ids, t_counts = route.transposed()
    layers = {
        "routed_attention": lambda: routed_attention(q, k, v, route, backend="triton"),
        "custom op": lambda: triton_ops.block_sparse_attn_fwd(q, k, v, route.kv_block_ids, route.kv_block_counts,
                                                              t_ids, t_counts, None, None, None, None, 128, 128,
                                                              True, scale),
        "host launcher": lambda: triton_ops.block_sparse_fwd(q, k, v, route.kv_block_ids, route.kv_block_counts,
                                                             None, None, None, None, 128, 128, True, scale),
        "no_grad routed_attention": lambda: _nograd(lambda: routed_attention(q, k, v, route, backend="triton")),
    }
    for name, fn in layers.items():
        print(f"host time per call, {name:<26}: {host_us(fn):8.1f} us")

    def fwd_bwd():
        out = routed_attention(q, k, v, route, backend="triton")
        torch.autograd.grad(out, (q, k, v), do)

    print(f"host time per call, {'fwd+bwd':<26}: {host_us(fwd_bwd, 20):8.1f} us")
    if a.launch_overhead:
        launch_overhead(q, k, v, route, scale)
    if a.cprofile:
        import cProfile
        import pstats

        prof_host = cProfile.Profile()
        prof_host.enable()
        for _ in range(20):
            fwd_bwd()
        prof_host.disable()
        sync()
        print("--- forward+backward, 20 calls: host functions by own time")
        pstats.Stats(prof_host).sort_stats("tottime").print_stats(25)
    for name, fn in (("forward", layers["routed_attention"]), ("forward+backward", fwd_bwd)):
        if dev != "cuda":
            break
        fn()
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            sync()
        print(f"--- {name}: GPU time per call by kernel (10 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


# Module level: Triton resolves the names a kernel uses (tl) in its module's globals.
@triton.jit
def _empty2(X, n):
    pass


@triton.jit
def _empty48(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
             a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35, a36, a37, a38, a39, a40,
             a41, a42, a43, a44, a45, a46, B: tl.constexpr):
    pass


def launch_overhead(q, k, v, route, scale):
    """Host microseconds per launch of an empty Triton kernel with few and with many arguments (our
    kernels take ~40-60), and of the forward with and without tensor descriptors (TMA): where the
    eager call's host time goes, when it is not our Python."""
    import os

    x = q.detach()
    ints = [int(s) for s in (list(q.stride()) * 12)[:47]]
    print(f"host time per launch, empty kernel, 2 args      : {host_us(lambda: _empty2[(1,)](x, 7), 200):8.1f} us")
    print(f"host time per launch, empty kernel, 48 args     : "
          f"{host_us(lambda: _empty48[(1,)](x, *ints, B=16), 200):8.1f} us")
    with torch.no_grad():
        for tma in ("1", "0"):
            os.environ["ROUTED_TMA"] = tma
            t = host_us(lambda: routed_attention(q, k, v, route, backend="triton"), 50)
            print(f"host time per call, no_grad forward, ROUTED_TMA={tma}: {t:8.1f} us")
    os.environ["ROUTED_TMA"] = "1"


def _nograd(fn):
    with torch.no_grad():
        return fn()


if __name__ == "__main__":
    main()
