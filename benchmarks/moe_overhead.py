"""Where the routed MoE layer's eager time goes on a GPU: each stage timed eager (CUDA events), as
host enqueue time alone (no sync) and replayed from a CUDA graph, plus every host sync the layer
makes (``torch.cuda.set_sync_debug_mode``, with the Python line that made it).

    PYTHONPATH=src python benchmarks/moe_overhead.py --out moe_overhead.json

The H100 run of ``benchmarks/moe.py`` found the eager forward ~1.5 ms slower than the same forward
replayed from a CUDA graph at every size (8k to 64k tokens), so the eager cost is serial host time,
not GPU work: this script says which stage pays it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from routed.bench import graphed_ms, time_median_ms
from routed.env import command_line, machine_header
from routed.layers.moe import RoutedMoE
from routed.ops.expert_dispatch import expert_mlp
from routed.ops.expert_dispatch.grouped import gmm_grouped_mm, slot_rows
from routed.route import ExpertRoute


def eager_ms(fn, reps=30) -> float:
    """Median CUDA-event milliseconds of ``fn`` after 3 warm-up calls (each call starts on an idle GPU)."""
    return time_median_ms(fn, torch.device("cuda"), reps, warmup=3)


def host_ms(fn, reps=30) -> float:
    """Median wall time to enqueue ``fn`` (the GPU idle at the start, no sync at the end)."""
    times = []
    for i in range(reps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if i >= 3:
            times.append((t1 - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def syncs_of(fn) -> list[str]:
    """The synchronizing CUDA calls ``fn`` makes, each with the routed/benchmark line that made it."""
    found = []

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message) and "prototype feature" not in str(message):
            stack = [f"{f.filename.split('/src/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
                     if "routed" in f.filename or "benchmarks" in f.filename]
            found.append(f"{str(message)[:120]} <- {' <- '.join(reversed(stack[-4:]))}")

    old = warnings.showwarning
    warnings.showwarning = hook
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = hook
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
                torch.cuda.current_stream().query()  # a non-blocking query: not a sync
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = old
    return found


def python_profile(fn, calls=50, top=18) -> str:
    """Where the host time of ``fn`` goes, by Python function (cProfile, own time)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def stages(moe: RoutedMoE, x: torch.Tensor) -> dict:
    H, E, k = moe.hidden_size, moe.num_experts, moe.top_k
    # The same layer with the PyTorch route builder (the router before the fused route kernel).
    ref = RoutedMoE(H, moe.intermediate_size, E, k, backend="grouped_mm", router_backend="reference")
    ref = ref.to(device=x.device, dtype=x.dtype)
    ref.load_state_dict(moe.state_dict())
    flat = x.reshape(-1, H)
    w13, w2 = moe.gate_up_proj, moe.down_proj
    with torch.no_grad():
        out = moe.router(x)
    route = out.route
    probs = out.probs
    from routed.ops.expert_dispatch.triton_ops import (
        moe_combine,
        moe_gather,
        moe_swiglu,
    )

    tok, inv = route.sorted_token_ids(), slot_rows(route)
    xs = moe_gather(flat, tok, inv)
    gu = gmm_grouped_mm(xs, w13, route)
    h = moe_swiglu(gu)
    ys = gmm_grouped_mm(h, w2, route)

    def topk_only():
        logits = torch.nn.functional.linear(x, moe.router.weight).reshape(-1, E)
        p = logits.float().softmax(-1)
        ids = p.topk(k, dim=-1).indices
        w = p.gather(-1, ids)
        return ids, w / w.sum(-1, keepdim=True)

    ids, w = topk_only()
    return {
        "layer": lambda: moe(x),
        "layer_reference_router": lambda: ref(x),
        "router": lambda: moe.router(x),
        "router_reference": lambda: ref.router(x),
        "router_topk_only": topk_only,
        "route_build": lambda: ExpertRoute.from_expert_ids(ids, w, E, all_live=True, validate=False),
        "dispatch": lambda: expert_mlp(flat, route, w13, w2, backend="grouped_mm"),
        "dispatch_unfused": lambda: expert_mlp(flat, route, w13, w2, backend="grouped_mm", fused=False),
        "tok_inv": lambda: (route.sorted_token_ids(), slot_rows(route)),
        "gather": lambda: moe_gather(flat, tok, inv),
        "gmm_gate_up": lambda: gmm_grouped_mm(xs, w13, route),
        "swiglu": lambda: moe_swiglu(gu),
        "gmm_down": lambda: gmm_grouped_mm(h, w2, route),
        "combine": lambda: moe_combine(ys, inv, route.weights),
        "_probs": probs,
        "_ref": ref,
    }


def run(T, H, I, E, k) -> dict:
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe = RoutedMoE(H, I, E, k, backend="grouped_mm").to(torch.bfloat16)
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    row = {"tokens": T, "hidden": H, "intermediate": I, "experts": E, "top_k": k, "stages": {}}
    with torch.no_grad():
        st = stages(moe, x)
        st.pop("_probs")
        ref = st.pop("_ref")
        for name, fn in st.items():
            r = {"eager_ms": eager_ms(fn), "host_ms": host_ms(fn)}
            r.update(graphed_ms(fn))
            row["stages"][name] = r
        row["syncs_forward"] = syncs_of(lambda: moe(x))
        row["cprofile_router"] = python_profile(lambda: moe.router(x))
        row["cprofile_layer"] = python_profile(lambda: moe(x))
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)

    def fwd_bwd():
        for p in moe.parameters():
            p.grad = None
        xg.grad = None
        moe(xg).backward(dy)

    # No graph of the backward here: a capture that fails (the layer's `last` keeps autograd nodes of
    # the eager calls alive, on another stream) leaves the CUDA RNG unusable for the next rows.
    row["stages"]["layer_fwd_bwd"] = {"eager_ms": eager_ms(fwd_bwd, 15), "host_ms": host_ms(fwd_bwd, 15)}

    def fwd_bwd_ref():
        for p in ref.parameters():
            p.grad = None
        xg.grad = None
        ref(xg).backward(dy)

    row["stages"]["layer_fwd_bwd_reference_router"] = {"eager_ms": eager_ms(fwd_bwd_ref, 15),
                                                       "host_ms": host_ms(fwd_bwd_ref, 15)}
    row["syncs_fwd_bwd"] = syncs_of(fwd_bwd)
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            moe(x)
        torch.cuda.synchronize()
    row["profile_forward_cpu"] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                          max_name_column_width=50)
    row["profile_forward_cuda"] = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15,
                                                           max_name_column_width=50)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="moe_overhead.json")
    ap.add_argument("--cases", default="8192:8:2,65536:8:2,8192:64:8", help="tokens:experts:top_k")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1024)
    a = ap.parse_args()
    result = {"machine": machine_header(), "command": command_line(), "rows": []}
    for case in a.cases.split(","):
        T, E, k = (int(v) for v in case.split(":"))
        row = run(T, a.hidden, a.intermediate, E, k)
        result["rows"].append(row)
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(row["cprofile_router"][-4000:])
    for row in result["rows"]:
        print(f"\nT={row['tokens']} E={row['experts']} k={row['top_k']}   (ms)   eager    host   graph")
        for name, r in row["stages"].items():
            g = r.get("graph_ms_per_step")
            print(f"  {name:<18} {r['eager_ms']:8.3f} {r['host_ms']:7.3f} {'n/a' if g is None else f'{g:7.3f}'}")
        print("  syncs forward:", row["syncs_forward"] or "none")
        print("  syncs fwd+bwd:", row["syncs_fwd_bwd"] or "none")


if __name__ == "__main__":
    main()
