"""Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023) on the block-sparse op.

The image is cut into an S x S grid of regions. Each query region is routed to the top-k key
regions by the dot product of region means (detached, as in the paper); its tokens then attend,
exactly, to every token of the routed regions; a depthwise convolution on V (LePE) adds local
context. Here the tokens are laid out region-major, so a route is a :class:`~routed.BlockRoute`
and the block-sparse kernels read the routed regions in place: no k-fold gathered copies of
keys and values (the memory blow-up of the reference code). Any height and width: the map is
padded up to the grid and pad tokens are masked, never attended (the reference code lets real
queries attend to padding).

:func:`bra_gather_attention` is the paper's straightforward gather formulation, kept as the
test oracle and as the baseline of the benchmarks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..attention import routed_attention
from ..route import RouteError
from ..routers.regions2d import RegionGrid, RegionRouting, region_topk_route

__all__ = ["BiLevelRoutingAttention", "bra_gather_attention"]

_FORMATS = ("NHWC", "NCHW")
_IMPLS = ("routed", "gather")


def bra_gather_attention(q: Tensor, k: Tensor, v: Tensor, region_ids: Tensor, tokens_per_region: int,
                         scale: float, key_valid: Optional[Tensor] = None) -> Tensor:
    """The paper's formulation: gather the routed regions' keys and values, then attend.

    Args:
        q, k: ``[B, heads, N, d]``, v: ``[B, heads, N, dv]``, region-major (``N = regions * T``).
        region_ids: ``[B, regions, topk]`` routed key regions of every query region.
        tokens_per_region: ``T``.
        key_valid: optional ``[N]`` bool, False at pad tokens (never attended).
    Returns:
        ``[B, heads, N, dv]``. Builds ``[B, heads, regions, topk * T, d]`` gathered copies: memory
        grows k-fold with the route, which is what the block-sparse path avoids.
    """
    B, H, N, d = q.shape
    R, T = region_ids.shape[1], tokens_per_region
    topk = region_ids.shape[-1]
    idx = region_ids.long().view(B, 1, R * topk, 1, 1)

    def gather(x: Tensor) -> Tensor:
        xr = x.view(B, H, R, T, x.shape[-1])
        sel = xr.gather(2, idx.expand(B, H, R * topk, T, x.shape[-1]))
        return sel.view(B, H, R, topk * T, x.shape[-1])

    k_sel, v_sel = gather(k), gather(v)
    logits = (q.view(B, H, R, T, d) * scale) @ k_sel.transpose(-1, -2)  # [B, H, R, T, topk*T]
    if key_valid is not None:
        valid = key_valid.view(R, T)[region_ids.long()].view(B, 1, R, 1, topk * T)
        logits = logits.masked_fill(~valid, float("-inf"))
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a pad query that sees no key: zeros
    return (attn @ v_sel).view(B, H, N, v.shape[-1])


class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention over a 2-D token map.

    Args:
        dim: channels of the input and output (also the value dim, as in BiFormer).
        num_heads: attention heads; ``dim`` and ``qk_dim`` must be multiples of it.
        n_win: regions per side (S); the map is cut into S x S regions.
        topk: key regions per query region, ``1 <= topk <= n_win**2``.
        qk_dim: query/key channels (default ``dim``).
        qk_scale: softmax (and routing) scale; default ``qk_dim ** -0.5``, as the paper's code
            (note: of the whole qk_dim, not of the per-head dim), so its weights load unchanged.
        side_dwconv: kernel size of LePE, the depthwise convolution on V added to the output
            (0 disables it).
        data_format: ``"NHWC"`` (``[B, H, W, C]``, as the paper's code) or ``"NCHW"``.
        impl: ``"routed"`` (block-sparse op over region-major tokens) or ``"gather"`` (the
            paper's gathered copies; a baseline).
        backend: backend of :func:`routed.routed_attention` for ``impl="routed"`` (None: automatic).
        keep_own_region, center_routing: departures from the paper's routing rule (both off by
            default): every query region keeps its own region, and regions are ranked by the
            centred query-region means (see :func:`~routed.routers.regions2d.region_topk_route`).

    ``forward(x, return_routing=False)``: ``x`` ``[B, H, W, C]`` (or ``[B, C, H, W]``), any H and
    W; returns the same shape, and with ``return_routing`` also the :class:`RegionRouting`
    (``region_ids [B, n_win**2, topk]``, the grid and the BlockRoute).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, topk: int = 4, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, side_dwconv: int = 5, data_format: str = "NHWC",
                 impl: str = "routed", backend: Optional[str] = None, keep_own_region: bool = False,
                 center_routing: bool = False):
        super().__init__()
        qk_dim = dim if qk_dim is None else qk_dim
        if num_heads < 1 or dim % num_heads or qk_dim % num_heads:
            raise RouteError(f"dim ({dim}) and qk_dim ({qk_dim}) must be multiples of num_heads ({num_heads}).")
        if not isinstance(n_win, int) or n_win < 1:
            raise RouteError(f"n_win must be a positive int (regions per side), got {n_win!r}.")
        if not isinstance(topk, int) or not 1 <= topk <= n_win * n_win:
            raise RouteError(f"topk must be an int in [1, n_win**2 = {n_win * n_win}], got {topk!r}; for attention "
                             "over the whole map use plain attention instead.")
        if data_format not in _FORMATS:
            raise RouteError(f"data_format must be one of {_FORMATS}, got {data_format!r}.")
        if impl not in _IMPLS:
            raise RouteError(f"impl must be one of {_IMPLS}, got {impl!r}.")
        if side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise RouteError(f"side_dwconv must be 0 (no LePE) or an odd kernel size, got {side_dwconv}.")
        self.dim, self.qk_dim, self.num_heads, self.n_win, self.topk = dim, qk_dim, num_heads, n_win, topk
        self.scale = qk_scale if qk_scale is not None else qk_dim ** -0.5
        self.data_format, self.impl, self.backend = data_format, impl, backend
        self.keep_own_region, self.center_routing = keep_own_region, center_routing
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv else None)
        self.wo = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        extra = "".join(f", {n}=True" for n in ("keep_own_region", "center_routing") if getattr(self, n))
        return (f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, n_win={self.n_win}, "
                f"topk={self.topk}, impl={self.impl!r}, data_format={self.data_format!r}{extra}")

    def route_regions(self, grid: RegionGrid, q: Tensor, k: Tensor) -> RegionRouting:
        """Region level: the top-k key regions of every query region by the dot product of the
        detached means of its queries and keys (the paper's default). ``q``, ``k``: ``[B, N, qk_dim]``
        region-major. Subclasses change the choice of regions here (a static-window baseline)."""
        return region_topk_route(grid.region_means(q.detach()), grid.region_means(k.detach()), grid, self.topk,
                                 self.scale, keep_own=self.keep_own_region, center=self.center_routing)

    def forward(self, x: Tensor, return_routing: bool = False):
        if x.dim() != 4:
            raise RouteError(f"x must be 4-D ({self.data_format}), got shape {list(x.shape)}.")
        if self.data_format == "NCHW":
            x = x.permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        if C != self.dim:
            raise RouteError(f"x has {C} channels but the module was built for dim={self.dim} "
                             f"(data_format={self.data_format!r}).")
        grid = RegionGrid(H, W, self.n_win)
        # The projection is per token, so it runs on the region-major map: one reorder of C channels
        # instead of 2 qk + C. Pad tokens get the bias as q/k/v; their own segment keeps them unseen.
        qkv = self.qkv(grid.to_region_major(x))  # [B, N, 2 qk + C], region-major
        qk, heads = self.qk_dim, self.num_heads
        q, k, v = qkv.split([qk, qk, C], dim=-1)
        routing = self.route_regions(grid, q, k)

        def per_head(t: Tensor) -> Tensor:  # [B, N, heads * d] -> [B, heads, N, d] (a token-major view)
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)

        qh, kh, vh = per_head(q), per_head(k), per_head(v)
        if self.impl == "routed":  # a token-major output: the reshape below is a view
            o = routed_attention(qh, kh, vh, routing.route, scale=self.scale, backend=self.backend)
        else:
            valid = grid.valid_tokens(x.device) if grid.is_padded else None
            o = bra_gather_attention(qh, kh, vh, routing.region_ids, grid.tokens_per_region, self.scale, valid)
        out = grid.from_region_major(o.transpose(1, 2).reshape(B, grid.seq_len, C))  # [B, H, W, C]
        if self.lepe is not None:  # local context on the unpadded V map (zero borders, no pad values)
            v_map = grid.from_region_major(v).permute(0, 3, 1, 2)  # channels-last [B, C, H, W]
            out = out + self.lepe(v_map).permute(0, 2, 3, 1)
        out = self.wo(out)
        if self.data_format == "NCHW":
            out = out.permute(0, 3, 1, 2)
        return (out, routing) if return_routing else out
