"""Routed-vs-dense attention timing (``routed bench``).

Times ``routed_attention`` on a random block route against dense SDPA at the same shape, on the
best available device, and reports median time, effective TFLOP/s on the computed blocks and the
speedup. Benchmarks that compare kernels in depth live in ``benchmarks/``; this is the quick look.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .attention import routed_attention
from .routers.static import random_block_route


@dataclass
class BenchConfig:
    seq_lens: tuple[int, ...] = (1024, 2048, 4096)
    density: float = 0.125
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None
    head_dim: int = 64
    block_size: int = 64
    causal: bool = True
    dtype: str = "auto"  # bfloat16 on a GPU, float32 on a CPU
    backend: Optional[str] = None
    backward: bool = False
    device: Optional[str] = None
    repeats: int = 5
    seed: int = 0


def time_median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds (device events on CUDA, so async work counts)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def capture_cuda_graph(step: Callable[[], object], warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """``step`` captured as one CUDA graph, after ``warmup`` calls on a side stream (kernel tuning,
    cached routes, initialisations happen there, not in the graph); raises what capture raises (a host
    sync, a CPU tensor made inside the step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def graph_replay_ms(step: Callable[[], object], timer: Callable[[Callable[[], object]], float]) -> Optional[float]:
    """``timer`` (e.g. ``triton.testing.do_bench``) applied to the replay of ``step`` captured as one CUDA
    graph: its GPU time without host overhead; None, with the reason printed, if it cannot be captured."""
    try:
        return timer(capture_cuda_graph(step, warmup=3).replay)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        print("graph capture failed:", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
        return None


def device_time_us(event) -> float:
    """A torch.profiler event's own GPU time in microseconds (``self_device_time_total``; older torch:
    ``self_cuda_time_total``)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def graphed_ms(step: Callable[[], object], reps: int = 20) -> dict:
    """Milliseconds per call of ``step`` replayed as one CUDA graph (what a graphed training step or
    ``torch.compile(mode="reduce-overhead")`` gets: no host time), as ``{"graph_ms_per_step": ms}``, or
    ``{"graph_error": why}`` when the step cannot be captured."""
    try:
        graph = capture_cuda_graph(step)
    except Exception as e:  # noqa: BLE001 - reported, not hidden: the row says why
        return {"graph_error": f"{type(e).__name__}: {e}"[:400]}
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return {"graph_ms_per_step": start.elapsed_time(end) / reps}


def routed_pairs(route, batch: int, heads: int) -> int:
    """(query, key) pairs inside the routed blocks, over all batch entries and query heads
    (a route shared by several heads or batch entries counts once for each)."""
    b_r, h_r = route.kv_block_counts.shape[:2]
    pairs = int(route.kv_block_counts.long().sum()) * route.q_block_size * route.kv_block_size
    return pairs * (batch // b_r) * (heads // h_r)


def blocks_for_density(n: int, block_size: int, density: float, causal: bool) -> int:
    """Key blocks per query block whose route density (over the blocks a dense pass visits) comes
    closest to ``density``. When causal, query block ``i`` can take at most ``i + 1`` blocks."""
    nkb = -(-n // block_size)
    if not causal:
        return max(1, round(density * nkb))
    visitable = nkb * (nkb + 1) / 2

    def achieved(k: int) -> float:  # sum_i min(k, i + 1) over query blocks i
        return (k * (k + 1) / 2 + k * (nkb - k)) / visitable

    return min(range(1, nkb + 1), key=lambda k: abs(achieved(k) - density))


def run_bench(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """One row per sequence length: dense and routed times, density, TFLOP/s and speedup."""
    from tqdm.auto import tqdm

    device = torch.device(cfg.device) if cfg.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
    hkv = cfg.kv_heads or cfg.heads
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    rows = []
    for n in tqdm(cfg.seq_lens, desc="routed bench", unit="len", disable=not progress):
        blocks = blocks_for_density(n, cfg.block_size, cfg.density, cfg.causal)
        route = random_block_route(n, block_size=cfg.block_size, blocks=blocks, heads=hkv, causal=cfg.causal,
                                   generator=g, device=device)
        q = torch.randn(cfg.batch, cfg.heads, n, cfg.head_dim, generator=g).to(device, dtype)
        k = torch.randn(cfg.batch, hkv, n, cfg.head_dim, generator=g).to(device, dtype)
        v = torch.randn(cfg.batch, hkv, n, cfg.head_dim, generator=g).to(device, dtype)
        if cfg.backward:
            for t in (q, k, v):
                t.requires_grad_()
            do = torch.randn_like(q)

        def run(f):
            def step():
                out = f()
                if cfg.backward:
                    torch.autograd.grad(out, (q, k, v), do)
            return step

        dense = run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=hkv != cfg.heads))
        routed = run(lambda: routed_attention(q, k, v, route, backend=cfg.backend))
        dense_ms = time_median_ms(dense, device, cfg.repeats)
        routed_ms = time_median_ms(routed, device, cfg.repeats)
        passes = 2.5 if cfg.backward else 1.0  # backward does 2.5x the forward's matmul work
        flops_per_pair = 4 * cfg.head_dim * passes
        dense_pairs = (n * (n + 1) // 2 if cfg.causal else n * n) * cfg.batch * cfg.heads
        computed_pairs = routed_pairs(route, cfg.batch, cfg.heads)
        rows.append({
            "seq_len": n, "density": round(route.density(), 4), "blocks_per_query_block": blocks,
            "dense_ms": round(dense_ms, 4), "routed_ms": round(routed_ms, 4),
            "speedup": round(dense_ms / routed_ms, 3),
            "dense_tflops": round(flops_per_pair * dense_pairs / dense_ms / 1e9, 3),
            "routed_tflops_on_computed_blocks": round(flops_per_pair * computed_pairs / routed_ms / 1e9, 3),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        })
    return rows


def config_dict(cfg: BenchConfig) -> dict:
    return asdict(cfg)
