"""Host side of the Triton block-sparse kernels: launch configs and autotuning, the route's derived
data (mask splits), the ``torch.library`` custom ops (so ``torch.compile`` traces them without
graph breaks) and autograd.

Chain: ``_block_sparse_*_kernel`` (triton_kernels.py) -> ``block_sparse_fwd`` / ``block_sparse_bwd``
(host launchers) -> ``routed::block_sparse_attn_fwd`` custom op with registered autograd ->
``routed_attention(..., backend="triton")``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from ...env import env_switch, triton_runs_on
from ...route import transpose_block_ids_compact
from ...testing import new_output
from ..layout import output_like
from .triton_kernels import (_block_sparse_bwd_dkdv_kernel, _block_sparse_bwd_dq_kernel,
                             _block_sparse_decode_split_kernel, _block_sparse_fwd_kernel, _bwd_preprocess_kernel,
                             _clean_counts_kernel, _decode_combine_kernel, _dkdv_shares_combine_kernel,
                             _share_offsets_kernel, _transpose_route_kernel, gdc_wait)

logger = logging.getLogger("routed")

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # the kernels take the softmax scale in log2 units
# Up to this many queries (all inside query block 0) take the split-over-key-blocks decode path.
DECODE_MAX_QUERIES = 16


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides ``n`` and is at most ``cap``."""
    return min(n & -n, cap)


def _dims(q: Tensor, v: Tensor) -> dict:
    return dict(_dims_cached(q.shape[-1], v.shape[-1], q.dtype == torch.float32))


@functools.lru_cache(maxsize=None)
def _dims_cached(d: int, dv: int, fp32: bool) -> tuple:
    return (("HEAD_DIM", d), ("BLOCK_D", max(16, triton.next_power_of_2(d))), ("HEAD_DIM_V", dv),
            ("BLOCK_DV", max(16, triton.next_power_of_2(dv))), ("DOT_PRECISION", "ieee" if fp32 else "tf32"))


# Launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the default, used where
# no tuning happens (the interpreter, ROUTED_AUTOTUNE=0). Tiles are clamped to the block sizes.
FWD_CANDIDATES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                  (128, 64, 8, 4), (64, 128, 4, 3)]
# Forward configs that read K/V through Hopper tensor descriptors (TMA), tried where they can run.
FWD_TMA_CANDIDATES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4)]
DQ_CANDIDATES = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2), (128, 128, 8, 2)]
# dk/dv: (walked query tile, own key tile, ...). 64x128 w8 s2 first: forced one at a time on the H200 it was
# the fastest at every issue-3 shape, the old default 64x64 w8 s3 took 1.9x its time, and 4-warp tiles of 32
# queries (the Triton tutorial's) 3-4x (results/h200/forced_configs.json).
DKDV_CANDIDATES = [(64, 128, 8, 2), (64, 64, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 4, 4),
                   (16, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)]
# What ROUTED_AUTOTUNE=quick (the default) times: the default config plus those that won some shape
# on the H100 (benchmarks/results/h100/*.json, tuned_configs). Timing every candidate (full) compiles
# ~76 kernels for one bf16 GQA shape and keeps a first call busy for minutes on an H200.
QUICK = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    "fwd_tma": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)],
    "dq": [(128, 64, 8, 3), (64, 32, 4, 2), (128, 128, 8, 2)],
    "dkdv": [(64, 128, 8, 2), (32, 64, 4, 4), (64, 64, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)],
}
# First (the untuned choice, and the one a close tuning race keeps) for blocks of 64 at head dims up to 64
# (MoBA and NSA in the LM, the Routing Transformer's cluster slots): the fastest of each kernel's candidates
# forced one at a time in NSA's 8k layer step on the H200, where the 8-warp defaults clamp to 64-row tiles
# (step 1.30 ms with the defaults; fwd 1.22, dq 1.20, dk/dv 1.16 each alone: results/h200/forced_configs_nsa.json).
SMALL_BLOCK_FIRST = {"fwd": (64, 64, 4, 3), "dq": (64, 32, 4, 2), "dkdv": (64, 64, 4, 3)}
AUTOTUNE_MODES = ("quick", "full", "0", "1")  # "1" is "quick"
_TUNED: dict = {}


# Tensor-core tiles are at least 16 rows; blocks whose largest power-of-two divisor is smaller are
# covered by partial tiles (a program's own block) or gathered tiles (the walked side).
MIN_TILE = 16


def _own_tile(tile: int, block: int) -> int:
    """Tile over a program's own block: a power of two dividing the block when one of at least
    16 does, else one tile that covers a small block (rows past the block masked)."""
    p = _pow2_divisor(block, 128)
    return min(tile, p) if p >= MIN_TILE else min(tile, max(MIN_TILE, triton.next_power_of_2(block)))


def _walked_tile(tile: int, block: int) -> int:
    """Tile over the walked side: tiles of one block when the block holds whole tiles of at least
    64 rows (or of the candidate size), else the candidate tile, filled with rows gathered from
    several routed blocks (blocks of 16 or 32 would otherwise run 16- or 32-row tiles)."""
    p = _pow2_divisor(block, 128)
    return min(tile, p) if p >= min(tile, 64) else tile


def _fit(candidates, q_block: int, kv_block: int, use_tma: bool, own: str = "q") -> list[dict]:
    """Candidates with tiles fitted to the block sizes (``own``: the side whose blocks the
    program owns, "q" for the forward and dq passes, "kv" for dk/dv); computed once per argument
    set, since this runs on every call's host path. Gathered tiles cannot use tensor descriptors."""
    return list(_fit_cached(tuple(candidates), q_block, kv_block, use_tma, own, _pack_enabled()))


@functools.lru_cache(maxsize=None)
def _fit_cached(candidates: tuple, q_block: int, kv_block: int, use_tma: bool, own: str, pack: bool) -> tuple:
    out: list[dict] = []
    for m, n, w, st in candidates:
        extra = {}
        if own == "q":
            bm, bn = _own_tile(m, q_block), _walked_tile(n, kv_block)
            gather = kv_block % bn != 0
            extra["Q_PACK"] = _pack(q_block, bm) if pack else 1
        else:
            bm, bn = _walked_tile(m, q_block), _own_tile(n, kv_block)
            gather = q_block % bm != 0
            extra["KV_PACK"] = _pack(kv_block, bn) if pack else 1
        if use_tma and gather:
            continue
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=use_tma, **extra)
        if cfg not in out:
            out.append(cfg)
    return tuple(out)


def _pack_enabled() -> bool:
    """``ROUTED_BLOCK_PACK=0`` turns block packing off (see :func:`_pack`)."""
    return env_switch("ROUTED_BLOCK_PACK", True)


def _pack(block: int, tile: int) -> int:
    """Blocks per tile on a program's own side (query blocks in the forward and dq passes, key blocks
    in dk/dv): a tile of whole blocks smaller than the 16-row minimum (BiFormer's regions of 4 tokens:
    four per tile, each walked row masked to the rows of its own block) instead of one block padded
    to the tile: a quarter of the programs, each loading its tile once."""
    return tile // block if block < MIN_TILE and tile % block == 0 else 1


