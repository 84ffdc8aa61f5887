"""2-D region routing (BiFormer's Bi-Level Routing): an image cut into an S x S grid of regions,
each query region routed to the top-k key regions by the dot product of region means.

Tokens are laid out **region-major** (region 0's tokens, then region 1's, ...), so every region is
one contiguous block of the sequence and a region route is a plain :class:`~routed.BlockRoute` with
block size = tokens per region: the block-sparse kernels read the routed regions in place, with no
gathered copies of keys and values. Images whose size does not divide the grid are padded up to it;
pad tokens get a segment of their own, so no real query ever attends to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import cached_constants
from ..ops.permute_rows import permute_rows, row_kernel_enabled
from ..route import BlockRoute, RouteError

__all__ = ["RegionGrid", "RegionRouting", "region_topk_route"]


@dataclass(frozen=True)
class RegionGrid:
    """An ``height x width`` token map cut into ``grid x grid`` regions of ``region_h x region_w``
    tokens (the map padded at the bottom and right up to ``padded_h x padded_w``)."""

    height: int
    width: int
    grid: int

    def __post_init__(self) -> None:
        for name in ("height", "width", "grid"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise RouteError(f"{name} must be a positive int, got {v!r}.")

    @property
    def region_h(self) -> int:
        return math.ceil(self.height / self.grid)

    @property
    def region_w(self) -> int:
        return math.ceil(self.width / self.grid)

    @property
    def padded_h(self) -> int:
        return self.region_h * self.grid

    @property
    def padded_w(self) -> int:
        return self.region_w * self.grid

    @property
    def num_regions(self) -> int:
        return self.grid * self.grid

    @property
    def tokens_per_region(self) -> int:
        return self.region_h * self.region_w

    @property
    def seq_len(self) -> int:
        return self.num_regions * self.tokens_per_region

    @property
    def is_padded(self) -> bool:
        return self.padded_h != self.height or self.padded_w != self.width

    def to_region_major(self, x: Tensor) -> Tensor:
        """``[B, height, width, C]`` -> ``[B, seq_len, C]`` region-major (pad tokens are zeros)."""
        B, H, W, C = x.shape
        if (H, W) != (self.height, self.width):
            raise RouteError(f"the grid was built for {self.height}x{self.width} tokens, got {H}x{W}.")
        if _rows_move_by_kernel(x) and x.stride(1) == W * x.stride(2):  # whole rows, one launch each way
            slot_pixels, pixel_slots = _region_maps(self, x.device)
            return permute_rows(x.view(B, H * W, C), slot_pixels, pixel_slots, backend="triton")
        if self.is_padded:
            x = F.pad(x, (0, 0, 0, self.padded_w - W, 0, self.padded_h - H))
        S, rh, rw = self.grid, self.region_h, self.region_w
        return x.view(B, S, rh, S, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, self.seq_len, C)

    def from_region_major(self, x: Tensor) -> Tensor:
        """``[B, seq_len, C]`` region-major -> ``[B, height, width, C]`` (pad tokens dropped)."""
        B, N, C = x.shape
        if _rows_move_by_kernel(x):
            slot_pixels, pixel_slots = _region_maps(self, x.device)
            return permute_rows(x, pixel_slots, slot_pixels, backend="triton").view(B, self.height, self.width, C)
        S, rh, rw = self.grid, self.region_h, self.region_w
        x = x.view(B, S, S, rh, rw, C).permute(0, 1, 3, 2, 4, 5).reshape(B, self.padded_h, self.padded_w, C)
        return x[:, : self.height, : self.width] if self.is_padded else x

    def valid_tokens(self, device=None) -> Tensor:
        """``[seq_len]`` bool, region-major: False at pad tokens."""
        return _valid_tokens(self, torch.device(device) if device is not None else torch.device("cpu"))

    def region_means(self, x: Tensor) -> Tensor:
        """``[B, seq_len, C]`` region-major -> ``[B, num_regions, C]`` means over each region's real
        tokens (zeros for a region that holds only padding)."""
        B, N, C = x.shape
        regions = x.view(B, self.num_regions, self.tokens_per_region, C)
        if not self.is_padded:
            return regions.mean(2)
        valid = self.valid_tokens(x.device).view(1, self.num_regions, self.tokens_per_region, 1)
        count = valid.sum(2).clamp_min(1)
        return (regions * valid).sum(2) / count

    def real_regions(self, device=None) -> Tensor:
        """``[num_regions]`` bool: regions holding at least one real token."""
        return self.valid_tokens(device).view(self.num_regions, self.tokens_per_region).any(1)


def _rows_move_by_kernel(x: Tensor) -> bool:
    """Whether the reorders go through the Triton row mover (:func:`~routed.ops.permute_rows.permute_rows`;
    on the H200 PyTorch's 6-D permute copies ran unvectorised at ~1.5 TB/s): on CUDA unless
    ``ROUTED_ROW_KERNEL=0`` (:func:`~routed.ops.permute_rows.row_kernel_enabled`), where the channels are
    contiguous."""
    return row_kernel_enabled(x.device) and (x.stride(-1) == 1 or x.shape[-1] == 1)


@cached_constants()
def _region_maps(grid: RegionGrid, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(slot_pixels [1, seq_len], pixel_slots [1, height * width])`` int64: the raster pixel of each
    region-major slot (-1 at pad slots) and the slot of each pixel."""
    S, rh, rw = grid.grid, grid.region_h, grid.region_w
    pixels = torch.arange(grid.height * grid.width, device=device).view(grid.height, grid.width) + 1
    pixels = F.pad(pixels, (0, grid.padded_w - grid.width, 0, grid.padded_h - grid.height))  # pad: 0
    slot_pixels = pixels.view(S, rh, S, rw).permute(0, 2, 1, 3).reshape(1, grid.seq_len) - 1
    pixel_slots = torch.empty(1, grid.height * grid.width, dtype=torch.long, device=device)
    real = slot_pixels[0] >= 0
    pixel_slots[0, slot_pixels[0, real]] = torch.arange(grid.seq_len, device=device)[real]
    return slot_pixels, pixel_slots


@cached_constants()
def _valid_tokens(grid: RegionGrid, device: torch.device) -> Tensor:
    # A map of ones laid out region-major: to_region_major pads with zeros.
    ones = torch.ones(1, grid.height, grid.width, 1, dtype=torch.uint8, device=device)
    return grid.to_region_major(ones).view(-1) > 0


@dataclass(frozen=True)
class RegionRouting:
    """What a region router decided: ``region_ids [B, num_regions, topk]`` (int64, sorted; region
    ``r = row * grid + col``), the grid, and the :class:`~routed.BlockRoute` the kernels run."""

    region_ids: Tensor
    grid: RegionGrid
    route: BlockRoute

    @property
    def region_hw(self) -> tuple[int, int]:
        return self.grid.region_h, self.grid.region_w

    @property
    def padded_hw(self) -> tuple[int, int]:
        return self.grid.padded_h, self.grid.padded_w


def region_topk_route(q_regions: Tensor, k_regions: Tensor, grid: RegionGrid, topk: int,
                      scale: Optional[float] = None, *, keep_own: bool = False,
                      center: bool = False) -> RegionRouting:
    """Route every query region to the ``topk`` key regions with the largest
    ``scale * q_region . k_region`` (BiFormer's region-level routing; shared by all heads).

    Args:
        q_regions, k_regions: ``[B, num_regions, C]`` region descriptors (BiFormer: the detached
            means of the region's queries and keys, :meth:`RegionGrid.region_means`).
        grid: the :class:`RegionGrid` the descriptors come from.
        topk: key regions per query region, ``1 <= topk <= num_regions``.
        scale: multiplies the logits (it changes no choice; kept for parity with the paper's code).
        keep_own: every query region keeps its own region among its ``topk`` (local context is
            never routed away; an all-padding region still gets none). It takes one of the ``topk``
            slots: with ``topk=1`` every region routes to itself alone.
        center: rank key regions by ``(q_region - mean q_region) . k_region``, the mean taken over
            the image's real regions. With the paper's rule, the component that all query regions
            share dominates the dot product, so nearly every query region picks the same key
            regions; removing it ranks by what sets each region apart. (Centering the keys too
            would change nothing: it shifts each query's logits by one constant.)
    Returns:
        :class:`RegionRouting` whose route is ``[B, 1, num_regions, topk]`` with blocks of
        ``tokens_per_region``, not causal, and pad tokens in segment 1 when the grid is padded.
    """
    R = grid.num_regions
    if q_regions.dim() != 3 or q_regions.shape != k_regions.shape or q_regions.shape[1] != R:
        raise RouteError(f"q_regions and k_regions must both be [batch, {R}, channels] for a {grid.grid}x{grid.grid} "
                         f"grid, got {list(q_regions.shape)} and {list(k_regions.shape)}.")
    if not isinstance(topk, int) or not 1 <= topk <= R:
        raise RouteError(f"topk must be an int in [1, {R}] (the number of regions of a {grid.grid}x{grid.grid} "
                         f"grid), got {topk!r}.")
    if center:
        if grid.is_padded:  # the mean over real regions (an all-padding region's mean is meaningless)
            real = grid.real_regions(q_regions.device).to(q_regions.dtype)[None, :, None]
            mean = (q_regions * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)
        else:
            mean = q_regions.mean(1, keepdim=True)
        q_regions = q_regions - mean
    logits = q_regions @ k_regions.transpose(-1, -2)
    if scale is not None:
        logits = logits * scale
    if keep_own:  # +inf: always among the top k
        own = torch.eye(R, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(own, float("inf"))
    if grid.is_padded:  # a region made only of padding is never worth a slot
        logits = logits.masked_fill(~grid.real_regions(logits.device), float("-inf"))
    ids = logits.topk(topk, dim=-1).indices.sort(dim=-1).values  # [B, R, topk]
    B = ids.shape[0]
    counts = torch.full((B, 1, R), topk, dtype=torch.int32, device=ids.device)
    route = BlockRoute(ids.to(torch.int32).unsqueeze(1), counts, grid.seq_len, grid.seq_len,
                       grid.tokens_per_region, grid.tokens_per_region, causal=False, validate=False)
    if grid.is_padded:
        seg = (~grid.valid_tokens(ids.device)).to(torch.int32)
        route = route.with_segments(seg)
    return RegionRouting(ids, grid, route)
