"""BiFormer on a GPU: (a) inference throughput of BiFormer-T against timm's Swin-T and ViT-S;
(b) quality: a small BiFormer against the same model with static window attention (the same
regions per query region, the same FLOPs, no routing) trained for the same steps on cluttered
Fashion-MNIST scenes; (c) routing pictures of the trained model on a test scene.

    ROUTED_FASHION_MNIST=/folder/with/idx/files python benchmarks/biformer_vision.py --out results/
    python benchmarks/biformer_vision.py --smoke --out bv_smoke    # CPU, tiny sizes, a few steps

Throughput: forward only, bf16 autocast, batch 64 at 224x224, random weights, eval mode; median over
repeats timed with CUDA events. Quality: both models see the same scenes in the same order from the
same initial weights; the step count is fixed for both before training (from a timed calibration,
so the run fits its time budget). Writes ``biformer_vision.json`` (machine header first) and PNGs
under ``--out``; prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import timm  # noqa: E402

import routed.models  # noqa: E402,F401  (registers biformer_* with timm)
from routed.data.images import FASHION_MNIST_CLASSES, SceneConfig, load_fashion_mnist, make_scenes  # noqa: E402
from routed.env import command_line, machine_header  # noqa: E402
from routed.models import BiFormer  # noqa: E402
from routed.viz import draw_bra_routing  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- throughput


def throughput(name: str, device: torch.device, batch: int, size: int, repeats: int, iters: int) -> dict:
    model = timm.create_model(name, pretrained=False, num_classes=1000).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, size, size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), amp:
        for _ in range(3):   # warm-up: kernel compilation, autotuning, cuDNN plans
            model(x)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                for _ in range(iters):
                    model(x)
                t1.record()
                torch.cuda.synchronize()
                times.append(t0.elapsed_time(t1) / 1e3 / iters)
            else:
                t = time.perf_counter()
                for _ in range(iters):
                    model(x)
                times.append((time.perf_counter() - t) / iters)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model
    return {"model": name, "params_m": round(params / 1e6, 2), "batch": batch, "size": size,
            "ms_per_batch": round(sec * 1e3, 3), "images_per_s": round(batch / sec, 1),
            "peak_mem_gib": None if peak is None else round(peak, 2)}


# ------------------------------------------------------------------------------------------ quality


# Model variants of the quality comparison: (attn_type, BRA routing options). "bra" is the paper's
# routing rule; the others add BRA's options (own region always kept, centred query-region means).
VARIANTS = {
    "bra": ("bra", {}),
    "bra_own": ("bra", dict(keep_own_region=True)),
    "bra_centered": ("bra", dict(center_routing=True)),
    "bra_centered_own": ("bra", dict(keep_own_region=True, center_routing=True)),
    "window": ("window", {}),
}


def small_biformer(variant: str, cfg: dict) -> BiFormer:
    attn_type, options = VARIANTS[variant]
    torch.manual_seed(cfg["init_seed"])   # the same initial weights for every variant
    return BiFormer(depths=cfg["depths"], embed_dims=cfg["embed_dims"], head_dim=cfg["head_dim"],
                    topks=cfg["topks"], n_win=cfg["n_win"], attn_type=attn_type, in_chans=1, num_classes=10,
                    drop_path_rate=cfg["drop_path_rate"], **options)


def batches(n: int, batch: int, steps: int, seed: int):
    """The same sequence of index batches for every model: epochs of a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + batch]
        pos += batch


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    # [B, H, W] uint8 -> [B, 1, H, W] float, roughly zero-mean unit-variance for these sparse scenes.
    return (images_u8.float().unsqueeze(1) / 255.0 - 0.1) / 0.25


def train_step_fn(model, opt, sched, device):
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x, y):
        with amp:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss

    return step


def make_optimizer(model, steps: int, lr: float, warmup: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

    def lr_at(i):   # linear warm-up, then cosine to zero
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, device, batch: int = 500) -> float:
    model.eval()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    correct = 0
    for i in range(0, len(images), batch):
        with amp:
            logits = model(to_input(images[i:i + batch]))
        correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    model.train()
    return correct / len(images)


def time_steps(variant: str, cfg: dict, train_x, train_y, device, n: int) -> float:
    """Seconds per training step (after warm-up), on a throw-away copy of the model."""
    model = small_biformer(variant, cfg).to(device).train()
    opt, sched = make_optimizer(model, 10**6, cfg["lr"], 1)
    step = train_step_fn(model, opt, sched, device)
    it = batches(len(train_x), cfg["batch"], 3 + n, seed=123)
    for i, idx in enumerate(it):
        if i == 3:
            sync(device)
            t = time.perf_counter()
        step(to_input(train_x[idx]), train_y[idx])
    sync(device)
    return (time.perf_counter() - t) / n