def dkdv_splits(programs: int, mean_row_bound: int, sms: int) -> int:
    """How many programs share each transposed row in the dk/dv pass: 1 (no partial sums) once the key
    tiles alone fill the GPU or rows are short; else enough to put ~8 programs on every SM, each walking
    at least 8 query blocks. ``mean_row_bound``: an upper bound of the mean transposed row length."""
    if programs >= sms or mean_row_bound < 16:
        return 1
    return max(1, min(triton.cdiv(8 * sms, programs), mean_row_bound // 8, 64))


def dkdv_work_split(programs: int, n_q_blocks: int, mean_row_bound: int, sms: int,
                    deterministic: bool) -> tuple[int, int, int]:
    """How the dk/dv pass shares transposed rows between programs: ``(SHARES, n_splits, chunk)`` for
    ``_block_sparse_bwd_dkdv_kernel``. A row may be as long as ``n_q_blocks`` whatever the mean (a sink
    block; a key block content routing makes popular: MoBA's longest rows at 32k hold ~10x the mean), so
    rows are cut into shares of ``chunk`` query blocks, about twice the mean work per SM: one program
    per key tile takes its first share and a list built on the device (no host sync) hands the further
    shares to one program each; shared tiles add by float32 atomics (``SHARES=2``). An unlisted grid of
    idle share programs cost a sliding-window layer 0.7 ms at 32k on the H200 (NOTES.md); the list costs
    at most ~2 programs per SM. Under ``torch.use_deterministic_algorithms`` (no atomics), or when no row
    can exceed one share: :func:`dkdv_splits`' equal shares with partial sums (``SHARES=1``) or none."""
    splits = dkdv_splits(programs, mean_row_bound, sms)
    plain = (1, splits, 0) if splits > 1 else (0, 1, 0)
    chunk = max(16, triton.cdiv(programs * mean_row_bound, 2 * sms))
    if deterministic or n_q_blocks <= chunk:
        return plain
    return 2, 1, chunk


def _own_grid(length: int, block: int, tile: int, pack: int = 1) -> int:
    """Programs along a program's own side: tiles of the whole sequence when they align with the
    blocks, ``pack`` whole blocks per tile (:func:`_pack`), else ``ceil(block / tile)`` tiles per block."""
    if pack > 1:
        return triton.cdiv(triton.cdiv(length, block), pack)
    if block % tile == 0:
        return triton.cdiv(length, tile)
    return triton.cdiv(length, block) * triton.cdiv(block, tile)


def autotune_mode() -> str:
    """``ROUTED_AUTOTUNE``: "quick" (default) times the :data:`QUICK` configs, "full" every
    candidate (and both backward variants), "0" none (the first config runs)."""
    mode = os.environ.get("ROUTED_AUTOTUNE", "quick")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"ROUTED_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {mode!r}.")
    return "quick" if mode == "1" else mode


def _tuning(device: torch.device) -> bool:
    """Whether launch configs are timed here (CUDA, unless ROUTED_AUTOTUNE=0)."""
    return device.type == "cuda" and autotune_mode() != "0"


def _candidates(full: list, quick_name: str, own_block: int = 0, head_dim: int = 0) -> list:
    """The candidate list of a kernel for the current autotune mode; for blocks of 64 (their largest
    power-of-two divisor: the tile a program's own block allows) at head dims up to 64, the kernel's
    :data:`SMALL_BLOCK_FIRST` config moves to the front when the list holds it."""
    cands = full if autotune_mode() == "full" else QUICK[quick_name]
    first = SMALL_BLOCK_FIRST.get(quick_name)
    if first in cands and cands[0] != first and _pow2_divisor(own_block, 128) == 64 and head_dim <= 64:
        cands = [first] + [c for c in cands if c != first]
    return cands


def _disk_cache_path(device: torch.device):
    """Where tuning decisions persist between processes (``ROUTED_AUTOTUNE_CACHE=0``: nowhere): one
    file per GPU model and Triton/torch version, in routed's cache directory."""
    if os.environ.get("ROUTED_AUTOTUNE_CACHE", "1") == "0":
        return None
    from ...data.text import cache_dir

    gpu = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device))
    return cache_dir() / f"autotune-{gpu}-triton{triton.__version__}-torch{torch.__version__.split('+')[0]}.json"


_DISK: dict = {}  # path -> {key string: label as JSON}


def _disk_lookup(path, key: str):
    if path is None:
        return None
    if path not in _DISK:
        try:
            _DISK[path] = json.loads(path.read_text())
        except (OSError, ValueError):
            _DISK[path] = {}
    return _DISK[path].get(key)


def _disk_store(path, key: str, label) -> None:
    if path is None:
        return
    table = _DISK.setdefault(path, {})
    table[key] = label
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:  # written whole and renamed, so a reader never sees half a file
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("routed: could not save autotuning results to %s: %s", path, e)


def _as_json(label):
    return [list(item) for item in label] if isinstance(label, tuple) else label


def _autotuned(name: str, key: tuple, candidates: list[dict], launch, device: torch.device) -> dict:
    """The fastest candidate for ``key``, timed once per process on the first call (launches
    rewrite their outputs completely, so timing them is harmless)."""
    if not _tuning(device) or len(candidates) == 1:
        return candidates[0]
    runners = {tuple(cfg.items()): functools.partial(launch, cfg) for cfg in candidates}
    return dict(_fastest(name, key, runners, device))


def _tune_key(q: Tensor, v: Tensor, q_block: int, kv_block: int, causal: bool, all_masked: bool,
              group: int) -> tuple:
    """Autotuning key: everything that changes the kernel's shape of work, with the length bucketed."""
    return (q.shape[-1], v.shape[-1], str(q.dtype), q_block, kv_block, causal, all_masked, group,
            max(1, q.shape[2]).bit_length(), _pack_enabled())


# How the backward gets dQ: "split" runs a dq kernel beside the dk/dv kernel (deterministic; 7 matrix
# products per routed tile pair), "atomic" adds dQ from the dk/dv kernel into a float32 buffer by
# atomics (5 products, run-to-run differences in the last bits). ROUTED_BWD picks one; "auto" (the
# default) times both on the first call of each shape under ROUTED_AUTOTUNE=full, else runs "split"
# (results/h200/block_sparse_8k_32k.json: atomic 5-20% slower wherever the GPU, not the host, bounds).
BWD_MODES = ("auto", "split", "atomic")


def _requested_bwd_mode() -> str:
    mode = os.environ.get("ROUTED_BWD", "auto")
    if mode not in BWD_MODES:
        raise ValueError(f"ROUTED_BWD must be one of {BWD_MODES}, got {mode!r}.")
    if torch.are_deterministic_algorithms_enabled():
        if mode == "atomic":
            raise RuntimeError("ROUTED_BWD=atomic adds dQ with atomics, which torch.use_deterministic_algorithms(True) "
                               "forbids; unset ROUTED_BWD (or set it to 'split') or turn deterministic mode off.")
        return "split"
    return mode


def _fastest(name: str, key: tuple, runners: dict, device: torch.device):
    """The label of the fastest of ``runners`` (label -> a callable that runs one whole variant or
    launch config), timed once per ``key``; each runs once first, so a variant's own config tuning
    stays out of its timing. A runner that fails (a config that cannot compile here) is skipped."""
    full_key = (name, *key)
    if full_key not in _TUNED:
        path, disk_key = _disk_cache_path(device), repr(full_key)
        stored = _disk_lookup(path, disk_key)
        for label in runners:  # a stored choice counts only while it is still a candidate
            if stored is not None and _as_json(label) == stored:
                _TUNED[full_key] = label
                return label
        from triton.testing import do_bench

        times, errors = {}, {}
        for mode, run in runners.items():
            try:
                run()
                times[mode] = do_bench(run, warmup=5, rep=25, return_mode="median")
            except Exception as e:  # noqa: BLE001 - e.g. a config whose shared memory does not fit
                errors[mode] = e
                logger.debug("routed: %s variant %s rejected: %s", name, mode, e)
        if not times:
            raise RuntimeError(f"no variant of {name} could run for {key}: {errors}")
        _TUNED[full_key] = min(times, key=times.get)
        _disk_store(path, disk_key, _as_json(_TUNED[full_key]))
        logger.info("routed: tuned %s %s -> %s (%s)", name, key, _TUNED[full_key],
                    ", ".join(f"{m} {t:.3f} ms" for m, t in times.items()))
    return _TUNED[full_key]


def tuned_configs() -> dict[str, dict]:
    """The launch configs autotuning chose so far (for benchmark records)."""
    return {" ".join(map(str, k)): dict(v) if isinstance(v, tuple) else v for k, v in _TUNED.items()}


