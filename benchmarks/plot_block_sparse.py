"""Plot committed block-sparse benchmark results: effective TFLOP/s of routed, FlexAttention
(same block mask) and dense SDPA, forward and forward+backward, per shape.

    python benchmarks/plot_block_sparse.py benchmarks/results/h100/block_sparse_*.json -o out.png

``--graph`` plots routed and FlexAttention from their CUDA-graph replays (the GPU's time without the
host's launch cost, which bounds eager calls of the routed kernels at 8k; the dense bars stay eager).
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--graph", action="store_true", help="routed and Flex from CUDA-graph replays")
    args = p.parse_args()
    rows, machine = [], None
    for path in args.results:
        data = json.load(open(path))
        rows += data.get("bench", [])
        machine = machine or data["machine"]
    rows.sort(key=lambda r: (r["n"], -r["hkv"], r["blocks"]))
    labels = [f"{r['n'] // 1024}k\nkv{r['hkv']}\n{r['blocks']}blk" for r in rows]
    series = [("routed (triton)", "routed", "tab:red"), ("FlexAttention, same mask", "flex", "tab:blue"),
              ("SDPA cuDNN, dense", "sdpa_cudnn", "tab:gray"), ("SDPA flash, dense", "sdpa_flash", "silver")]
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    width = 0.2
    for ax, key, title in ((axes[0], "fwd_tflops", "forward"), (axes[1], "fwd_bwd_tflops", "forward + backward")):
        for i, (name, src, color) in enumerate(series):
            graphed = args.graph and src in ("routed", "flex")
            k = key.replace("_tflops", "_graph_tflops") if graphed else key
            vals = [r["results"].get(src, {}).get(k, 0) for r in rows]
            ax.bar([x + (i - 1.5) * width for x in range(len(rows))], vals, width, label=name, color=color)
        ax.set_ylabel("effective TFLOP/s")
        ax.set_title(f"{title}{' (routed and Flex graph-replayed)' if args.graph else ''}: bf16, causal, 16 query heads, head dim 128, key blocks of 128")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=4, fontsize=8, loc="upper left")
    axes[1].set_xticks(range(len(rows)), labels, fontsize=8)
    fig.suptitle(f"{machine['gpu']}, torch {machine['torch']}, triton {machine['triton']} "
                 "(dense bars: TFLOP/s of the full causal attention)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
