"""End-to-end routed prefill of a Llama-3.1-8B-shaped model (real configuration, random bf16
weights) against dense SDPA (cuDNN and flash backends), estimator included in every routed time.

    PYTHONPATH=src python benchmarks/prefill_llama.py --out prefill_llama.json [--lengths 32768 131072]
    PYTHONPATH=src python benchmarks/prefill_llama.py --smoke          # tiny model, CPU, checks the script

Order: (1) correctness at a small size on the device (estimator kernels against their
references, the Triton routed attention against the reference on the same route, and a small
model's logits with a keep-everything budget against SDPA); (2) for each length, the model's
prefill with ``logits_to_keep=1`` and no cache, dense and routed (one warm-up run each, which
also records the route density, then the median of ``--repeats`` timed runs); (3) time to first
token of ``generate(max_new_tokens=1)`` dense (cuDNN) and routed. Random weights make the
attention diffuse, so the routed runs use a fixed ``top_k`` budget; the quality of the budgets is
measured on a real model by ``routed eval prefill``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import routed.integrations.transformers as rt  # noqa: E402
from routed import routed_attention  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.ops.block_scores import pooled_block_probs, sampled_block_mass  # noqa: E402
from routed.routers.estimators import BlockBudget, PooledBlockEstimator  # noqa: E402
from routed.testing import poisoned_outputs, rel_err  # noqa: E402

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=False,
                   rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192))
SMOKE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
             rope_parameters=dict(rope_type="default", rope_theta=500000.0))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def sdpa_backend(name: str):
    """Context pinning SDPA to one backend ('cudnn', 'flash'); a no-op for 'default'."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def build_model(cfg_kwargs: dict, device, dtype):
    import transformers

    cfg = transformers.LlamaConfig(**cfg_kwargs)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    return model.eval()


def parse_policy(spec: str, block_size: int, backend, est_backend) -> rt.RoutedPrefillPolicy:
    """'pooled:top_k=32' or 'strided:coverage=0.9,samples=8' -> a policy."""
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=")
        kw[k] = float(v) if k == "coverage" else int(v)
    return rt.RoutedPrefillPolicy(estimator=name, block_size=block_size, min_seq_len=1024, backend=backend,
                                  estimator_backend=est_backend, **kw)


