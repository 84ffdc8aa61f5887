"""Content-clustered attention on a GPU: the Routing Transformer layer against the PyPI package
``routing-transformer`` (lucidrains, 1.6.1) at the same configuration, and MoSA against dense
attention at equal FLOPs.

    PYTHONPATH=src python benchmarks/clustered_attention.py --out clustered_attention.json [--smoke]

The peer and its needs travel as pure-Python wheels (the device machine reaches no index): in the
repo root, ``echo /.whl/ >> .git/info/exclude`` and ``pip download --no-deps -d .whl
routing-transformer==1.6.1 local-attention==1.4.4 mixture-of-experts==0.2.1 einops==0.8.2``; on the
device, ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` and
``PYTHONPATH=src:/tmp/site``. Its ``product_key_memory`` import (product-key memory layers, unused by
its attention) is stubbed when the package is absent.

Sections:

* ``check``: the layer with the Triton kernels against the reference backend (float32, same
  centroids): forward and input gradient.
* ``routing``: one attention layer, forward+backward in training mode (k-means updates included),
  ours (``routed.layers.routing_attention.RoutingAttention``) vs the peer's ``SelfAttention``:
  hidden 1024, 16 heads of 64 (8 local, 8 clustered), window 256, ``N / 256`` clusters, causal,
  batch 1. The two differ in how clusters are formed: the peer's balanced top-``w`` clusters
  (membership depends on later tokens) against our causal nearest-centroid clusters with a
  chunk-and-previous-chunk window (see the layer's docstring); the work per query is the same order
  (``w`` vs at most ``2w`` keys).
* ``core``: the clustered attention core alone (q, k, v -> out), forward+backward: the
  cluster-sorted band route on the block-sparse kernel (what the layer runs), and a ``TokenRoute``
  of balanced clusters of the same size through the Triton backend (gathered group-major copies on
  the block-sparse kernels) and through the gather-in-kernel token-group kernels.
* ``mosa``: a MoSA layer (expert-choice heads at sparsity 8, plus dense heads) sized to the FLOPs of
  a dense causal layer of 16 heads, against that dense layer (SDPA), forward+backward.

Medians of CUDA-event timings (``triton.testing.do_bench``); peak memory is the forward+backward
peak above what was allocated before (weights, inputs and the output's gradient, which both layers
are given: no loss of their own adds float32 copies of the output). ``--smoke`` runs tiny shapes on any
device (the CPU included, where the reference backend runs and times are not meaningful).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bra import peak_mem as bra_peak_mem  # noqa: E402  (benchmarks/bra.py, beside this script)
from routed import TokenRoute, routed_attention  # noqa: E402
from routed.bench import graphed_ms  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.layers.lm_attention import DenseAttention  # noqa: E402
from routed.layers.mosa import MoSAAttention  # noqa: E402
from routed.layers.routing_attention import RoutingAttention  # noqa: E402
from routed.ops.permute_rows import permute_rows  # noqa: E402
from routed.ops.token_group.triton_ops import token_group_attention_triton  # noqa: E402
from routed.routers.kmeans import KMeansRouter, cluster_window_route  # noqa: E402
from routed.testing import rel_err  # noqa: E402


def import_peer():
    """The ``routing_transformer`` package's ``SelfAttention``, or the reason it cannot load."""
    try:
        import product_key_memory  # noqa: F401
    except ImportError:  # only its PKM layers need it; stub it so the attention imports
        sys.modules["product_key_memory"] = types.SimpleNamespace(PKM=None)
    try:
        from routing_transformer.routing_transformer import SelfAttention
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        return None, f"{type(e).__name__}: {e}"
    return SelfAttention, None


def bench(fn, dev, rep_ms: int) -> float:
    """Median milliseconds of ``fn``."""
    if dev.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem(fn, dev) -> float | None:
    """Peak MiB allocated by ``fn`` above what was live before it (CUDA only)."""
    return bra_peak_mem(fn) if dev.type == "cuda" else None