@functools.lru_cache(maxsize=None)
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _tma_capable(index: int) -> Optional[str]:
    """None if CUDA device ``index`` and this Triton can use tensor descriptors, else why not (asked
    once per device: the checks cost ~40 us of host time per call, nine calls per NSA layer step)."""
    if torch.cuda.get_device_capability(index)[0] < 9:
        return "needs a Hopper or newer GPU"
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return "this triton has no tensor descriptors"
    return None


class _TokenMaps:
    """Per-token data of a route, as ``[batch, len]`` views for the kernels: positions (both, or
    neither for the default order) and segment ids (both or neither). Absent maps pass a dummy
    pointer and stride 0; ``HAS_POS``/``HAS_SEG`` keep the kernels from reading them."""

    def __init__(self, q_positions, kv_positions, q_segments, kv_segments, batch, q_len, kv_len, device, dummy):
        self.has_pos = q_positions is not None or kv_positions is not None
        self.has_seg = q_segments is not None
        if self.has_pos:
            if q_positions is None:
                q_positions = torch.arange(q_len, device=device) + (kv_len - q_len)
            if kv_positions is None:
                kv_positions = torch.arange(kv_len, device=device)
        maps = []
        for t, n in ((q_positions, q_len), (kv_positions, kv_len), (q_segments, q_len), (kv_segments, kv_len)):
            maps.append(dummy if t is None else t.reshape(-1, n).expand(batch, n))
        self.tensors = maps
        self.strides = [0 if t is dummy else t.stride(0) for t in maps]
        self.flags = dict(HAS_POS=self.has_pos, HAS_SEG=self.has_seg)


def clean_block_counts(ids: Tensor, counts: Tensor, q_len: int, kv_len: int, q_block_size: int,
                       kv_block_size: int, causal: bool, all_masked: bool) -> Tensor:
    """``[Br, Hr, nqb]`` int32: how many of each row's routed key blocks need no mask (every key
    in range and, when causal, before every query of the block). Ids are sorted, so these lead.
    ``all_masked`` (explicit positions or segments): no block is known to be clean."""
    if all_masked:
        return torch.zeros_like(counts)
    if not causal and kv_len % kv_block_size == 0:  # every block whole and visible
        return counts
    if triton_runs_on(ids.device) and counts.numel():  # one launch, not ~15 small ops
        return _clean_block_counts_triton(ids, counts, q_len, kv_len, q_block_size, kv_block_size, causal)
    return _clean_block_counts_torch(ids, counts, q_len, kv_len, q_block_size, kv_block_size, causal)


def _clean_block_counts_torch(ids: Tensor, counts: Tensor, q_len: int, kv_len: int, q_block_size: int,
                              kv_block_size: int, causal: bool) -> Tensor:
    live = torch.arange(ids.shape[-1], device=ids.device) < counts[..., None]
    k_end = (ids.long() + 1) * kv_block_size
    clean = live & (k_end <= kv_len)
    if causal:
        q_first = torch.arange(ids.shape[2], device=ids.device) * q_block_size + (kv_len - q_len)
        clean = clean & (k_end - 1 <= q_first[:, None])
    return clean.sum(-1, dtype=torch.int32)


