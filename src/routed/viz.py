"""Pictures of routes: which regions Bi-Level Routing Attention sent a query region to.

Needs matplotlib (``pip install routed[plot]``); draws with the Agg backend, no display needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["draw_bra_routing"]


def _as_hw_image(image) -> np.ndarray:
    """``[H, W]``, ``[C, H, W]`` (C in 1, 3) or ``[H, W, C]`` tensor/array -> float ``[H, W]`` or ``[H, W, 3]`` in [0, 1]."""
    a = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"image must be [H, W], [C, H, W] or [H, W, C] with C in (1, 3), got shape {list(a.shape)}.")
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def draw_bra_routing(image, routing: Any, query_region: Union[int, Sequence[int]], path: Union[str, os.PathLike],
                     *, batch_index: int = 0, stride: Optional[float] = None, title: Optional[str] = None) -> Path:
    """Draw ``image`` with BRA's region grid, outline ``query_region`` and shade the regions it routed to.

    Args:
        image: the input picture, ``[H, W]``, ``[C, H, W]`` or ``[H, W, C]`` (tensor or array; any range).
        routing: the routing result of ``BiLevelRoutingAttention(..., return_routing=True)`` (or any
            object with ``region_ids [B, S*S, topk]``, ``region_hw``, ``grid`` (S, or an object whose ``.grid`` is S),
            ``padded_hw``).
        query_region: region index ``r = row * S + col``, or ``(row, col)``.
        path: where the PNG goes (parent folders are made).
        batch_index: which image of the batch the routing belongs to.
        stride: image pixels per token of the map the attention ran on (4 for a BiFormer's first stage).
            None: the padded token map is stretched over the whole image (exact when the attention ran
            on the image itself, or when the map divides the grid).
        title: figure title (default: the query region and its routed regions).

    Returns the PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt

    g = routing.grid   # BRA's RegionRouting holds a RegionGrid (its .grid is S); plain S works too
    S = int(getattr(g, "grid", g))
    ids = routing.region_ids
    ids = ids.detach().cpu() if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if ids.dim() != 3 or ids.shape[1] != S * S:
        raise ValueError(f"routing.region_ids must be [B, grid**2 = {S * S}, topk], got {list(ids.shape)}.")
    if not 0 <= batch_index < ids.shape[0]:
        raise ValueError(f"batch_index {batch_index} out of range for a routing of batch {ids.shape[0]}.")
    if isinstance(query_region, (tuple, list)):
        row, col = (int(v) for v in query_region)
        if not (0 <= row < S and 0 <= col < S):
            raise ValueError(f"query_region (row, col) = {(row, col)} is outside the {S}x{S} grid.")
        q = row * S + col
    else:
        q = int(query_region)
        if not 0 <= q < S * S:
            raise ValueError(f"query_region {q} is outside the {S}x{S} grid (0 .. {S * S - 1}).")
    routed = sorted({int(r) for r in ids[batch_index, q].tolist() if r >= 0})

    img = _as_hw_image(image)
    H, W = img.shape[:2]
    rh, rw = (int(v) for v in routing.region_hw)
    ph, pw = (int(v) for v in routing.padded_hw)
    sy, sx = (H / ph, W / pw) if stride is None else (float(stride), float(stride))

    def rect(r: int):   # region r -> (x0, y0, w, h) in pixels, cropped to the image
        y0, x0 = (r // S) * rh * sy, (r % S) * rw * sx
        y1, x1 = min(y0 + rh * sy, H), min(x0 + rw * sx, W)
        return x0, y0, max(x1 - x0, 0), max(y1 - y0, 0)

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, extent=(0, W, H, 0),
              interpolation="nearest")
    for r in routed:
        x0, y0, w, h = rect(r)
        ax.add_patch(mpatches.Rectangle((x0, y0), w, h, facecolor="tab:orange", alpha=0.45, edgecolor="none"))
    for i in range(1, S):   # grid lines between regions
        ax.axhline(min(i * rh * sy, H), color="tab:cyan", lw=0.6, alpha=0.8)
        ax.axvline(min(i * rw * sx, W), color="tab:cyan", lw=0.6, alpha=0.8)
    x0, y0, w, h = rect(q)
    ax.add_patch(mpatches.Rectangle((x0, y0), w, h, fill=False, edgecolor="red", lw=2.5))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"query region {q} (red) -> routed regions {routed} (orange)", fontsize=8)
    handles = [mpatches.Patch(edgecolor="red", fill=False, lw=2, label="query region"),
               mpatches.Patch(facecolor="tab:orange", alpha=0.45, label=f"routed (top-{ids.shape[-1]})")]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