def guarded(fn):
    """``fn()``, or ``"OOM"`` when it runs out of GPU memory, or the error's text."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # noqa: BLE001 - a peer failing at a size is a result, not a crash
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def rope(n: int, d: int, dev, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    f = torch.arange(n, device=dev, dtype=torch.float32)[:, None] * inv[None]
    e = torch.cat([f, f], -1)
    return e.cos()[None].to(dtype), e.sin()[None].to(dtype)


def lm_config(**kw):
    return types.SimpleNamespace(**kw)


def measure(step, dev, rep_ms: int) -> dict:
    """Time and peak memory of ``step`` (one forward+backward), OOM and errors recorded."""
    first = guarded(step)
    if isinstance(first, str):
        return {"ms": first, "peak_mib": first}
    ms = guarded(lambda: bench(step, dev, rep_ms))
    mib = guarded(lambda: peak_mem(step, dev))
    return {"ms": ms, "peak_mib": mib}


# -------------------------------------------------------------------------------------------------
def check(dev) -> list[dict]:
    """RoutingAttention on the Triton kernels vs the reference backend (float32, shared weights)."""
    out = []
    for n, w in ((300, 64), (257, 32), (1000, 16)):
        torch.manual_seed(0)
        kw = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64, routing_heads=2,
                  kmeans_clusters=max(1, n // w), routing_window=w, routing_local_window=w)
        a = RoutingAttention(lm_config(attention_backend="triton", **kw), 0).to(dev).eval()
        b = RoutingAttention(lm_config(attention_backend="reference", **kw), 0).to(dev).eval()
        x = torch.randn(2, n, 256, device=dev)
        pe = rope(n, 64, dev, torch.float32)
        a(x, pe)  # initialise the centroids, then share them
        b.load_state_dict(a.state_dict())
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        oa, ob = a(xa, pe)[0], b(xb, pe)[0]
        g = torch.randn_like(oa)
        oa.backward(g)
        ob.backward(g)
        row = {"n": n, "window": w, "out_rel_err": rel_err(oa, ob), "dx_rel_err": rel_err(xa.grad, xb.grad)}
        row["ok"] = row["out_rel_err"] < 1e-4 and row["dx_rel_err"] < 1e-4
        out.append(row)
        print(row, flush=True)
    return out


def routing_case(n: int, dev, dtype, rep_ms: int, peer_cls, hidden=1024, heads=16, local_heads=8,
                 window=256, profile=False) -> dict:
    d = hidden // heads
    window = min(window, n)
    row = {"n": n, "hidden": hidden, "heads": heads, "local_heads": local_heads, "window": window,
           "clusters": n // window}
    x = torch.randn(1, n, hidden, device=dev, dtype=dtype, requires_grad=True)
    pe = rope(n, d, dev, dtype)

    cfg = lm_config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads, head_dim=d,
                    routing_heads=heads - local_heads, kmeans_clusters=n // window, routing_window=window,
                    routing_local_window=window)
    ours = RoutingAttention(cfg, 0).to(dev, dtype).train()

    # the output's gradient is given (as a model above the layer would pass it): a loss such as
    # out.float().square().mean() would add float32 copies of the output to both layers' peaks
    g_out = torch.randn(1, n, hidden, device=dev, dtype=dtype)

    def ours_step():
        out, aux = ours(x, pe)
        torch.autograd.backward([out, aux], [g_out, None])

    row["ours"] = measure(ours_step, dev, rep_ms)
    if dev.type == "cuda":  # the step replayed as a CUDA graph: what the layer costs without host time
        graphed = guarded(lambda: graphed_ms(ours_step))
        row["ours"].update(graphed if isinstance(graphed, dict) else {"graph_error": graphed})
        if profile:  # the graphed step's kernels by their own GPU time (CUPTI): where the layer's time goes
            from block_sparse import graph_kernel_times  # benchmarks/block_sparse.py, beside this script

            kernels = graph_kernel_times(ours_step)
            row["ours"]["kernels"] = kernels[:25] if isinstance(kernels, list) else kernels
    del ours
    if peer_cls is not None:
        def build():
            return peer_cls(dim=hidden, depth=1, max_seq_len=n, heads=heads, local_attn_heads=local_heads,
                            window_size=window, local_attn_window_size=window, causal=True).to(dev, dtype).train()

        peer = guarded(build)
        if isinstance(peer, str):
            row["peer"] = {"ms": peer, "peak_mib": peer}
        else:
            def peer_step():
                out, aux = peer(x)
                torch.autograd.backward([out, aux], [g_out, None])

            row["peer"] = measure(peer_step, dev, rep_ms)
            if dev.type == "cuda":  # last: a failed capture may leave the stream unusable for this row
                graphed = guarded(lambda: graphed_ms(peer_step))
                row["peer"].update(graphed if isinstance(graphed, dict) else {"graph_error": graphed})
            del peer
    for key in ("ms", "peak_mib"):
        a, b = row["ours"].get(key), row.get("peer", {}).get(key)
        ok = isinstance(a, float) and isinstance(b, float) and a > 0
        row[f"peer_over_ours_{key}"] = b / a if ok else None
    g, p = row["ours"].get("graph_ms_per_step"), row.get("peer", {}).get("ms")
    row["peer_eager_over_ours_graphed"] = p / g if isinstance(g, float) and isinstance(p, float) and g > 0 else None
    return row


def core_case(n: int, dev, dtype, rep_ms: int, heads=8, d=64, window=256) -> dict:
    """The clustered core: band route over cluster-sorted copies vs balanced TokenRoute (Triton)."""
    window = min(window, n)
    C = max(1, n // window)
    backend = "triton" if dev.type == "cuda" else "reference"
    q, k, v = (torch.randn(1, heads, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    km = KMeansRouter(heads, d, C).to(dev)
    with torch.no_grad():
        cl = km.assign(k).reshape(heads, n)
        route, slot_tokens, token_slots = cluster_window_route(cl, C, window)
        groups = km.balanced_groups(k, window, causal=True)
    L = slot_tokens.shape[1]

    def band_step():  # as the layer runs it: rows permuted into cluster order and back (no atomics)
        def perm(t):
            return permute_rows(t.reshape(heads, 1, n, d), slot_tokens, token_slots, zero_padding=False)

        o = routed_attention(perm(q), perm(k), perm(v), route, backend=backend)
        o = permute_rows(o, token_slots, slot_tokens)  # pad slots get no gradient (pad queries see keys)
        o.float().square().mean().backward()

    token_route = TokenRoute(groups.token_ids, n, causal=True, validate=False)

    def token_route_step():  # the triton backend's TokenRoute path: group-major gathered copies
        o = routed_attention(q, k, v, token_route, backend=backend)
        o.float().square().mean().backward()

    def in_kernel_step():  # rows gathered inside the kernels
        if dev.type == "cuda":
            o, _ = token_group_attention_triton(q, k, v, token_route, d ** -0.5)
        else:
            o = routed_attention(q, k, v, token_route, backend="reference")
        o.float().square().mean().backward()

    return {"n": n, "window": window, "clusters": C, "slots": L,
            "band_route": measure(band_step, dev, rep_ms), "token_route": measure(token_route_step, dev, rep_ms),
            "token_route_in_kernel": measure(in_kernel_step, dev, rep_ms)}


def attention_flops(n: int, hidden: int, d: int, dense_heads: int, sparse_heads: int, k: int) -> float:
    """Forward FLOPs of a layer per head: q/k/v and output projections and causal attention, dense
    heads over ``n`` tokens, sparse heads over their ``k`` (MoSA projects only the picked tokens)."""
    def head(t):
        return 2 * 4 * t * hidden * d + 2 * 2 * d * t * t / 2  # qkv + o + causal QK^T and PV
    return dense_heads * head(n) + sparse_heads * (head(k) + 2 * n * hidden)  # + the router


def mosa_case(n: int, dev, dtype, rep_ms: int, hidden=1024, heads=16, sparsity=8, dense_heads=4) -> dict:
    """MoSA (``dense_heads`` dense + as many sparse heads as the dense layer's FLOPs pay for)."""
    d = hidden // heads
    k = math.ceil(n / sparsity)
    budget = attention_flops(n, hidden, d, heads, 0, 0)
    sparse = max(1, int((budget - attention_flops(n, hidden, d, dense_heads, 0, 0)) //
                        attention_flops(n, hidden, d, 0, 1, k)))
    row = {"n": n, "hidden": hidden, "dense_layer_heads": heads, "mosa_dense_heads": dense_heads,
           "mosa_sparse_heads": sparse, "sparsity": sparsity, "flops_dense": budget,
           "flops_mosa": attention_flops(n, hidden, d, dense_heads, sparse, k)}
    x = torch.randn(1, n, hidden, device=dev, dtype=dtype, requires_grad=True)
    pe = rope(n, d, dev, dtype)
    layers = {"mosa": MoSAAttention(lm_config(hidden_size=hidden, num_attention_heads=dense_heads + sparse,
                                              head_dim=d, mosa_heads=sparse, mosa_sparsity=sparsity), 0),
              "dense": DenseAttention(lm_config(hidden_size=hidden, num_attention_heads=heads, head_dim=d), 0)}
    for name, layer in layers.items():
        layer = layer.to(dev, dtype).train()

        def step(layer=layer):
            out, aux = layer(x, pe)
            loss = out.float().square().mean()
            (loss if aux is None else loss + aux).backward()

        row[name] = measure(step, dev, rep_ms)
    a, b = row["mosa"]["ms"], row["dense"]["ms"]
    row["dense_over_mosa_ms"] = b / a if isinstance(a, float) and isinstance(b, float) else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="clustered_attention.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, short timings (runs on the CPU)")
    ap.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sections", nargs="+", default=["routing", "core", "mosa"], choices=["routing", "core", "mosa"])
    ap.add_argument("--profile", action="store_true", help="also the kernels of our graphed layer step (GPU)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    peer_cls, peer_why = import_peer()
    result = {"machine": machine_header(), "command": command_line(), "dtype": str(dtype).replace("torch.", ""),
              "peer": "routing-transformer 1.6.1" if peer_cls else f"not importable: {peer_why}",
              "autotune": os.environ.get("ROUTED_AUTOTUNE", "1") != "0"}
    print(result["peer"], flush=True)

    def save():  # after every row: a run cut short keeps what it measured
        Path(args.out).write_text(json.dumps(result, indent=1))

    if args.smoke:
        lengths, rep, sizes = [256, 300], 20, dict(hidden=128, heads=4, local_heads=2, window=32)
    else:
        lengths, rep, sizes = args.lengths, args.rep_ms, {}
    result["check"] = check(dev) if dev.type == "cuda" else []
    save()
    for section, fn in (("routing", lambda n: routing_case(n, dev, dtype, rep, peer_cls, **sizes,
                                                           profile=args.profile and dev.type == "cuda")),
                        ("core", lambda n: core_case(n, dev, dtype, rep, window=sizes.get("window", 256))),
                        ("mosa", lambda n: mosa_case(n, dev, dtype, rep, **({"hidden": 128, "heads": 4,
                                                                               "dense_heads": 1}
                                                                              if args.smoke else {})))):
        if section not in args.sections:
            continue
        rows = result[section] = []
        for n in lengths:
            row = fn(n)
            rows.append(row)
            print(section, row, flush=True)
            save()

    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("\nrouting: n | fwd+bwd ms ours / peer | peak MiB ours / peer | peer/ours time, memory | "
          "graphed ms ours / peer | peer eager / ours graphed")
    for r in result.get("routing", []):
        p, o = r.get("peer", {}), r["ours"]
        print(f"{r['n']} | {fmt(o['ms'])} / {fmt(p.get('ms'))} | {fmt(o['peak_mib'])} / "
              f"{fmt(p.get('peak_mib'))} | {fmt(r['peer_over_ours_ms'])}x {fmt(r['peer_over_ours_peak_mib'])}x | "
              f"{fmt(o.get('graph_ms_per_step', o.get('graph_error')))} / "
              f"{fmt(p.get('graph_ms_per_step', p.get('graph_error', '-')))} | "
              f"{fmt(r['peer_eager_over_ours_graphed'])}x")
    print("core: n | fwd+bwd ms band route / TokenRoute copies / TokenRoute in-kernel | peak MiB, same order")
    names = ("band_route", "token_route", "token_route_in_kernel")
    for r in result.get("core", []):
        print(f"{r['n']} | {' / '.join(fmt(r[x]['ms']) for x in names)} | "
              f"{' / '.join(fmt(r[x]['peak_mib']) for x in names)}")
    print("mosa (equal FLOPs): n | sparse heads | fwd+bwd ms mosa / dense | peak MiB mosa / dense")
    for r in result.get("mosa", []):
        print(f"{r['n']} | {r['mosa_sparse_heads']} | {fmt(r['mosa']['ms'])} / {fmt(r['dense']['ms'])} | "
              f"{fmt(r['mosa']['peak_mib'])} / {fmt(r['dense']['peak_mib'])}")
    if result["check"]:
        print(f"all checks ok: {all(r['ok'] for r in result['check'])}")


if __name__ == "__main__":
    main()
