"""Run several GPU_PLAN.md items in one device call: each as its own process with its own time
limit, inside one overall budget, every output kept under ``--out`` (logs and JSON), a summary last.

    python benchmarks/gpu_session.py --out $OUT --budget 560 --items small_blocks clustered block_sparse_rest

A device machine is released ~30 s after a call, so separate calls each pay the machine's start;
one call running several items does not. An item cut short by its limit keeps whatever its script
saved so far (the benchmarks save after every row). ``--list`` prints the items.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (GPU_PLAN row (0: done, kept to re-check), seconds it may take, environment, commands; "{out}": output folder)
# the Routing Transformer's PyPI peer and its dependencies, from the carried wheels (nothing installs there)
PEER_INSTALL = ("python -m pip install -q --upgrade --no-index --no-deps --target /tmp/routed_peer_site "
                ".whl/routing_transformer-1.6.1-py3-none-any.whl .whl/local_attention-1.4.4-py3-none-any.whl "
                ".whl/mixture_of_experts-0.2.1-py3-none-any.whl .whl/einops-0.8.2-py3-none-any.whl")
# the MoE LM of the GPU runs (moe_lm_quality_500.json): 8 layers of 512, 16 experts, 500 steps of 16 x 1024
MOE_GPU_SIZE = ("--device cuda --vocab-size 0 --hidden-size 512 --layers 8 --heads 8 --experts 16 --seq-len 1024 "
                "--batch-size 16 --steps 500 --warmup 50 --ckpt-every 50 --seeds 0 --ckpt-dir /tmp/moe_ckpt --no-progress")
ITEMS = {
    # ~120 s on the H200 (the triage table after it takes longer than that)
    "small_blocks": (0, 300, {"ROUTED_AUTOTUNE": "0"}, [
        "python benchmarks/check_small_blocks.py --out {out}/small_blocks.json",
        "python benchmarks/triage_small_blocks.py",
        "python -m pytest -q -p no:cacheprovider -m gpu tests",
    ]),
    # first-call tuning of every shape the layer launches took the whole limit twice (H200): untuned
    "clustered": (0, 230, {"ROUTED_AUTOTUNE": "0"}, [
        PEER_INSTALL,
        "PYTHONPATH=src:/tmp/routed_peer_site python benchmarks/clustered_attention.py --lengths 8192 32768 65536 "
        "--rep-ms 100 --out {out}/clustered_attention.json",
    ]),
    "block_sparse_rest": (0, 330, {}, [
        "python benchmarks/block_sparse.py --skip-check --skip-decode --lengths 32768 131072 "
        "--out {out}/block_sparse_32k_128k.json",
    ]),
    "profile": (13, 90, {"ROUTED_AUTOTUNE": "0"}, [
        "python benchmarks/profile_block_sparse.py --cprofile --launch-overhead",
    ]),
    "bra": (0, 330, {}, [  # at the batches that fill the GPU, 224 and 512 px took ~150 s on the H200 (no check)
        "python benchmarks/bra.py --sides 224 512 --out {out}/bra.json",
    ]),
    "bra_1024": (0, 330, {}, [  # the 1024 px stages alone (512 and 1024 px with the check took 340 s)
        "python benchmarks/bra.py --sides 1024 --out {out}/bra_1024.json",
    ]),
    "prefill_llama": (0, 400, {}, [
        "python benchmarks/prefill_llama.py --out {out}/prefill_llama.json",
    ]),
    "lm_speed": (0, 250, {"ROUTED_AUTOTUNE": "0"}, [  # issue 4 without training: module f+b, prefill, router cost vs saved attention
        "python benchmarks/lm_compare.py --variants --speed --out {out}/lm_compare_speed.json",
    ]),
    "profile_layers": (0, 150, {"ROUTED_AUTOTUNE": "0"}, [  # where each LM layer's step goes: host vs GPU, kernels
        "python benchmarks/profile_layers.py --n 8192 32768 --out {out}/profile_layers.json",
    ]),
    "gpu_tests": (0, 200, {"ROUTED_AUTOTUNE": "0"}, [
        "python -m pytest -q -p no:cacheprovider -m gpu tests",
    ]),
    "lm_passkey_nsa": (0, 200, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache (GPU_PLAN row 6)
        "cp benchmarks/results/h200/lm_compare_passkey.json {out}/",
        "python benchmarks/lm_compare.py --variants nsa --passkey-fraction 0.25 --no-progress "
        "--label 'passkey-mixed (25% of windows)' --out {out}/lm_compare_passkey.json",
    ]),
    "lm_passkey_2k": (0, 540, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache (GPU_PLAN row 6)
        "python benchmarks/lm_compare.py --variants dense nsa --seq-len 2048 --batch-size 16 --passkey-fraction 0.5 "
        "--train-tokens 48000000 --cuda-graph --no-progress --label 'context 2k, passkey-mixed (50% of windows)' "
        "--out {out}/lm_compare_passkey_2k.json",
    ]),
    # GCIDE's 15.2M training tokens: 48M tokens are ~3 epochs (SOTU's 1.9M: 25, memorised); one variant a
    # call-item (dense and NSA together ran past 540 s at 2k on SOTU)
    "lm_passkey_gcide": (6, 300, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache/gpt2, .routed-cache/tokens
        "python benchmarks/lm_compare.py --variants dense --corpus gcide --seq-len 2048 --batch-size 16 "
        "--passkey-fraction 0.5 --train-tokens 48000000 --cuda-graph --no-progress "
        "--label 'GCIDE, context 2k, passkey-mixed (50% of windows)' --out {out}/lm_compare_passkey_gcide_2k_dense.json",
    ]),
    "lm_passkey_gcide_nsa": (6, 330, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache/gpt2, .routed-cache/tokens
        "python benchmarks/lm_compare.py --variants nsa --corpus gcide --seq-len 2048 --batch-size 16 "
        "--passkey-fraction 0.5 --train-tokens 48000000 --cuda-graph --no-progress "
        "--label 'GCIDE, context 2k, passkey-mixed (50% of windows)' --out {out}/lm_compare_passkey_gcide_2k_nsa.json",
    ]),
    "lm_passkey_gcide_moba": (6, 300, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache/gpt2, .routed-cache/tokens
        "python benchmarks/lm_compare.py --variants moba --corpus gcide --seq-len 2048 --batch-size 16 "
        "--passkey-fraction 0.5 --train-tokens 48000000 --cuda-graph --no-progress "
        "--label 'GCIDE, context 2k, passkey-mixed (50% of windows)' --out {out}/lm_compare_passkey_gcide_2k_moba.json",
    ]),
    "lm_graph_8k": (0, 480, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache
        "ROUTED_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py",
        "python benchmarks/lm_compare.py --seq-len 8192 --batch-size 4 --cuda-graph --no-progress "
        "--label 'context 8k, CUDA-graphed steps' --out {out}/lm_compare_8k_graph.json",
    ]),
    "lm_compile_8k": (1, 560, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache; inductor compiles first
        "python benchmarks/lm_compare.py --variants dense moba nsa --seq-len 8192 --batch-size 4 "
        "--compile reduce-overhead --no-progress --label 'context 8k, torch.compile reduce-overhead' "
        "--out {out}/lm_compare_8k_compiled.json",
    ]),
    "decode_merge": (0, 200, {}, [  # both decode merges: correctness at GPU scale, then graph/eager times
        "ROUTED_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -m gpu tests/test_block_sparse_triton.py -k decode",
        "python benchmarks/block_sparse.py --skip-check --skip-bench --decode-merge combine "
        "--out {out}/decode_combine_merge.json",
        "python benchmarks/block_sparse.py --skip-check --skip-bench --decode-merge fused "
        "--out {out}/decode_fused_merge.json",
    ]),
    "moe": (0, 300, {}, [
        "python benchmarks/moe.py --out {out}/moe.json",
    ]),
    "moe_overhead": (0, 150, {}, [  # where the eager MoE forward's extra ~1.5 ms over its CUDA graph goes
        "python benchmarks/moe_overhead.py --out {out}/moe_overhead.json",
    ]),
    "decode_merges": (0, 200, {}, [  # the decode merges by CUPTI kernel time (graph_kernels), ~70 s each
        "python benchmarks/block_sparse.py --skip-check --skip-bench --decode-merge combine --out {out}/decode_combine.json",
        "python benchmarks/block_sparse.py --skip-check --skip-bench --decode-merge fused --out {out}/decode_fused.json",
    ]),
    "bra_module": (0, 150, {}, [  # where the BRA module's non-attention ~12 ms at 512 px goes
        "python benchmarks/bra.py --sides 512 --no-check --no-graphs --profile-module --rep-ms 50 "
        "--out {out}/bra_512_module_profile.json",
    ]),
    "mqar_routing_c64": (0, 270, {}, [  # the Routing Transformer at 2k with clusters of ~32 tokens (~200 s)
        "python benchmarks/mqar.py --attention routing --seq-lens 2048 --kv-pairs 16 --vocab 256 --steps 5000 "
        "--batch-size 32 --lr 3e-3 --option kmeans_clusters=64 --out {out}/mqar_2k_routing_c64.json",
    ]),
    "token_major_pdl": (0, 150, {"ROUTED_AUTOTUNE": "0"}, [  # token-major outputs and the PDL combine launch
        "python -m pytest -q -p no:cacheprovider tests/test_block_sparse_triton.py tests/test_bra.py -k "
        "'token_major or compiles or decode_split_path or decode_on_gpu or triton_backend'",
    ]),
    "decode_pdl": (0, 100, {}, [  # decode with the combine launch as a programmatic dependent (~70 s)
        "python benchmarks/block_sparse.py --skip-check --skip-bench --decode-merge combine --decode-pdl 1 "
        "--out {out}/decode_pdl.json",
    ]),
    "bra_module_token_major": (0, 160, {}, [  # the module after the region-major projection, 224 and 512 px
        "python benchmarks/bra.py --sides 224 512 --no-check --no-graphs --profile-module --rep-ms 50 "
        "--out {out}/bra_module_token_major.json",
    ]),
    "pack_tests": (0, 150, {"ROUTED_AUTOTUNE": "0"}, [  # packed small-block tiles at GPU scale, bf16 included
        "python -m pytest -q -p no:cacheprovider tests/test_block_sparse_triton.py tests/test_bra.py -k "
        "'packed_into or small_blocks_causal_on_gpu or triton_backend'",
    ]),
    "bra_stage3_pack": (0, 280, {}, [  # BRA's 4-token regions with packed tiles against one region per tile
        "python benchmarks/bra.py --sides 224 512 1024 --stages 3 --no-graphs --rep-ms 50 "
        "--out {out}/bra_stage3_pack.json",
        "ROUTED_BLOCK_PACK=0 python benchmarks/bra.py --sides 224 512 1024 --stages 3 --no-check --no-graphs "
        "--rep-ms 50 --out {out}/bra_stage3_nopack.json",
    ]),
    "bra_1024_stages12": (0, 130, {}, [  # the module after the token-major change at 1024 px, stages 1-2
        "python benchmarks/bra.py --sides 1024 --stages 1 2 --no-check --no-graphs --rep-ms 50 "
        "--out {out}/bra_1024_stages12_token_major.json",
    ]),
    "profile_layers_8k_token_major": (0, 170, {}, [  # the LM layers' 8k step with token-major attention outputs
        "python benchmarks/profile_layers.py --n 8192 --layers dense moba nsa "
        "--out {out}/profile_layers_8k_token_major.json",
    ]),
    "row_kernel_tests": (0, 120, {"ROUTED_AUTOTUNE": "0"}, [  # permute_rows' Triton row mover on the GPU
        "python -m pytest -q -p no:cacheprovider tests/test_permute_rows.py tests/test_routing_attention.py "
        "tests/test_bra.py -k 'triton or row_kernel or permute or routing'",
    ]),
    "bra_row_kernel": (0, 170, {}, [  # the module with region reorders by the row kernel, stages 1-2 at 512/1024
        "python benchmarks/bra.py --sides 512 1024 --stages 1 2 --no-graphs --rep-ms 50 "
        "--out {out}/bra_row_kernel.json",
    ]),
    "row_kernel_ab": (0, 330, {}, [  # the BRA module with region reorders by the row kernel and without, stages 1-2
        "ROUTED_ROW_KERNEL=1 ROUTED_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider tests/test_permute_rows.py "
        "tests/test_bra.py -k 'triton or row_kernel or permute'",
        "ROUTED_ROW_KERNEL=1 python benchmarks/bra.py --sides 512 1024 --stages 1 2 --no-check --no-graphs "
        "--rep-ms 50 --out {out}/bra_row_kernel_on.json",
        "ROUTED_ROW_KERNEL=0 python benchmarks/bra.py --sides 512 1024 --stages 1 2 --no-check --no-graphs "
        "--rep-ms 50 --out {out}/bra_row_kernel_off.json",
    ]),
    "forced_configs": (0, 420, {}, [  # forced configs: head- vs token-major layouts, dk/dv and forward tiles
        "python benchmarks/forced_configs.py --out {out}/forced_configs.json",
    ]),
    "clustered_slot_route": (0, 330, {"ROUTED_AUTOTUNE": "0"}, [  # the causal slot-space cluster route, profiled
        "python -m pytest -q -p no:cacheprovider tests/test_kmeans.py tests/test_routing_attention.py "
        "tests/test_permute_rows.py -k 'triton or route or permute or routing'",
        PEER_INSTALL,
        "PYTHONPATH=src:/tmp/routed_peer_site python benchmarks/clustered_attention.py --lengths 8192 32768 65536 "
        "--sections routing core --profile --rep-ms 100 --out {out}/clustered_attention_slot_route.json",
    ]),
    "profile_layers_8k_untuned_dkdv": (0, 170, {"ROUTED_AUTOTUNE": "0"}, [  # the new untuned dk/dv default
        "python benchmarks/profile_layers.py --n 8192 --layers dense moba nsa "
        "--out {out}/profile_layers_8k_noautotune_dkdv128.json",
    ]),
    "rotary_ab": (0, 480, {"ROUTED_AUTOTUNE": "0"}, [  # the fused rotary kernel: GPU tests, layers with it on and off
        "ROUTED_ROTARY_KERNEL=1 python -m pytest -q -p no:cacheprovider tests/test_rotary.py tests/test_routed_lm.py "
        "tests/test_routing_attention.py",
        PEER_INSTALL,
        "ROUTED_ROTARY_KERNEL=1 PYTHONPATH=src:/tmp/routed_peer_site python benchmarks/clustered_attention.py "
        "--lengths 8192 32768 65536 --sections routing --profile --rep-ms 100 --out {out}/clustered_attention_rotary.json",
        "ROUTED_ROTARY_KERNEL=1 python benchmarks/profile_layers.py --n 8192 --layers dense moba nsa "
        "--out {out}/profile_layers_8k_rotary.json",
        "ROUTED_ROTARY_KERNEL=0 python benchmarks/profile_layers.py --n 8192 --layers dense moba nsa "
        "--out {out}/profile_layers_8k_rotary_off.json",
    ]),
    "kmeans_kernel_ab": (0, 330, {"ROUTED_AUTOTUNE": "0"}, [  # the fused k-means kernels: GPU tests, layer on/off
        "python -m pytest -q -p no:cacheprovider tests/test_nearest_centroid.py tests/test_kmeans.py "
        "tests/test_routing_attention.py tests/test_rotary.py tests/test_routed_lm.py",
        PEER_INSTALL,
        "ROUTED_KMEANS_KERNEL=1 PYTHONPATH=src:/tmp/routed_peer_site python benchmarks/clustered_attention.py "
        "--lengths 8192 32768 65536 --sections routing --profile --rep-ms 100 --out {out}/clustered_attention_kmeans_kernel.json",
        "ROUTED_KMEANS_KERNEL=0 PYTHONPATH=src:/tmp/routed_peer_site python benchmarks/clustered_attention.py "
        "--lengths 32768 65536 --sections routing --rep-ms 100 --out {out}/clustered_attention_kmeans_off.json",
    ]),
    "kmeans_variants": (0, 200, {"ROUTED_AUTOTUNE": "0"}, [  # the assigning pass's launch variants, host times
        "python benchmarks/kmeans_kernel.py --out {out}/kmeans_kernel.json",
        "ROUTED_KMEANS_KERNEL=1 python benchmarks/profile_layers.py --n 32768 --layers routing --host-profile 30 "
        "--no-graphs --out {out}/profile_routing_host_kmeans_on.json",
        "ROUTED_KMEANS_KERNEL=0 python benchmarks/profile_layers.py --n 32768 --layers routing --host-profile 30 "
        "--no-graphs --out {out}/profile_routing_host_kmeans_off.json",
    ]),
    "final_checks": (0, 420, {"ROUTED_AUTOTUNE": "0"}, [  # tf32x3 k-means, token-major row moves, blocks-of-64 firsts
        PEER_INSTALL,
        "PYTHONPATH=src:/tmp/routed_peer_site python benchmarks/clustered_attention.py --lengths 8192 32768 65536 "
        "--sections routing --profile --rep-ms 100 --out {out}/clustered_attention_tf32x3_token_major.json",
        "python -m pytest -q -p no:cacheprovider tests/test_nearest_centroid.py tests/test_permute_rows.py "
        "tests/test_routing_attention.py tests/test_kmeans.py",
        "python -m pytest -q -p no:cacheprovider tests/test_block_sparse_triton.py -k 'small_tile or small_blocks_causal'",
        "ROUTED_AUTOTUNE=quick python benchmarks/forced_configs.py --part nsa --nsa-no-sweep "
        "--out {out}/forced_configs_nsa_small_block_first.json",
    ]),
    "layer_memory": (0, 420, {"ROUTED_AUTOTUNE": "0"}, [  # Routing Transformer: loss on slot copies, no o_proj cat
        PEER_INSTALL,
        "python -m pytest -q -p no:cacheprovider tests/test_routing_attention.py tests/test_kmeans.py "
        "tests/test_nearest_centroid.py",
        "PYTHONPATH=src:/tmp/routed_peer_site python benchmarks/clustered_attention.py --lengths 8192 32768 65536 "
        "--sections routing --profile --rep-ms 100 --out {out}/clustered_attention_memory.json",
        # the layer before this change (carry .old: `git archive <commit> src benchmarks/bra.py
        # benchmarks/block_sparse.py`, plus this benchmark script) under the same measurement
        "test -d .old && PYTHONPATH=/tmp/routed_peer_site python .old/benchmarks/clustered_attention.py "
        "--lengths 8192 65536 --sections routing --rep-ms 100 --out {out}/clustered_attention_memory_before.json",
        "python -m pytest -q -p no:cacheprovider tests/test_routed_lm.py -k 'compiles_without_graph_breaks and mosa'",
    ]),
    "mosa_compile": (0, 300, {}, [  # MoSA's compiled step against eager, then MQAR at 4k for 10000 steps
        "python -m pytest -q -p no:cacheprovider tests/test_routed_lm.py -k 'compiles_without_graph_breaks and mosa'",
        "python benchmarks/probe_mosa_compile.py --out {out}/probe_mosa_compile.json",
        "python benchmarks/mqar.py --attention mosa --seq-lens 4096 --kv-pairs 16 --vocab 256 --steps 10000 "
        "--batch-size 16 --lr 3e-3 --out {out}/mqar_4k_mosa_10k.json",
    ]),
    "mosa_probe_variants": (0, 120, {}, [  # which of MoSA's eager and compiled GPU steps is off float64
        "python benchmarks/probe_mosa_compile.py --out {out}/probe_mosa_compile_variants.json",
    ]),
    # issue 3's whole table on today's kernels (the committed one is from the first H200 day): 8k with the
    # full-size check and decode, then 32k and 128k timed (~150 s + ~330 s with autotuning)
    "block_sparse_table": (0, 590, {}, [
        "python benchmarks/block_sparse.py --lengths 8192 --out {out}/block_sparse_8k_now.json",
        "python benchmarks/block_sparse.py --skip-check --skip-decode --lengths 32768 131072 "
        "--out {out}/block_sparse_32k_128k_now.json",
    ]),
    "block_sparse_128k": (0, 300, {}, [  # the table's 128k rows (block_sparse_table's second command ran out)
        "python benchmarks/block_sparse.py --skip-check --skip-decode --lengths 131072 "
        "--out {out}/block_sparse_128k_now.json",
    ]),
    "mosa_opaque": (0, 260, {}, [  # the compile test with the picked ops opaque, then the probe's variants again
        "python -m pytest -q -p no:cacheprovider tests/test_routed_lm.py -k 'compiles_without_graph_breaks and mosa'",
        "python -m pytest -q -p no:cacheprovider tests/test_mosa.py -k 'opaque or opcheck'",
        "python benchmarks/probe_mosa_compile.py --out {out}/probe_mosa_compile_opaque.json",
    ]),
    # issue 8 at GPU scale: does fluctuation fall towards token choice as the mixing weight falls? (~75 s a model)
    "moe_mix_025": (0, 330, {"ROUTED_CACHE": ".routed-cache"}, [  # carry .routed-cache/gpt2, .routed-cache/tokens
        "python benchmarks/moe_lm_quality.py " + MOE_GPU_SIZE + " --routers token_choice similarity attention "
        "--mix 0.25 --out {out}/moe_lm_quality_mix025.json",
    ]),
    "moe_mix_025_seed1": (5, 330, {"ROUTED_CACHE": ".routed-cache"}, [  # the mix 0.25 runs' second seed
        "python benchmarks/moe_lm_quality.py " + MOE_GPU_SIZE.replace("--seeds 0", "--seeds 1") +
        " --routers token_choice similarity attention --mix 0.25 --out {out}/moe_lm_quality_mix025_seed1.json",
    ]),
    "moe_mix_01_seed1": (0, 200, {"ROUTED_CACHE": ".routed-cache"}, [  # the mix 0.1 runs' second seed
        "python benchmarks/moe_lm_quality.py " + MOE_GPU_SIZE.replace("--seeds 0", "--seeds 1") +
        " --routers similarity attention --mix 0.1 --out {out}/moe_lm_quality_mix01_seed1.json",
    ]),
    "moe_mix_01": (0, 230, {"ROUTED_CACHE": ".routed-cache"}, [
        "python benchmarks/moe_lm_quality.py " + MOE_GPU_SIZE + " --routers similarity attention "
        "--mix 0.1 --out {out}/moe_lm_quality_mix01.json",
    ]),
    "mqar_routing_4k_c64": (0, 450, {}, [  # the Routing Transformer at 4k with 64 clusters, 10000 steps
        "python benchmarks/mqar.py --attention routing --seq-lens 4096 --kv-pairs 16 --vocab 256 --steps 10000 "
        "--batch-size 16 --lr 3e-3 --option kmeans_clusters=64 --out {out}/mqar_4k_routing_c64_10k.json",
    ]),
    "nsa_forced": (0, 330, {}, [  # NSA's 8k layer step: fresh autotuning x3, then each kernel's candidates forced
        "python benchmarks/forced_configs.py --part nsa --out {out}/forced_configs_nsa.json",
    ]),
    "lm_speed_tuned_mass": (0, 240, {}, [  # NSA router cost at 32k with the autotuned mass kernel (autotune on)
        "python benchmarks/lm_compare.py --variants --speed --speed-lens 32768 --out {out}/lm_speed_tuned_mass.json",
    ]),
}


def run_item(name: str, out: Path, deadline: float) -> dict:
    row, limit, env_extra, commands = ITEMS[name]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env_extra)
    item_out = out / name
    item_out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    status = "ok"
    with open(item_out / "log.txt", "w") as log:
        for cmd in commands:
            left = min(limit - (time.monotonic() - t0), deadline - time.monotonic())
            if left < 10:
                status = "skipped: out of time"
                break
            # "python" is this interpreter (the device machine's may not be first on PATH)
            cmd = cmd.format(out=item_out).replace("python ", f"{sys.executable} ", 1)
            log.write(f"$ {cmd}\n")
            log.flush()
            proc = subprocess.Popen(cmd, shell=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:  # the whole process group: the shell and what it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = f"cut at its limit ({left:.0f} s)"
                break
            if rc:
                status = f"exit {rc}"
    return {"item": name, "plan_row": row, "status": status, "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--items", nargs="+", default=[], choices=sorted(ITEMS), metavar="ITEM")
    p.add_argument("--budget", type=float, default=560, help="seconds for all items together")
    p.add_argument("--list", action="store_true")
    a = p.parse_args()
    if a.list or not a.items:
        for name, (row, limit, env, cmds) in ITEMS.items():
            print(f"{name:<18} {f'GPU_PLAN #{row}' if row else 'done (re-check)'}, up to {limit} s: {' && '.join(cmds)}")
        return
    if a.out is None:
        p.error("--out is required to run items")
    deadline = time.monotonic() + a.budget
    rows = [run_item(name, a.out, deadline) for name in a.items]
    for r in rows:
        print(f"{r['item']:<18} #{r['plan_row']}: {r['status']:<28} {r['seconds']:>6.1f} s")
    for r in rows:  # the last lines of each log: the tables the scripts print last
        log = (a.out / r["item"] / "log.txt").read_text().splitlines()
        print(f"--- {r['item']}\n" + "\n".join(log[-15:]))
    sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    main()