def check(device, dtype, args) -> dict:
    """Correctness at a small size on the device this runs on."""
    res = {}
    g = torch.Generator(device="cpu").manual_seed(1)
    b, hq, hkv, n, d, bs = 1, 32, 8, args.check_len, 128, args.block_size
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    backend = "triton" if device.type == "cuda" else "reference"
    with poisoned_outputs():
        got = pooled_block_probs(q, k, bs, backend=backend)
        ref = pooled_block_probs(q.float(), k.float(), bs, backend="reference")
        res["pooled_probs_rel_err"] = rel_err(got, ref)
        r = 8
        nqb = math.ceil(n / bs)
        rows = (torch.arange(nqb)[:, None] * bs + (torch.arange(r) + 1) * (bs // r) - 1).clamp(max=n - 1)
        rows = rows.flatten().to(device)
        got = sampled_block_mass(q, k, rows, r, bs, backend=backend)
        ref = sampled_block_mass(q.float(), k.float(), rows, r, bs, backend="reference")
        res["sampled_mass_rel_err"] = rel_err(got, ref)
        route = PooledBlockEstimator(bs, BlockBudget(top_k=8), backend=backend)(q, k)
        out = routed_attention(q, k, v, route, backend=backend)
        ref = routed_attention(q.float(), k.float(), v.float(), route, backend="reference")
        base = routed_attention(q, k, v, route, backend="reference")
        res["routed_attention_rel_err"] = rel_err(out, ref)
        res["routed_attention_rel_err_plain_torch_same_dtype"] = rel_err(base, ref)
    small = dict(LLAMA_31_8B if not args.smoke else SMOKE)
    small.update(num_hidden_layers=2, vocab_size=1024)
    model = build_model(small, device, dtype)
    ids = torch.randint(0, 1024, (1, args.check_len), generator=g).to(device)
    with torch.no_grad():
        dense = model(ids).logits.float()
        rt.configure(model, rt.RoutedPrefillPolicy(block_size=bs, coverage=1.0, min_seq_len=1, backend=backend,
                                                   estimator_backend=backend))
        full = model(ids).logits.float()
        model.set_attn_implementation("sdpa")
        model.config._attn_implementation = "sdpa"
        # SDPA's own bf16 error, against float32 SDPA, sets the scale of the comparison.
        dense32 = model.float()(ids).logits.float()
    res["model_full_budget_vs_sdpa_rel_err"] = rel_err(full, dense)
    res["model_sdpa_bf16_vs_fp32_rel_err"] = rel_err(dense, dense32)
    # Estimates on bf16 inputs against float32 references: pooled means are rounded to bf16 for
    # the tensor cores, so a per-mille error is expected; the routes' quality is measured elsewhere.
    res["passed"] = bool(res["pooled_probs_rel_err"] < 2e-2 and res["sampled_mass_rel_err"] < 2e-2
                         and res["routed_attention_rel_err"] <= 3 * res["routed_attention_rel_err_plain_torch_same_dtype"]
                         + 1e-3 and res["model_full_budget_vs_sdpa_rel_err"]
                         <= 3 * res["model_sdpa_bf16_vs_fp32_rel_err"] + 1e-3)
    del model
    return res


def estimator_ms(device, dtype, n, policy, repeats) -> float:
    """One layer's estimator (scores + selection into a route) on random q, k of the 8B shape."""
    g = torch.Generator(device="cpu").manual_seed(2)
    q = torch.randn(1, 32, n, 128, generator=g).to(device, dtype)
    k = torch.randn(1, 8, n, 128, generator=g).to(device, dtype)
    policy.router(q, k)
    return 1e3 * median(timed(lambda: policy.router(q, k), device, repeats))


def breakdown(device, dtype, n, policies, repeats=3) -> dict:
    """One layer's pieces at length ``n`` on q, k, v laid out as transformers passes them
    ([B, N, H, D] storage seen as [B, H, N, D]): pooling, each estimator's scores, selection,
    routed attention on the route, and dense causal SDPA (cuDNN) on the same tensors, in ms."""
    import torch.nn.functional as F

    from routed.ops.block_scores import block_means
    from routed.routers.estimators import select_blocks

    g = torch.Generator(device="cpu").manual_seed(3)
    q = torch.randn(1, n, 32, 128, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(1, n, 8, 128, generator=g).to(device, dtype).transpose(1, 2)
    v = torch.randn(1, n, 8, 128, generator=g).to(device, dtype).transpose(1, 2)
    ms = lambda fn: 1e3 * median(timed(fn, device, repeats))  # noqa: E731
    out = {"seq_len": n}
    with sdpa_backend("cudnn" if device.type == "cuda" else "default"):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out["sdpa_dense_ms"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    bs = policies[0][1].block_size
    out["block_means_qk_ms"] = ms(lambda: (block_means(q, bs), block_means(k, bs)))
    for spec, pol in policies:
        est = pol.router
        probs = est.probs(q, k)
        row = {"scores_ms": ms(lambda: est.probs(q, k))}
        route = select_blocks(probs, est.budget, q_len=n, kv_len=n, block_size=bs)
        row["select_ms"] = ms(lambda: select_blocks(probs, est.budget, q_len=n, kv_len=n, block_size=bs))
        routed_attention(q, k, v, route, backend=pol.backend)
        row["routed_attention_ms"] = ms(lambda: routed_attention(q, k, v, route, backend=pol.backend))
        row["density"] = route.density()
        out[spec] = row
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--policies", nargs="+", default=["pooled:top_k=32", "strided:top_k=32"],
                   help="estimator:budget pairs, e.g. pooled:top_k=32 strided:coverage=0.9")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dense", nargs="+", default=["cudnn", "flash"], help="SDPA backends for the dense runs")
    p.add_argument("--flash-max-len", type=int, default=131072, help="skip the flash baseline above this length")
    p.add_argument("--check-len", type=int, default=4096)
    p.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--breakdown", type=int, nargs="*", default=[131072], help="lengths for the one-layer breakdown")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script runs")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "prefill_llama.json"))
    args = p.parse_args()

    if args.smoke:
        device, dtype, cfg = torch.device("cpu"), torch.float32, SMOKE
        args.lengths, args.dense, args.check_len, args.block_size = [1024], ["default"], 256, 64
        backend = est_backend = None
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (use --smoke on the CPU)")
            return 2
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, LLAMA_31_8B
        backend = est_backend = "triton"
    result = {"machine": machine_header(), "command": command_line(),
              "config": {"model": "Llama-3.1-8B configuration, random weights" if not args.smoke else "smoke",
                         **{k: v for k, v in cfg.items() if k != "rope_parameters"}, "dtype": str(dtype),
                         "block_size": args.block_size, "logits_to_keep": 1, "batch": 1}, "check": None, "runs": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    t0 = time.time()
    result["check"] = check(device, dtype, args)
    print("check:", json.dumps(result["check"]), f"({time.time() - t0:.0f} s)", flush=True)
    save()
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None

    policies = [parse_policy(s, args.block_size, backend, est_backend) for s in args.policies]
    result["breakdown"] = []
    for n in ([256] if args.smoke else args.breakdown):
        try:
            result["breakdown"].append(breakdown(device, dtype, n, list(zip(args.policies, policies))))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["breakdown"].append({"seq_len": n, "error": f"{type(e).__name__}: {e}"[:500]})
        print("breakdown:", json.dumps(result["breakdown"][-1]), flush=True)
        save()
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

    model = build_model(cfg, device, dtype)
    vocab = cfg["vocab_size"]
    for n in args.lengths:
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)

        def prefill():
            with torch.no_grad():
                model(ids, logits_to_keep=1, use_cache=False)

        for name in args.dense:
            if name == "flash" and n > args.flash_max_len:
                continue
            model.set_attn_implementation("sdpa")
            try:
                with sdpa_backend(name):
                    prefill()  # warm-up
                    ts = timed(prefill, device, args.repeats)
                row = dict(seq_len=n, path=f"dense-{name}", prefill_s=median(ts), times_s=ts, density=1.0)
            except Exception as e:  # noqa: BLE001  (recorded, the other runs go on)
                traceback.print_exc()
                row = dict(seq_len=n, path=f"dense-{name}", error=f"{type(e).__name__}: {e}"[:500])
            result["runs"].append(row)
            print(row, flush=True)
            save()
        for spec, pol in zip(args.policies, policies):
            try:
                rec = rt.PrefillRecorder()
                rt.configure(model, pol, recorder=rec)
                prefill()  # warm-up: compiles and autotunes the kernels, records the routes' density
                density = rec.summary()["prefill_density"]
                rt.configure(model, pol)
                ts = timed(prefill, device, args.repeats)
                est = estimator_ms(device, dtype, n, pol, 3)
                row = dict(seq_len=n, path=f"routed-{spec}", prefill_s=median(ts), times_s=ts, density=density,
                           estimator_ms_per_layer=est, routed_calls=rec.summary()["routed_calls"], policy=repr(pol))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = dict(seq_len=n, path=f"routed-{spec}", error=f"{type(e).__name__}: {e}"[:500])
            result["runs"].append(row)
            print(row, flush=True)
            save()
        if args.ttft and all("error" not in r for r in result["runs"]):
            def gen():
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)

            model.set_attn_implementation("sdpa")
            with sdpa_backend(args.dense[0]):
                gen()
                ts = timed(gen, device, 1)
            result["runs"].append(dict(seq_len=n, path=f"ttft-dense-{args.dense[0]}", ttft_s=ts[0]))
            rt.configure(model, policies[0])
            gen()
            ts = timed(gen, device, 1)
            result["runs"].append(dict(seq_len=n, path=f"ttft-routed-{args.policies[0]}", ttft_s=ts[0]))
            print(result["runs"][-2:], flush=True)
            save()
        del ids
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

    print(f"\n{result['machine'].get('gpu') or 'cpu'}  torch {result['machine']['torch']}  "
          f"triton {result['machine']['triton']}  check passed: {result['check']['passed']}")
    print(f"{'seq':>7} {'path':<28} {'time s':>8} {'density':>8} {'vs dense':>9}")
    for n in args.lengths:
        rows = [r for r in result["runs"] if r["seq_len"] == n]
        base = next((r["prefill_s"] for r in rows if r["path"] == f"dense-{args.dense[0]}"), None)
        tbase = next((r["ttft_s"] for r in rows if r["path"].startswith("ttft-dense")), None)
        for r in rows:
            if "error" in r:
                print(f"{n:>7} {r['path']:<28} failed: {r['error'][:80]}")
                continue
            t = r.get("prefill_s", r.get("ttft_s"))
            ref = tbase if "ttft_s" in r else base
            dens = r.get("density")
            print(f"{n:>7} {r['path']:<28} {t:>8.3f} {'' if dens is None else f'{dens:.3f}':>8} "
                  f"{ref / t if ref else float('nan'):>8.2f}x")
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