def train(variant: str, cfg: dict, steps: int, train_x, train_y, test_x, test_y, device) -> tuple[BiFormer, dict]:
    model = small_biformer(variant, cfg).to(device).train()
    opt, sched = make_optimizer(model, steps, cfg["lr"], cfg["warmup"])
    step = train_step_fn(model, opt, sched, device)
    losses = []
    sync(device)
    t = time.perf_counter()
    for i, idx in enumerate(batches(len(train_x), cfg["batch"], steps, seed=cfg["data_seed"])):
        loss = step(to_input(train_x[idx]), train_y[idx])
        if i >= steps - 50:
            losses.append(loss.detach())
    sync(device)
    seconds = time.perf_counter() - t
    acc = evaluate(model, test_x, test_y, device)
    train_acc = evaluate(model, train_x[:len(test_x)], train_y[:len(test_x)], device)
    return model, {"attn_type": variant, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                   "steps": steps, "train_seconds": round(seconds, 1), "ms_per_step": round(1e3 * seconds / steps, 2),
                   "final_train_loss": round(float(torch.stack(losses).mean()), 4),
                   "train_acc": round(train_acc, 4), "test_acc": round(acc, 4)}


@torch.no_grad()
def routing_stats(model: BiFormer, images: torch.Tensor, boxes: np.ndarray, device, batch: int = 256) -> list[dict]:
    """How content-dependent the learned routes are, per routed stage, over ``images``:
    ``distinct_sets``: distinct routed sets among the query regions of one image (1 = every query
    region routes to the same regions; n_win**2 = all differ), averaged over images;
    ``own_region``: fraction of query regions whose routed set holds the region itself;
    ``target_region``: fraction of query regions routed to the region holding the target's centre."""
    model.eval()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with amp:
        routings = model.routings(to_input(images[:batch]))
    stats = []
    for stage, per_block in enumerate(routings):
        if per_block[0] is None:
            continue
        r = per_block[0]
        ids = r.region_ids.cpu()                                       # [B, S*S, topk]
        S, n = r.grid.grid, ids.shape[0]
        stride = 4 * 2 ** stage
        distinct = statistics.mean(len({tuple(row) for row in ids[b].tolist()}) for b in range(n))
        own = (ids == torch.arange(S * S)[None, :, None]).any(-1).float().mean().item()
        target = torch.tensor([region_of(boxes[b], stride, r.region_hw[0], S) for b in range(n)])
        hit = (ids == target[:, None, None]).any(-1).float().mean().item()
        stats.append({"stage": stage + 1, "block": 1, "topk": ids.shape[-1], "regions": S * S,
                      "distinct_sets": round(distinct, 2), "own_region": round(own, 3), "target_region": round(hit, 3)})
    return stats