def _clean_block_counts_triton(ids: Tensor, counts: Tensor, q_len: int, kv_len: int, q_block_size: int,
                               kv_block_size: int, causal: bool) -> Tensor:
    br, hr, nqb, width = ids.shape
    ids, counts = ids.contiguous(), counts.contiguous()
    clean = new_output(counts.shape, dtype=torch.int32, device=counts.device)
    block_k = _slots_pow2(width)
    block_r = _tile_rows(block_k, 64)
    _clean_counts_kernel[(triton.cdiv(counts.numel(), block_r),)](
        ids, counts, clean, counts.numel(), nqb, width, q_block_size, kv_block_size, kv_len, kv_len - q_len,
        CAUSAL=causal, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return clean


def _slots_pow2(width: int) -> int:
    """A route row's id slots rounded up to a power of two (at least 2): one tile's columns."""
    return max(2, triton.next_power_of_2(max(width, 1)))


def _tile_rows(block_k: int, most: int) -> int:
    """Route rows per tile of the route-scanning kernels: up to ``most``, fewer for wide rows, so that a
    tile stays within 4096 ids (a dense 2048-block route would otherwise put 128k ids in registers)."""
    return max(1, min(most, 4096 // block_k))


def masked_query_counts(t_ids: Tensor, t_counts: Tensor, q_len: int, kv_len: int, q_block_size: int,
                        kv_block_size: int, causal: bool, all_masked: bool,
                        t_offsets: Optional[Tensor] = None) -> Tensor:
    """``[Br, Hr, nkb]`` int32: how many of each key block's query blocks (transposed route,
    sorted) need a mask; they lead, since later query blocks see the whole key block. With
    ``t_offsets`` the route is in compact form (:func:`routed.route.transpose_block_ids_compact`)."""
    if all_masked:
        return t_counts
    if not causal and kv_len % kv_block_size == 0:
        return torch.zeros_like(t_counts)
    if t_offsets is not None:
        br, hr, nkb = t_counts.shape
        slots = t_ids.shape[-1]
        ends = (t_offsets + t_counts).reshape(br * hr, nkb).long()
        slot = torch.arange(slots, device=t_ids.device).expand(br * hr, slots).contiguous()
        kb = torch.searchsorted(ends, slot, right=True)  # each slot's key block (nkb past the row's pairs)
        flat = t_ids.reshape(br * hr, slots)
        k_end = (kb + 1) * kv_block_size
        masked = k_end > kv_len
        if causal:
            masked = masked | (k_end - 1 > flat.long() * q_block_size + (kv_len - q_len))
        out = torch.zeros(br * hr, nkb + 1, dtype=torch.int32, device=t_ids.device)
        out.scatter_add_(1, kb, ((flat >= 0) & masked).to(torch.int32))
        return out[:, :nkb].contiguous().view(br, hr, nkb)  # strides as t_counts' (the kernel indexes both alike)
    live = torch.arange(t_ids.shape[-1], device=t_ids.device) < t_counts[..., None]
    k_end = (torch.arange(t_ids.shape[2], device=t_ids.device) + 1) * kv_block_size
    masked = (k_end > kv_len)[:, None].expand(t_ids.shape[2], t_ids.shape[3])
    if causal:
        q_first = t_ids.long() * q_block_size + (kv_len - q_len)
        masked = masked | (k_end[:, None] - 1 > q_first)
    return (live & masked).sum(-1, dtype=torch.int32)


def _route_views(ids: Tensor, counts: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """The route's batch axis broadcast to ``batch`` (a stride-0 view when shared)."""
    return ids.expand(batch, *ids.shape[1:]), counts.expand(batch, *counts.shape[1:])


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())


def block_sparse_decode_fwd(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, counts: Tensor,
                            maps: _TokenMaps, kv_block_size: int, causal: bool, scale: float, out: Tensor,
                            lse: Tensor) -> None:
    """Few queries against a long route: split the route's key tiles over programs, then merge.

    ``ids``/``counts`` are already batch-broadcast views; fills ``out`` and ``lse``.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, Hr = Hq // Hkv, ids.shape[1]
    # Pack the query heads of a GQA group into one tile when they share the route.
    g_pack = G if Hr in (1, Hkv) and G * Nq <= 128 else 1
    n_prog_heads = Hq // g_pack
    block_m = max(16, triton.next_power_of_2(g_pack * Nq))
    width = ids.shape[-1]
    dims = _dims(q, v)
    sub_max = _pow2_divisor(kv_block_size, 128)
    pdl_asked = decode_pdl(q.device)

    def launch(cfg):
        block_n = min(cfg["BLOCK_N"], sub_max)
        programs = B * n_prog_heads
        # Splits cut the route's key tiles (not its blocks), so a short route still fills the GPU.
        tiles = width * (kv_block_size // block_n)
        splits = max(1, min(tiles, triton.cdiv(cfg["programs_per_sm"] * _num_sms(q.device), programs)))
        per_split = max(1, triton.cdiv(tiles, splits))
        splits = max(1, triton.cdiv(tiles, per_split))
        part_out = torch.empty(programs * splits * block_m * dims["BLOCK_DV"], dtype=torch.float32, device=q.device)
        part_lse = torch.empty(programs * splits * block_m, dtype=torch.float32, device=q.device)
        fused = DECODE_FUSED_MERGE
        pdl = not fused and pdl_asked
        block_s = max(2, triton.next_power_of_2(splits))
        arrivals = torch.zeros(programs, dtype=torch.int32, device=q.device) if fused else part_lse  # (unread)
        k_desc, v_desc = _row_descriptors(k, v, block_n) if cfg["USE_TMA"] else (None, None)
        _block_sparse_decode_split_kernel[(splits, programs)](
            q, k, v, part_out, part_lse, ids[:, :, 0], counts[:, :, 0], *maps.tensors, out, lse, arrivals,
            k_desc, v_desc,
            *q.stride(), *k.stride(), *v.stride(), ids.stride(0), ids.stride(1), ids.stride(3),
            counts.stride(0), counts.stride(1), *maps.strides, *out.stride(), *lse.stride(),
            n_prog_heads, g_pack, G, Hq // Hr, per_split, Nq, Nk, Nk - Nq, scale * LOG2E,
            KV_BLOCK=kv_block_size, BLOCK_M=block_m, BLOCK_N=block_n,
            CAUSAL=causal, **maps.flags, **dims, FUSED_MERGE=fused, BLOCK_S=block_s if fused else 2,
            USE_TMA=cfg["USE_TMA"], PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if not fused:
            _decode_combine_kernel[(programs, g_pack * Nq)](
                part_out, part_lse, out, lse, *out.stride(), *lse.stride(), n_prog_heads, g_pack, Nq, splits,
                BLOCK_M=block_m, HEAD_DIM_V=Dv, BLOCK_DV=dims["BLOCK_DV"],
                BLOCK_S=block_s, PDL=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))

    candidates, mode = _offer_tma("the decode path", q, (k, v), list(_decode_candidates(sub_max, False)),
                                  list(_decode_candidates(sub_max, True)))
    key = (D, Dv, str(q.dtype), kv_block_size, causal, maps.has_pos or maps.has_seg, g_pack, block_m,
           (B * n_prog_heads).bit_length(), max(1, width).bit_length())
    launch(_autotuned("decode", key + mode + (("pdl", pdl_asked),), candidates, launch, q.device))


# True: the decode path's split programs merge their partials themselves (the last to arrive at an
# atomic counter, zeroed per call, merges its rows: one launch). False (the default): a second launch
# merges them. Measured on the H200 (NOTES.md "Fourth H200 session"), graph-replayed, the first fused
# merge was slower (25.8 / 22.8 / 26.0 us against 22.2 / 14.8 / 17.1 us at hkv 16 / 4 / 8): its last
# program loaded the splits one after another. It now loads each row's splits as one tile, as the
# combine kernel does (the same helper), row after row, and was still slower (fifth session: 27.2 /
# 18.5 / 22.4 against 25.5 / 14.0 / 17.1 us), so the tail was not the cost. Eager, one launch fewer
# is ~50 us of host time per decode step; kept as an option for that.
DECODE_FUSED_MERGE = False


def decode_pdl(device: torch.device) -> bool:
    """Whether the decode combine launch is a programmatic dependent of the split launch (Hopper's
    PDL: scheduled while the split programs run, it waits on their writes inside instead of starting
    after they drain). Off unless ``ROUTED_DECODE_PDL=1``: on the H200 (NOTES.md, tenth session) it
    did not pay, graph-replayed 27.4 / 13.8 / 19.0 us against 22.3 / 14.4 / 20.5 us without (hkv 16 /
    4 / 8). Needs sm90+ and a Triton with grid dependency control."""
    if not env_switch("ROUTED_DECODE_PDL", False) or device.type != "cuda":
        return False
    if gdc_wait is None or not _pdl_capable(device.index if device.index is not None else torch.cuda.current_device()):
        raise RuntimeError("ROUTED_DECODE_PDL=1 needs an sm90+ GPU and a Triton with grid dependency control "
                           "(triton.language.extra.cuda.gdc_wait); unset it.")
    return True


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9 and "launch_pdl" in CUDAOptions.__dataclass_fields__

# Decode launch configs (split programs per SM, BLOCK_N, num_warps, num_stages); the first is the
# default where no tuning happens. More, shorter splits keep more K/V loads in flight; the flat tile
# loop lets deeper stages prefetch across routed blocks. Each is offered with plain loads and, where
# the tensors allow, with tensor-descriptor (TMA) loads (:func:`_offer_tma`).
DECODE_CANDIDATES = [(2, 128, 4, 3), (4, 128, 4, 3), (8, 64, 4, 3), (4, 64, 4, 2), (8, 128, 4, 2), (16, 64, 2, 3),
                     (16, 32, 4, 3), (8, 64, 8, 3), (16, 64, 4, 4), (32, 32, 4, 4), (8, 128, 8, 3), (32, 64, 2, 2)]


@functools.lru_cache(maxsize=None)
def _decode_candidates(sub_max: int, use_tma: bool) -> tuple:
    out: list[dict] = []
    for pps, n, w, st in DECODE_CANDIDATES:
        cfg = dict(programs_per_sm=pps, BLOCK_N=min(n, sub_max), num_warps=w, num_stages=st, USE_TMA=use_tma)
        if cfg not in out:
            out.append(cfg)
    return tuple(out)


def _tma_why_not(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """None if the forward can read K/V through tensor descriptors here."""
    if os.environ.get("ROUTED_TMA", "1") == "0":
        return "disabled by ROUTED_TMA=0"
    if q.device.type != "cuda":
        return "needs a Hopper or newer GPU"
    reason = _tma_capable(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if reason is not None:
        return reason
    for t in (k, v):
        if t.shape[-1] not in (16, 32, 64, 128, 256) or t.data_ptr() % 16:
            return "head dim not a power of two or base not 16-byte aligned"
        if any(st == 0 or (st * t.element_size()) % 16 for st in t.stride()[:-1]):
            return "strides not 16-byte aligned (or broadcast)"
    return None


def _row_descriptors(a: Tensor, b: Tensor, block_rows: int):
    """Tensor descriptors of two ``[B, H, N, D]`` tensors, tiles of ``block_rows`` rows."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return (TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1, block_rows, a.shape[-1]]),
            TensorDescriptor(b, list(b.shape), list(b.stride()), [1, 1, block_rows, b.shape[-1]]))


def _with_tma(name: str, q: Tensor, tensors: tuple, plain_candidates, tma_candidates, q_block: int,
              kv_block: int, own: str = "q") -> tuple[list[dict], tuple]:
    """Candidates for one kernel: the plain ones plus (or, with ROUTED_TMA=only, just) the TMA ones,
    and the tuning-key suffix. The suffix holds whether descriptors can be used for these tensors,
    so a config tuned with TMA is never reused for a call whose tensors cannot take it."""
    return _offer_tma(name, q, tensors, _fit(plain_candidates, q_block, kv_block, False, own),
                      _fit(tma_candidates, q_block, kv_block, True, own),
                      "the walked blocks are smaller than a tile (rows are gathered)")


def _offer_tma(name: str, q: Tensor, tensors: tuple, plain: list[dict], tma: list[dict],
               no_tma_fits: str = "no tensor-descriptor config fits") -> tuple[list[dict], tuple]:
    """``plain + tma`` (ROUTED_TMA=only: ``tma`` alone, or an error saying why it cannot run; the TMA
    ones are dropped where ``tensors`` cannot take descriptors) and the tuning-key suffix
    ``(ROUTED_TMA, descriptors usable)``."""
    mode = os.environ.get("ROUTED_TMA", "1")
    reason = _tma_why_not(q, *tensors)
    if reason is None and not tma:
        reason = no_tma_fits
    if reason is None:
        return (tma if mode == "only" else plain + tma), (mode, True)
    if mode == "only":
        raise RuntimeError(f"ROUTED_TMA=only but {name} cannot use tensor descriptors: {reason}")
    return plain, (mode, False)


def _with_group_order(candidates: list[dict], group: int, route_heads: int, n_heads_kv: int) -> tuple[list, tuple]:
    """Candidates for a pass over query tiles: each in head-major program order, plus (timed as
    alternatives) group-major order when the query heads of a GQA group share a route, so that they
    read the same K/V tiles side by side (``GROUP_MAJOR``); and the tuning-key suffix."""
    head_major = [dict(c, GROUP_MAJOR=False) for c in candidates]
    offered = group > 1 and route_heads in (1, n_heads_kv)
    return (head_major + [dict(c, GROUP_MAJOR=True) for c in candidates] if offered else head_major), (offered,)


def _query_grid(n_q: int, q_block_size: int, cfg: dict, batch: int, n_heads_q: int, group: int) -> tuple:
    """Grid of a pass over query tiles in ``cfg``'s program order (see :func:`_with_group_order`)."""
    tiles = _own_grid(n_q, q_block_size, cfg["BLOCK_M"], cfg.get("Q_PACK", 1))
    return (tiles * group, batch * n_heads_q // group) if cfg["GROUP_MAJOR"] else (tiles, batch * n_heads_q)


def _last_dim_contiguous(*ts: Tensor) -> list[Tensor]:
    """The kernels index the last axis with stride 1."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _takes_decode_path(q_len: int, q_block_size: int, kv_block_size: int) -> bool:
    """Few queries, all in query block 0, against key blocks that hold whole 16-row tiles."""
    return q_len <= min(DECODE_MAX_QUERIES, q_block_size) and kv_block_size % MIN_TILE == 0


def block_sparse_fwd(q: Tensor, k: Tensor, v: Tensor, ids: Tensor, counts: Tensor,
                     q_positions: Optional[Tensor], kv_positions: Optional[Tensor],
                     q_segments: Optional[Tensor], kv_segments: Optional[Tensor],
                     q_block_size: int, kv_block_size: int, causal: bool, scale: float,
                     clean_counts: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel. Shapes as in :func:`routed.routed_attention`; returns (out, lse).
    ``clean_counts`` (:func:`clean_block_counts`) is computed here when not given."""
    q, k, v = _last_dim_contiguous(q, k, v)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    out = output_like(q, Dv, q.dtype)
    lse = new_output((B, Hq, Nq), dtype=torch.float32, device=q.device)
    decode = _takes_decode_path(Nq, q_block_size, kv_block_size)
    maps = _TokenMaps(q_positions, kv_positions, q_segments, kv_segments, B, Nq, Nk, q.device, counts)
    if clean_counts is None and not decode:
        clean_counts = clean_block_counts(ids, counts, Nq, Nk, q_block_size, kv_block_size, causal,
                                          maps.has_pos or maps.has_seg)
    ids, counts = _route_views(ids, counts, B)
    if decode:
        block_sparse_decode_fwd(q, k, v, ids, counts, maps, kv_block_size, causal, scale, out, lse)
        return out, lse
    clean_counts = clean_counts.expand(counts.shape)
    dims = _dims(q, v)

    def launch(cfg):
        k_desc, v_desc = _row_descriptors(k, v, cfg["BLOCK_N"]) if cfg["USE_TMA"] else (None, None)
        _block_sparse_fwd_kernel[_query_grid(Nq, q_block_size, cfg, B, Hq, Hq // Hkv)](
            q, k, v, out, lse, ids, counts, clean_counts, *maps.tensors, k_desc, v_desc,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2], *ids.stride(),
            *counts.stride()[:2], *maps.strides,
            Hq, Hq // Hkv, Hq // ids.shape[1], Nq, Nk, Nk - Nq, scale * LOG2E, ids.shape[-1], -(-Nq // q_block_size),
            Q_BLOCK=q_block_size, KV_BLOCK=kv_block_size, CAUSAL=causal, **maps.flags, **dims, **cfg,
            Q_TILE_ALIGNED=q_block_size % cfg["BLOCK_M"] == 0, GATHER_KV=kv_block_size % cfg["BLOCK_N"] != 0)

    key = _tune_key(q, v, q_block_size, kv_block_size, causal, maps.has_pos or maps.has_seg, Hq // Hkv)
    candidates, mode = _with_tma("the forward", q, (k, v),
                                 _candidates(FWD_CANDIDATES, "fwd", q_block_size, q.shape[-1]),
                                 _candidates(FWD_TMA_CANDIDATES, "fwd_tma"), q_block_size,
                                 kv_block_size)
    candidates, order = _with_group_order(candidates, Hq // Hkv, ids.shape[1], Hkv)
    launch(_autotuned("fwd", key + mode + order, candidates, launch, q.device))
    return out, lse


def block_sparse_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     dlse: Optional[Tensor], ids: Tensor, counts: Tensor, t_ids: Optional[Tensor],
                     t_counts: Optional[Tensor],
                     q_positions: Optional[Tensor], kv_positions: Optional[Tensor],
                     q_segments: Optional[Tensor], kv_segments: Optional[Tensor],
                     q_block_size: int, kv_block_size: int, causal: bool,
                     scale: float, clean_counts: Optional[Tensor] = None,
                     t_masked_counts: Optional[Tensor] = None,
                     t_offsets: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels; returns (dq, dk, dv). ``dlse`` is the gradient reaching lse;
    ``t_ids``/``t_counts`` the transposed route (:meth:`routed.BlockRoute.transposed`; with
    ``t_offsets``, the compact form of :func:`routed.route.transpose_block_ids_compact`). What is not
    given of the route's derived data is computed here. dQ comes from a dq kernel or from atomics
    in the dk/dv kernel (``ROUTED_BWD``, see :data:`BWD_MODES`); long transposed rows are shared
    between dk/dv programs (:func:`dkdv_work_split`)."""
    do, q, k, v = _last_dim_contiguous(do, q, k, v)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dims = _dims(q, v)
    lse = lse.contiguous()
    delta = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    pre_m = 64
    _bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m), B * Hq)](
        out, do, delta, *out.stride(), *do.stride(), Hq, Nq,
        HEAD_DIM_V=Dv, BLOCK_M=pre_m, BLOCK_DV=dims["BLOCK_DV"])
    if dlse is not None:
        # d lse / d s = P, so lse's gradient folds into delta: dS = P * (dP - (delta - dlse)).
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    maps = _TokenMaps(q_positions, kv_positions, q_segments, kv_segments, B, Nq, Nk, q.device, counts)
    all_masked = maps.has_pos or maps.has_seg
    if t_ids is None:
        t_ids, t_counts, t_offsets, t_masked = _transposed(
            ids, -(-Nk // kv_block_size), (Nq, Nk, q_block_size, kv_block_size, causal, all_masked))
        t_masked_counts = t_masked if t_masked_counts is None else t_masked_counts
    if clean_counts is None:
        clean_counts = clean_block_counts(ids, counts, Nq, Nk, q_block_size, kv_block_size, causal, all_masked)
    if t_masked_counts is None:
        t_masked_counts = masked_query_counts(t_ids, t_counts, Nq, Nk, q_block_size, kv_block_size, causal,
                                              all_masked, t_offsets)
    ids, counts = _route_views(ids, counts, B)
    clean_counts = clean_counts.expand(counts.shape)
    compact = t_offsets is not None
    t_ids, t_counts = _route_views(t_ids, t_counts, B)
    t_masked_counts = t_masked_counts.expand(t_counts.shape)
    # compact: [B, Hr, pairs] with per-key-block starts; padded: [B, Hr, nkb, width]
    t_offsets = t_offsets.expand(t_counts.shape) if compact else t_counts  # (a placeholder, never read)
    if not t_offsets.stride() == t_masked_counts.stride() == t_counts.stride():
        raise RuntimeError("the transposed route's counts, masked counts and offsets must share strides (the kernel "
                           f"indexes them alike), got {t_counts.stride()}, {t_masked_counts.stride()} and "
                           f"{t_offsets.stride()}.")
    t_strides = (*t_ids.stride()[:2], 0, t_ids.stride(2)) if compact else t_ids.stride()
    dk, dv = output_like(k, D, k.dtype), output_like(v, Dv, v.dtype)
    common = dict(Q_BLOCK=q_block_size, KV_BLOCK=kv_block_size, CAUSAL=causal, **maps.flags, **dims)
    grads = {}  # dQ buffers, allocated by the variant(s) that run

    def launch_dq(cfg):
        dq = grads["dq_split"]
        k_desc, v_desc = _row_descriptors(k, v, cfg["BLOCK_N"]) if cfg["USE_TMA"] else (None, None)
        _block_sparse_bwd_dq_kernel[_query_grid(Nq, q_block_size, cfg, B, Hq, Hq // Hkv)](
            q, k, v, do, lse, delta, dq, ids, counts, clean_counts, *maps.tensors, k_desc, v_desc,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            *ids.stride(), *counts.stride()[:2], *maps.strides,
            Hq, Hq // Hkv, Hq // ids.shape[1], Nq, Nk, Nk - Nq, scale, scale * LOG2E, ids.shape[-1],
            -(-Nq // q_block_size), **common, **cfg,
            Q_TILE_ALIGNED=q_block_size % cfg["BLOCK_M"] == 0, GATHER_KV=kv_block_size % cfg["BLOCK_N"] != 0)

    n_q_blocks, n_kv_blocks = -(-Nq // q_block_size), -(-Nk // kv_block_size)
    mean_row_bound = min(n_q_blocks, -(-n_q_blocks * ids.shape[-1] // n_kv_blocks))
    route_rows_per_kv_head = max(1, ids.shape[1] // Hkv)  # distinct transposed rows per tile and kv head

    def launch_dkdv(cfg, atomic_dq=False):
        q_desc, do_desc = _row_descriptors(q, do, cfg["BLOCK_M"]) if cfg["USE_TMA"] else (None, None)
        dq_f32 = grads["dq_f32"].zero_() if atomic_dq else delta  # delta: a placeholder, never read

        def work(cfg):
            tiles = _own_grid(Nk, kv_block_size, cfg["BLOCK_N"], cfg["KV_PACK"])
            return (tiles, *dkdv_work_split(tiles * B * Hkv, n_q_blocks, mean_row_bound, _num_sms(q.device),
                                            torch.are_deterministic_algorithms_enabled()))

        tiles, shares, splits, chunk = work(cfg)
        if shares and cfg["KV_PACK"] > 1:  # packed tiles walk whole rows: shared rows take one block per tile
            cfg = dict(cfg, KV_PACK=1)
            tiles, shares, splits, chunk = work(cfg)
        n_main = tiles * B * Hkv
        dk_out, dv_out, dk_acc, dv_acc, offsets = dk, dv, delta, delta, t_counts  # placeholders, never read
        grid = (tiles, B * Hkv, splits)
        aligned = kv_block_size % cfg["BLOCK_N"] == 0
        if shares == 1:  # float32 partial sums, one per share of the transposed rows
            dk_out = new_output((splits, *k.shape), dtype=torch.float32, device=k.device)  # every share is stored
            dv_out = new_output((splits, *v.shape), dtype=torch.float32, device=v.device)
        elif shares == 2:  # the list of further shares; float32 sums of the tiles whose rows are shared
            # further shares <= routed entries / chunk (no host sync): every tile's, at most
            sub_tiles = -(-tiles // n_kv_blocks)
            further = -(-B * Hkv * route_rows_per_kv_head * n_q_blocks * ids.shape[-1] * sub_tiles // chunk)
            grid = (n_main + further,)
            offsets = torch.empty(2 * (n_main + 1), dtype=torch.int32, device=q.device)  # offsets, then slots
            _share_offsets_kernel[(1,)](t_counts, offsets, *t_counts.stride()[:2], Hkv, Hq // Hkv,
                                        Hq // ids.shape[1], tiles, n_main, chunk, KV_BLOCK=kv_block_size,
                                        BLOCK_N=cfg["BLOCK_N"], KV_TILE_ALIGNED=aligned, BLOCK_R=1024)
            # A shared tile has a further share, so at most min(tiles, further shares) tiles need sums.
            rows = max(1, min(n_main, further)) * cfg["BLOCK_N"]
            acc = torch.zeros(rows * (D + Dv), dtype=torch.float32, device=k.device)  # one fill for both
            dk_acc, dv_acc = acc[:rows * D], acc[rows * D:]
        _block_sparse_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk_out, dv_out, dq_f32, dk_acc, dv_acc, offsets, t_ids, t_counts,
            t_masked_counts, t_offsets, *maps.tensors, q_desc, do_desc, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *do.stride()[:3], *dk_out.stride()[-4:-1], *dv_out.stride()[-4:-1], *t_strides,
            *t_counts.stride()[:2], *maps.strides, Hq, Hkv, Hq // Hkv, Hq // ids.shape[1], Nq, Nk, Nk - Nq, scale,
            scale * LOG2E, dk_out.stride(0) if shares == 1 else 0, dv_out.stride(0) if shares == 1 else 0, splits,
            chunk, tiles, n_main, n_main.bit_length(), **common, **cfg, KV_TILE_ALIGNED=aligned,
            GATHER_Q=q_block_size % cfg["BLOCK_M"] != 0, ATOMIC_DQ=atomic_dq, T_COMPACT=compact, SHARES=shares)
        if shares == 1:
            torch.sum(dk_out, 0, out=dk)
            torch.sum(dv_out, 0, out=dv)
        elif shares == 2:
            _dkdv_shares_combine_kernel[(tiles, B * Hkv)](
                dk, dv, dk_acc, dv_acc, offsets, *dk.stride()[:3], *dv.stride()[:3], Hkv, tiles, Nk,
                KV_BLOCK=kv_block_size, BLOCK_N=cfg["BLOCK_N"],
                HEAD_DIM=common["HEAD_DIM"], BLOCK_D=common["BLOCK_D"], HEAD_DIM_V=common["HEAD_DIM_V"],
                BLOCK_DV=common["BLOCK_DV"], KV_TILE_ALIGNED=aligned)

    key = _tune_key(q, v, q_block_size, kv_block_size, causal, all_masked, Hq // Hkv)
    dq_cands, dq_tma = _with_tma("the dq pass", q, (k, v),
                                 _candidates(DQ_CANDIDATES, "dq", q_block_size, q.shape[-1]),
                                 _candidates(DQ_CANDIDATES, "dq"), q_block_size,
                                 kv_block_size)
    dq_cands, dq_order = _with_group_order(dq_cands, Hq // Hkv, ids.shape[1], Hkv)
    dq_tma = dq_tma + dq_order
    dkdv_cands, dkdv_tma = _with_tma("the dk/dv pass", q, (q, do),
                                     _candidates(DKDV_CANDIDATES, "dkdv", kv_block_size, q.shape[-1]),
                                     _candidates(DKDV_CANDIDATES, "dkdv"), q_block_size,
                                     kv_block_size, own="kv")

    def run_split():
        if "dq_split" not in grads:
            grads["dq_split"] = output_like(q, D, q.dtype)
        launch_dq(_autotuned("bwd_dq", key + dq_tma, dq_cands, launch_dq, q.device))
        launch_dkdv(_autotuned("bwd_dkdv", key + dkdv_tma, dkdv_cands, launch_dkdv, q.device))

    def run_atomic():  # the atomic kernel holds more registers: its configs are tuned apart
        if "dq_f32" not in grads:
            grads["dq_f32"] = torch.empty(B, Hq, Nq, D, dtype=torch.float32, device=q.device)
        launch = functools.partial(launch_dkdv, atomic_dq=True)
        launch(_autotuned("bwd_dkdv_atomic_dq", key + dkdv_tma, dkdv_cands, launch, q.device))
        grads["dq_atomic"] = output_like(q, D, q.dtype).copy_(grads["dq_f32"])  # part of the variant's time

    mode = _requested_bwd_mode()
    if mode == "auto":  # both timed only under ROUTED_AUTOTUNE=full: atomic lost 6 of 8 shapes on the H200
        mode = (_fastest("bwd_mode", key + dq_tma + dkdv_tma, {"split": run_split, "atomic": run_atomic}, q.device)
                if _tuning(q.device) and autotune_mode() == "full" else "split")
    (run_split if mode == "split" else run_atomic)()
    return grads[f"dq_{mode}"], dk, dv


# ------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("routed::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(q: Tensor, k: Tensor, v: Tensor, kv_block_ids: Tensor, kv_block_counts: Tensor,
                          q_block_ids: Optional[Tensor], q_block_counts: Optional[Tensor],
                          q_positions: Optional[Tensor], kv_positions: Optional[Tensor],
                          q_segments: Optional[Tensor], kv_segments: Optional[Tensor], q_block_size: int,
                          kv_block_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Forward; ``q_block_ids``/``q_block_counts`` (the transposed route) are only kept for backward."""
    return block_sparse_fwd(q, k, v, kv_block_ids, kv_block_counts, q_positions, kv_positions, q_segments,
                            kv_segments, q_block_size, kv_block_size, causal, scale)


@block_sparse_attn_fwd.register_fake
def _(q, k, v, kv_block_ids, kv_block_counts, q_block_ids, q_block_counts, q_positions, kv_positions, q_segments,
      kv_segments, q_block_size, kv_block_size, causal, scale):
    B, Hq, Nq, _ = q.shape
    return output_like(q, v.shape[-1], q.dtype, fake=True), q.new_empty(B, Hq, Nq, dtype=torch.float32)


@torch.library.custom_op("routed::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dlse: Optional[Tensor], kv_block_ids: Tensor, kv_block_counts: Tensor,
                          q_block_ids: Optional[Tensor], q_block_counts: Optional[Tensor],
                          q_positions: Optional[Tensor], kv_positions: Optional[Tensor],
                          q_segments: Optional[Tensor], kv_segments: Optional[Tensor], q_block_size: int,
                          kv_block_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return block_sparse_bwd(do, q, k, v, out, lse, dlse, kv_block_ids, kv_block_counts, q_block_ids,
                            q_block_counts, q_positions, kv_positions, q_segments, kv_segments, q_block_size,
                            kv_block_size, causal, scale)


@block_sparse_attn_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, kv_block_ids, kv_block_counts, q_block_ids, q_block_counts, q_positions,
      kv_positions, q_segments, kv_segments, q_block_size, kv_block_size, causal, scale):
    # in each input's token/head order, as the kernels write them (empty_like would copy any strides)
    return tuple(output_like(t, t.shape[-1], t.dtype, fake=True) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, ids, counts, t_ids, t_counts, qp, kp, qs, ks, q_block_size, kv_block_size, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, ids, counts, t_ids, t_counts, qp, kp, qs, ks)
    ctx.meta = (q_block_size, kv_block_size, causal, scale)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, ids, counts, t_ids, t_counts, qp, kp, qs, ks = ctx.saved_tensors
    dq, dk, dv = block_sparse_attn_bwd(dout, q, k, v, out, lse, dlse, ids, counts, t_ids, t_counts, qp, kp, qs, ks,
                                       *ctx.meta)
    return (dq, dk, dv) + (None,) * 12


torch.library.register_autograd("routed::block_sparse_attn_fwd", _backward, setup_context=_setup_context)


class _BlockSparseAttention(torch.autograd.Function):
    """The eager path: the same host launchers as the custom op, without its dispatch cost
    (the custom op's Python dispatch and autograd wrapping cost ~0.25 ms per call on an H100 host,
    more than the kernel itself at 8k tokens)."""

    @staticmethod
    def forward(ctx, q, k, v, ids, counts, qp, kp, qs, ks, q_block_size, kv_block_size, causal, scale, plan):
        out, lse = block_sparse_fwd(q, k, v, ids, counts, qp, kp, qs, ks, q_block_size, kv_block_size, causal, scale,
                                    plan["clean"])
        ctx.save_for_backward(q, k, v, out, lse, ids, counts, qp, kp, qs, ks)
        ctx.meta = (q_block_size, kv_block_size, causal, scale)
        ctx.plan = plan
        # An unused lse then reaches backward as None, not as zeros that cost four launches to fold in.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, ids, counts, qp, kp, qs, ks = ctx.saved_tensors
        plan = ctx.plan
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = block_sparse_bwd(dout, q, k, v, out, lse, dlse, ids, counts, plan["t_ids"], plan["t_counts"],
                                      qp, kp, qs, ks, *ctx.meta, plan["clean"], plan["t_masked"], plan["t_offsets"])
        return (dq, dk, dv) + (None,) * 11


# Routes up to this many (route row x key block x query block x width) checks are transposed by one
# Triton launch instead of a sort: BiFormer's per-call region routes, not 128k-token LLM routes.
TRANSPOSE_KERNEL_MAX_CHECKS = 1 << 26


def transpose_block_ids_triton(ids: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor]:
    """:func:`routed.route.transpose_block_ids` (same outputs, full width ``nqb``) in one launch."""
    return _transpose_in_one_launch(ids, num_kv_blocks)[:2]


def _transpose_in_one_launch(ids: Tensor, num_kv_blocks: int, q_len: int = 1, kv_len: int = 1,
                             q_block_size: int = 1, kv_block_size: int = 1, causal: bool = False,
                             all_masked: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(t_ids, t_counts, t_masked)``: the padded transposed route and, from the same launch,
    :func:`masked_query_counts` for the given geometry."""
    br, hr, nqb, width = ids.shape
    rows = br * hr
    t_ids = new_output((br, hr, num_kv_blocks, nqb), dtype=torch.int32, device=ids.device)
    t_counts = new_output((br, hr, num_kv_blocks), dtype=torch.int32, device=ids.device)
    t_masked = new_output((br, hr, num_kv_blocks), dtype=torch.int32, device=ids.device)
    if rows and num_kv_blocks and nqb:
        _transpose_route_kernel[(num_kv_blocks, rows)](
            ids.contiguous(), t_ids, t_counts, t_masked, nqb, num_kv_blocks, width, q_block_size, kv_block_size,
            kv_len, kv_len - q_len, CAUSAL=causal, ALL_MASKED=all_masked,
            BLOCK_Q=_tile_rows(_slots_pow2(width), min(128, max(16, triton.next_power_of_2(nqb)))),
            BLOCK_K=_slots_pow2(width), num_warps=4)
    return t_ids, t_counts, t_masked


def _transposes_in_one_launch(ids: Tensor, num_kv_blocks: int) -> bool:
    br, hr, nqb, width = ids.shape
    return triton_runs_on(ids.device) and br * hr * num_kv_blocks * nqb * max(width, 1) <= TRANSPOSE_KERNEL_MAX_CHECKS


def _transposed(ids: Tensor, num_kv_blocks: int, geometry: Optional[tuple] = None) -> tuple:
    """The transposed route for the dk/dv pass: ``(t_ids, t_counts, t_offsets, t_masked)``. Small
    routes are padded to every query block in one launch (``t_offsets`` None), which also counts the
    masked query blocks for ``geometry`` ``(q_len, kv_len, q_block_size, kv_block_size, causal,
    all_masked)`` when given (else ``t_masked`` is None); larger ones take the compact form, whose
    memory stays O(routed blocks) where the padded form grows as (seq / block)^2."""
    if _transposes_in_one_launch(ids, num_kv_blocks):
        t_ids, t_counts, t_masked = _transpose_in_one_launch(ids, num_kv_blocks, *(geometry or ()))
        return t_ids, t_counts, None, t_masked if geometry is not None else None
    t_ids, t_offsets, t_counts = transpose_block_ids_compact(ids, num_kv_blocks)
    return t_ids, t_counts, t_offsets, None


def position_mask_splits(route) -> tuple[Tensor, Tensor]:
    """Mask splits of a route with explicit positions and no segments, from the positions themselves:
    ``(clean [Br, Hr, nqb], t_masked [Br, Hr, nkb])`` int32, as :func:`clean_block_counts` and
    :func:`masked_query_counts` give for default positions. A routed pair needs no mask when its key
    block is whole and (causal) its latest key position is at or before the query block's earliest
    query position; ``clean`` is the leading run of such pairs in each row, ``t_masked`` covers, in
    each transposed row (query blocks ascending), every pair up to the last that needs a mask. A route
    shared by batch rows of different positions counts a pair clean when it is clean in every row."""
    ids = route.kv_block_ids
    Br, Hr, nqb, W = ids.shape
    QB, KB, nkb = route.q_block_size, route.kv_block_size, route.num_kv_blocks
    big = 2 ** 62  # past any position; a power of two, exact as the float pad value
    qpos, kpos = route.resolved_q_positions(), route.resolved_kv_positions()  # [Bp, len] int64
    q_first = F.pad(qpos, (0, nqb * QB - route.q_len), value=big).view(-1, nqb, QB).amin(-1)  # [Bp, nqb]
    k_last = F.pad(kpos, (0, nkb * KB - route.kv_len), value=-big).view(-1, nkb, KB).amax(-1)  # [Bp, nkb]
    B = max(Br, q_first.shape[0], k_last.shape[0])
    safe = ids.clamp_min(0).long().expand(B, Hr, nqb, W)
    live = (ids >= 0).expand(B, Hr, nqb, W)
    ok = live & ((safe + 1) * KB <= route.kv_len)
    if route.causal:
        k_last_pair = k_last.expand(B, nkb).view(B, 1, 1, nkb).expand(B, Hr, nqb, nkb).gather(3, safe)
        ok = ok & (k_last_pair <= q_first.expand(B, nqb).view(B, 1, nqb, 1))
    if Br == 1 and B > 1:  # a route shared by batch rows of different positions: clean in every row
        ok, safe, live, B = ok.all(0, keepdim=True), safe[:1], live[:1], 1
    clean = ok.to(torch.int32).cumprod(-1).sum(-1, dtype=torch.int32)
    qb = torch.arange(nqb, device=ids.device).view(1, 1, nqb, 1).expand(B, Hr, nqb, W).reshape(B, Hr, -1)
    flat, live = safe.reshape(B, Hr, -1), live.reshape(B, Hr, -1)
    last = torch.full((B, Hr, nkb + 1), -1, dtype=torch.int64, device=ids.device)
    last.scatter_reduce_(2, torch.where(live & ~ok.reshape(B, Hr, -1), flat, nkb), qb, reduce="amax")
    covered = live & (qb <= last.gather(2, flat))
    t_masked = torch.zeros(B, Hr, nkb + 1, dtype=torch.int32, device=ids.device)
    t_masked.scatter_add_(2, torch.where(covered, flat, nkb), torch.ones_like(flat, dtype=torch.int32))
    return clean.contiguous(), t_masked[..., :nkb].contiguous()


def _int32_with_strides_of(like: Tensor, values: Tensor) -> Tensor:
    """``values`` as int32 in a tensor laid out as ``like`` (shape and strides): kernels that read two
    count tensors with one set of strides need both in one layout."""
    return torch.empty_strided(like.shape, like.stride(), dtype=torch.int32, device=like.device).copy_(values)


# Routes used this often get position-exact mask splits (position_mask_splits, ~20 small ops once):
# cached routes (NSA's compressed branch, every layer and step) gain unmasked tiles, while a route
# built per call (the Routing Transformer's clusters) keeps the all-masked splits and pays nothing.
POSITION_SPLITS_AFTER_USES = 2


def route_plan(route, backward: bool) -> dict:
    """What the kernels derive from a route (mask splits; for backward the transposed route),
    computed once per route and cached on it: routes are shared by layers and steps."""
    cache = route._cache
    all_masked = not route.has_default_positions or route.has_segments
    cache["uses"] = cache.get("uses", 0) + 1
    counts = route.kv_block_counts
    overlapping = any(st == 0 and n > 1 for st, n in zip(counts.stride(), counts.shape))  # an expanded view
    if (all_masked and not route.has_segments and not overlapping and "position_splits" not in cache
            and cache["uses"] >= POSITION_SPLITS_AFTER_USES):
        cache["position_splits"] = True
        clean, cache["t_masked"] = position_mask_splits(route)
        cache["clean"] = _int32_with_strides_of(counts, clean)  # the kernels index both with the counts' strides
    if "clean" not in cache:
        cache["clean"] = clean_block_counts(route.kv_block_ids, route.kv_block_counts, route.q_len, route.kv_len,
                                            route.q_block_size, route.kv_block_size, route.causal, all_masked)
    plan = {"clean": cache["clean"], "t_ids": None, "t_counts": None, "t_offsets": None, "t_masked": None}
    if backward:
        if "kernel_transposed" not in cache:
            if "transposed" in cache:  # route.transposed() ran already: reuse its padded form
                cache["kernel_transposed"] = (*cache["transposed"], None)
            else:
                geometry = (route.q_len, route.kv_len, route.q_block_size, route.kv_block_size, route.causal,
                            all_masked)
                *t, t_masked = _transposed(route.kv_block_ids, route.num_kv_blocks, geometry)
                cache["kernel_transposed"] = tuple(t)
                if t_masked is not None and "position_splits" not in cache:
                    cache["t_masked"] = t_masked
                if t[2] is None:  # the padded form is what route.transposed() returns: share it
                    cache["transposed"] = tuple(t[:2])
        t_ids, t_counts, t_offsets = cache["kernel_transposed"]
        if "t_masked" in cache and cache["t_masked"].stride() != t_counts.stride():  # the kernel indexes both alike
            cache["t_masked"] = _int32_with_strides_of(t_counts, cache["t_masked"])
        if "t_masked" not in cache:
            cache["t_masked"] = masked_query_counts(t_ids, t_counts, route.q_len, route.kv_len, route.q_block_size,
                                                    route.kv_block_size, route.causal, all_masked, t_offsets)
        plan.update(t_ids=t_ids, t_counts=t_counts, t_offsets=t_offsets, t_masked=cache["t_masked"])
    return plan


def block_sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, route, scale: float) -> tuple[Tensor, Tensor]:
    """Run a checked BlockRoute through the Triton kernels (forward and backward).

    Eager calls go through a plain ``autograd.Function`` with the route's derived data cached on
    the route; under ``torch.compile`` the registered custom op is used (one opaque node, no graph
    break), and it derives that data itself, since the transposed route has a data-dependent size."""
    args = (q, k, v, route.kv_block_ids, route.kv_block_counts)
    meta = (route.q_positions, route.kv_positions, route.q_segments, route.kv_segments, route.q_block_size,
            route.kv_block_size, route.causal, scale)
    if torch.compiler.is_compiling():
        return block_sparse_attn_fwd(*args, None, None, *meta)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    plan = route_plan(route, backward=needs_grad)
    if needs_grad:
        return _BlockSparseAttention.apply(*args, *meta, plan)
    return block_sparse_fwd(*args, *meta, plan["clean"])


def why_not_triton(q: Tensor, k: Tensor, v: Tensor, route) -> Optional[str]:
    """None if the Triton kernels can run this call, else the reason."""
    if not triton_runs_on(q.device):
        return (f"tensors are on {q.device.type}; Triton kernels need a CUDA GPU "
                "(or TRITON_INTERPRET=1, set before importing routed, to run them on the CPU for testing)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (use bfloat16, float16 or float32)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} exceeds {MAX_HEAD_DIM}"
    return None