def region_of(box, stride: int, region_tokens: int, n_win: int) -> int:
    """The region (row * n_win + col) holding the centre of a pixel box, on a map of the given stride."""
    top, left, h, w = box
    r = min(int((top + h / 2) // (stride * region_tokens)), n_win - 1)
    c = min(int((left + w / 2) // (stride * region_tokens)), n_win - 1)
    return r * n_win + c


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("biformer_vision_out"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (a CPU check of the script)")
    p.add_argument("--train-seconds", type=float, default=180.0,
                   help="time budget for training both models together (sets the common step count)")
    p.add_argument("--max-steps", type=int, default=6000)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--variants", nargs="+", default=["bra", "bra_centered", "bra_centered_own", "window"], choices=sorted(VARIANTS),
                   help="models of the quality comparison (same size, init and data order)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    header = machine_header()
    header["command"] = command_line(None if argv is None else ["benchmarks/biformer_vision.py", *argv])
    result: dict = {"machine": header}
    out_json = args.out / "biformer_vision.json"

    def save() -> None:   # after every phase, so a run cut short still leaves what it measured
        result["total_seconds"] = round(time.perf_counter() - t_start, 1)
        out_json.write_text(json.dumps(result, indent=2) + "\n")

    # (a) throughput
    tp_cfg = dict(batch=2, size=224, repeats=2, iters=1) if args.smoke else dict(batch=64, size=224, repeats=10, iters=5)
    rows = []
    if not args.skip_throughput:
        for name in ("biformer_tiny", "swin_tiny_patch4_window7_224", "vit_small_patch16_224"):
            rows.append(throughput(name, device, **tp_cfg))
            print("throughput", rows[-1], flush=True)
    result["throughput"] = {"config": {**tp_cfg, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
                                       "mode": "forward, eval, inference_mode, random weights"}, "rows": rows}
    save()

    # (b) quality
    scene = SceneConfig(canvas=64, scale=(1.0, 1.5), clutter=6, clutter_size=10) if args.smoke else \
        SceneConfig(canvas=128, scale=(1.0, 1.5), clutter=16, clutter_size=12)
    # 128 px canvas -> 32x32 tokens in stage 1 (stride 4); n_win 4 -> regions of 8x8 tokens there, 4x4 in
    # stage 2, 2x2 in stage 3; stage 4 (4x4 tokens) is global attention in both variants.
    cfg = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), head_dim=32, topks=(1, 4, 4, -2), n_win=4,
               drop_path_rate=0.05, batch=128, lr=2e-3, warmup=200, init_seed=0, data_seed=1)
    n_train, n_test = (args.n_train, args.n_test) if not args.smoke else (256, 64)
    if args.smoke:
        cfg.update(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), head_dim=16, n_win=2, topks=(1, 2, 2, -2),
                   batch=16, warmup=2)
    t = time.perf_counter()
    tr_items, tr_labels = load_fashion_mnist("train")
    te_items, te_labels = load_fashion_mnist("test")
    tr = make_scenes(tr_items, tr_labels, n_train, seed=0, config=scene)
    te = make_scenes(te_items, te_labels, n_test, seed=1, config=scene)
    train_x, train_y = torch.from_numpy(tr["images"]).to(device), torch.from_numpy(tr["labels"]).to(device)
    test_x, test_y = torch.from_numpy(te["images"]).to(device), torch.from_numpy(te["labels"]).to(device)
    print(f"scenes: {n_train} train, {n_test} test, {scene.canvas}px, in {time.perf_counter() - t:.1f}s", flush=True)

    if args.smoke:
        steps = 4
        calib = {}
    else:
        calib = {a: time_steps(a, cfg, train_x, train_y, device, n=20) for a in args.variants}
        steps = int(min(args.max_steps, args.train_seconds / sum(calib.values())))
        print(f"calibration s/step {calib} -> {steps} steps each", flush=True)
    runs, models = [], {}
    for variant in args.variants:
        models[variant], r = train(variant, cfg, steps, train_x, train_y, test_x, test_y, device)
        runs.append(r)
        print("quality", r, flush=True)
        result["quality_runs_so_far"] = runs
        save()
    result.pop("quality_runs_so_far")
    density = [None if k < 0 else round(k / cfg["n_win"] ** 2, 4) for k in cfg["topks"]]
    result["quality"] = {
        "task": "cluttered Fashion-MNIST scenes: one item among clutter patches cut from other items; 10 classes",
        "scenes": {"canvas": scene.canvas, "scale": scene.scale, "clutter": scene.clutter,
                   "clutter_size": scene.clutter_size, "n_train": n_train, "n_test": n_test,
                   "train_items": "Fashion-MNIST train split", "test_items": "Fashion-MNIST test split"},
        "model": {k: v for k, v in cfg.items()}, "density_per_stage": density,
        "window_baseline": "each query region attends to a fixed block of topk regions around it (1: its own, "
                           "4: a 2x2 block holding it), the same number of key regions as BRA routes to",
        "calibration_s_per_step": {k: round(v, 4) for k, v in calib.items()}, "runs": runs,
    }

    routed_variants = [v for v in args.variants if VARIANTS[v][0] == "bra"]
    result["quality"]["routing_stats"] = {v: routing_stats(models[v], test_x, te["boxes"], device)
                                          for v in routed_variants}
    print("routing", result["quality"]["routing_stats"], flush=True)
    save()
    if not routed_variants:
        return 0

    # (c) routing pictures: stage 2 (stride 8) of the (first) trained routed model on a test scene.
    model = models[routed_variants[0]].eval()
    idx = next((i for i in range(min(200, n_test))
                if te["boxes"][i][2] >= 36), 0)   # a large target, so it covers a few regions
    x = to_input(test_x[idx:idx + 1])
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with amp:
        routing = model.routings(x)
        pred = int(model(x).argmax(-1))
    stage, stride = 1, 8
    r = routing[stage][0]
    S = r.grid.grid
    q_target = region_of(te["boxes"][idx], stride, r.region_hw[0], S)
    far = max(range(S * S), key=lambda q: abs(q // S - q_target // S) + abs(q % S - q_target % S))
    pictures = []
    label = FASHION_MNIST_CLASSES[int(te["labels"][idx])]
    for name, q in (("biformer_vision.png", q_target), ("biformer_vision_background.png", far)):
        path = draw_bra_routing(test_x[idx].float().cpu(), r, q, args.out / name, stride=stride,
                                title=f"stage 2, top-{r.region_ids.shape[-1]}: query region {q} -> "
                                      f"{sorted(set(r.region_ids[0, q].tolist()))}\n"
                                      f"target '{label}' at box {tuple(int(v) for v in te['boxes'][idx])}, "
                                      f"predicted '{FASHION_MNIST_CLASSES[pred]}'")
        pictures.append({"file": name, "scene": idx, "stage": stage + 1, "query_region": q,
                         "routed_regions": sorted(set(r.region_ids[0, q].tolist()))})
    result["pictures"] = pictures
    save()

    print(f"\n{header['gpu'] or 'CPU'}  torch {header['torch']}  triton {header['triton']}  "
          f"total {result['total_seconds']}s")
    if rows:
        print(f"{'model':<32}{'params M':>9}{'img/s':>10}{'ms/batch':>10}")
        for row in rows:
            print(f"{row['model']:<32}{row['params_m']:>9}{row['images_per_s']:>10}{row['ms_per_batch']:>10}")
    print(f"{'variant':<18}{'steps':>7}{'ms/step':>9}{'train acc':>11}{'test acc':>10}   density/stage {density}")
    for run in runs:
        print(f"{run['attn_type']:<18}{run['steps']:>7}{run['ms_per_step']:>9}{run['train_acc']:>11}{run['test_acc']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
