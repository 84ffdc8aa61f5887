"""BiFormer backbones (Zhu et al., CVPR 2023) on :class:`~routed.layers.bra.BiLevelRoutingAttention`,
registered with timm.

Architecture as in the official code: an overlapping conv stem (two 3x3 stride-2 convs, stride 4),
four stages separated by 3x3 stride-2 convs, pre-norm blocks (depthwise-conv position encoding,
LayerNorm, attention, LayerNorm, MLP), a BatchNorm on the last map and an average-pool head.
Stages 1-3 use Bi-Level Routing Attention; ``topk = -2`` (the last stage) is plain global attention
with LePE.

``import routed.models`` registers ``biformer_tiny``, ``biformer_small`` and ``biformer_base`` with
timm, after which ``timm.create_model("biformer_tiny", num_classes=10)`` and
``timm.create_model("biformer_tiny", features_only=True)`` (NCHW maps at strides 4, 8, 16, 32) work.
No pretrained weights are bundled (the machines are offline).

Blocks and stages take and return NCHW maps of any height and width; the attention pads and masks
internally. ``attn_type="window"`` swaps routing for a static choice of the same number of regions
around each query region (the same FLOPs, the same kernels), the baseline routing is measured
against.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..layers.bra import BiLevelRoutingAttention
from ..route import BlockRoute
from ..routers.regions2d import RegionGrid, RegionRouting

__all__ = ["BiFormer", "BRABlock", "BiFormerStage", "GlobalAttentionLePE", "WindowRegionAttention", "static_region_ids",
           "biformer_tiny", "biformer_small", "biformer_base"]


# --------------------------------------------------------------------------------------------- attention


class GlobalAttentionLePE(nn.Module):
    """Full attention over all tokens plus a depthwise-conv LePE term (BiFormer's ``topk = -2`` stage).

    x ``[B, H, W, C]`` -> ``[B, H, W, C]``. As in the official code the LePE conv reads the block's
    (normalised) input, and the qkv projection has no bias.
    """

    def __init__(self, dim: int, num_heads: int = 8, qk_scale: Optional[float] = None, side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.scale = qk_scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        qkv = self.qkv(x).view(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)   # [B, heads, HW, d]
        o = o.transpose(1, 2).reshape(B, H, W, C)
        if self.lepe is not None:
            o = o + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(o)


def static_region_ids(n_win: int, topk: int, device=None) -> Tensor:
    """For each region of an ``n_win x n_win`` grid, the ``topk`` regions a static window attends to.

    Returns ``[n_win**2, topk]`` int64, sorted. A square ``topk = m*m`` gives the m x m block of regions
    holding the query region (shifted inward at the borders, like a Swin window); any other ``topk``
    the nearest regions by distance between region centres (ties by region index). The query region
    itself is always included.
    """
    S = n_win
    if not 1 <= topk <= S * S:
        raise ValueError(f"topk must be in [1, n_win**2 = {S * S}], got {topk}.")
    rows = torch.arange(S).repeat_interleave(S)
    cols = torch.arange(S).repeat(S)
    m = math.isqrt(topk)
    if m * m == topk:
        r0 = (rows - (m - 1) // 2).clamp(0, S - m)
        c0 = (cols - (m - 1) // 2).clamp(0, S - m)
        off = torch.arange(m)
        ids = (r0[:, None, None] + off[None, :, None]) * S + (c0[:, None, None] + off[None, None, :])
        ids = ids.reshape(S * S, topk)
    else:
        d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
        # Stable sort: among equal distances the lower region index comes first.
        ids = torch.sort(d2 * (S * S) + torch.arange(S * S)[None, :], dim=1).indices[:, :topk]
    return ids.sort(dim=1).values.to(device)


class WindowRegionAttention(BiLevelRoutingAttention):
    """Region attention with a static choice of regions: the routing-free baseline of BRA.

    The same module as :class:`BiLevelRoutingAttention` (same parameters, so state dicts load both
    ways; same block-sparse kernels; same FLOPs for the same ``n_win`` and ``topk``), except that
    each query region attends to a fixed neighbourhood of ``topk`` regions
    (:func:`static_region_ids`) instead of the regions its content routes to. Any H, W: the map is
    padded up to the grid and pad tokens are masked, as in BRA.

    x ``[B, H, W, C]`` -> ``[B, H, W, C]`` (or ``(y, RegionRouting)`` with ``return_routing=True``).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, topk: int = 4, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, side_dwconv: int = 5, backend: Optional[str] = None):
        super().__init__(dim, num_heads=num_heads, n_win=n_win, topk=topk, qk_dim=qk_dim, qk_scale=qk_scale,
                         side_dwconv=side_dwconv, backend=backend)
        self.register_buffer("region_ids", static_region_ids(n_win, topk), persistent=False)
        self._routes: dict = {}   # (H, W, device) -> RegionRouting: the kernels cache derived data on a route

    def static_routing(self, grid: RegionGrid, device) -> RegionRouting:
        """The (batch-1) routing of this module's static neighbourhoods on ``grid``."""
        key = (grid.height, grid.width, str(device))
        if key not in self._routes:
            if len(self._routes) >= 32:   # many input sizes: keep the cache small
                self._routes.clear()
            R = grid.num_regions
            ids = self.region_ids.to(device)
            mask = torch.zeros(1, 1, R, R, dtype=torch.bool, device=device)
            mask[0, 0, torch.arange(R, device=device)[:, None], ids] = True
            route = BlockRoute.from_block_mask(mask, q_len=grid.seq_len, kv_len=grid.seq_len,
                                               q_block_size=grid.tokens_per_region)
            if grid.is_padded:   # pad tokens in a segment of their own: never attended by real queries
                route = route.with_segments((~grid.valid_tokens(device)).to(torch.int32))
            self._routes[key] = RegionRouting(ids[None], grid, route)
        return self._routes[key]

    def route_regions(self, grid: RegionGrid, q: Tensor, k: Tensor) -> RegionRouting:
        """The static neighbourhoods, whatever the content (``q``, ``k`` only give the batch)."""
        routing = self.static_routing(grid, q.device)
        return RegionRouting(routing.region_ids.expand(q.shape[0], -1, -1), grid, routing.route)


# ------------------------------------------------------------------------------------------------ blocks


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p`` (training)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


ATTN_TYPES = ("bra", "window", "global")


class BRABlock(nn.Module):
    """One BiFormer block, NCHW in and out; the standalone block a detector neck can use.

    ``x = x + dwconv3x3(x)`` (position encoding), then pre-norm residual attention and MLP on the
    NHWC view: ``x = x + drop_path(attn(LN(x)))``, ``x = x + drop_path(mlp(LN(x)))``.

    Args:
        dim: channels C.
        num_heads: attention heads (BiFormer uses ``dim // 32``).
        n_win: the region grid is ``n_win x n_win`` whatever the map size (the map is padded to a multiple).
        topk: routed regions per query region (``attn_type="bra"``), or regions of the static
            neighbourhood (``"window"``); ignored for ``"global"``.
        attn_type: ``"bra"`` (Bi-Level Routing Attention), ``"window"`` (:class:`WindowRegionAttention`,
            same FLOPs, no routing) or ``"global"`` (:class:`GlobalAttentionLePE`).
        qk_dim, qk_scale, side_dwconv: passed to the attention (``side_dwconv`` is the LePE kernel).
        mlp_ratio: hidden width of the MLP over ``dim``.
        before_attn_dwconv: kernel of the depthwise position-encoding conv (0 turns it off).
        drop_path: stochastic-depth probability of both residual branches.
        keep_own_region, center_routing: BRA's routing options (:class:`BiLevelRoutingAttention`).

    ``forward(x [B, C, H, W], return_routing=False)`` returns ``[B, C, H, W]``, or ``(y, routing)`` where
    ``routing`` is the attention's routing result (``None`` for global attention).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, topk: int = 4, attn_type: str = "bra",
                 qk_dim: Optional[int] = None, qk_scale: Optional[float] = None, side_dwconv: int = 5,
                 mlp_ratio: float = 3.0, before_attn_dwconv: int = 3, drop_path: float = 0.0,
                 backend: Optional[str] = None, keep_own_region: bool = False, center_routing: bool = False):
        super().__init__()
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}.")
        self.attn_type = attn_type
        self.pos_embed = (nn.Conv2d(dim, dim, before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim)
                          if before_attn_dwconv > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)   # eps as the official code: avoids attention collapse
        if attn_type == "bra":
            self.attn = BiLevelRoutingAttention(dim, num_heads=num_heads, n_win=n_win, topk=topk, qk_dim=qk_dim,
                                                qk_scale=qk_scale, side_dwconv=side_dwconv, backend=backend,
                                                keep_own_region=keep_own_region, center_routing=center_routing)
        elif attn_type == "window":
            self.attn = WindowRegionAttention(dim, num_heads=num_heads, n_win=n_win, topk=topk, qk_dim=qk_dim,
                                              qk_scale=qk_scale, side_dwconv=side_dwconv)
        else:
            self.attn = GlobalAttentionLePE(dim, num_heads=num_heads, qk_scale=qk_scale, side_dwconv=side_dwconv)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, return_routing: bool = False):
        if x.dim() != 4:
            raise ValueError(f"BRABlock takes NCHW maps [B, C, H, W], got shape {list(x.shape)}.")
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)   # NHWC for the norms, attention and MLP
        routing = None
        if return_routing and self.attn_type != "global":
            a, routing = self.attn(self.norm1(x), return_routing=True)
        else:
            a = self.attn(self.norm1(x))
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        x = x.permute(0, 3, 1, 2)
        return (x, routing) if return_routing else x


class BiFormerStage(nn.Module):
    """A downsampling conv (3x3, stride 2, BatchNorm; identity for the first stage, whose downsampling
    is the stem) followed by ``depth`` :class:`BRABlock` s. NCHW in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_paths: Sequence[float], **block_kw):
        super().__init__()
        self.downsample = (nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
                           if downsample else nn.Identity())
        self.blocks = nn.ModuleList(BRABlock(dim, drop_path=dp, **block_kw) for dp in drop_paths[:depth])

    def forward(self, x: Tensor, routings: Optional[list] = None) -> Tensor:
        """``routings``: when a list, each block's routing result is appended to it."""
        x = self.downsample(x)
        for blk in self.blocks:
            if routings is None:
                x = blk(x)
            else:
                x, r = blk(x, return_routing=True)
                routings.append(r)
        return x


# ------------------------------------------------------------------------------------------------- model


def _per_stage(value, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != 4:
            raise ValueError(f"{name} needs one value per stage (4), got {list(value)}.")
        return list(value)
    return [value] * 4


class BiFormer(nn.Module):
    """BiFormer backbone and classifier (timm-style: ``forward_features``, ``forward_head``,
    ``forward_intermediates``, ``reset_classifier``, ``feature_info``).

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        head_dim: channels per head in the routed stages (heads = dim // head_dim).
        topks: routed regions per query region for each stage; ``-2`` = global attention with LePE
            (8 heads, as in the official code).
        n_win: region grid per side, one for all stages or one per stage. The grid is fixed whatever
            the input size (the official models use 7 at 224x224: regions of 8x8 tokens in stage 1).
        attn_type: ``"bra"`` or ``"window"`` (the static-neighbourhood baseline, same FLOPs) for every
            stage whose topk is positive.
        qk_dims: qk_dim per stage (None: the stage's dim).
        in_chans, num_classes, mlp_ratios, side_dwconv, before_attn_dwconv, qk_scale: as named.
        drop_path_rate: stochastic depth, rising linearly over the blocks up to this value.
        drop_rate: dropout before the classifier.
        backend: routed-attention backend for BRA (None: automatic).
        keep_own_region, center_routing: BRA's routing options (:class:`BiLevelRoutingAttention`;
            the paper's rule when both are off).

    Input ``[B, in_chans, H, W]`` of any H, W; ``forward_features`` gives ``[B, embed_dims[-1],
    ceil(H/32), ceil(W/32)]`` (each stride-2 conv rounds up), ``forward`` the logits ``[B, num_classes]``.
    """

    def __init__(self, depths: Sequence[int] = (2, 2, 8, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 head_dim: int = 32, topks: Sequence[int] = (1, 4, 16, -2), n_win: Union[int, Sequence[int]] = 7,
                 attn_type: str = "bra", qk_dims: Optional[Sequence[Optional[int]]] = None, in_chans: int = 3,
                 num_classes: int = 1000, mlp_ratios: Union[float, Sequence[float]] = 3.0, side_dwconv: int = 5,
                 before_attn_dwconv: int = 3, qk_scale: Optional[float] = None, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0, global_pool: str = "avg", backend: Optional[str] = None,
                 keep_own_region: bool = False, center_routing: bool = False):
        super().__init__()
        depths, embed_dims, topks = list(depths), list(embed_dims), list(topks)
        for name, val in (("depths", depths), ("embed_dims", embed_dims), ("topks", topks)):
            if len(val) != 4:
                raise ValueError(f"{name} needs one value per stage (4), got {val}.")
        if attn_type not in ("bra", "window"):
            raise ValueError(f"attn_type must be 'bra' or 'window', got {attn_type!r}.")
        if global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}.")
        n_wins = _per_stage(n_win, "n_win")
        mlp_ratios = _per_stage(mlp_ratios, "mlp_ratios")
        qk_dims = list(qk_dims) if qk_dims is not None else [None] * 4
        for i, (k, S) in enumerate(zip(topks, n_wins)):
            if k > S * S or k == 0 or k < -2:
                raise ValueError(f"stage {i}: topk={k} must be in [1, n_win**2 = {S * S}] or -2 (global attention).")

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = embed_dims
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        d0 = embed_dims[0]
        # Overlapping conv stem, stride 4 (two 3x3 stride-2 convs, as UniFormer/BiFormer).
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, d0 // 2, 3, stride=2, padding=1), nn.BatchNorm2d(d0 // 2), nn.GELU(),
            nn.Conv2d(d0 // 2, d0, 3, stride=2, padding=1), nn.BatchNorm2d(d0),
        )
        n = sum(depths)   # plain floats (not torch.linspace): builds on the meta device too
        dp = [drop_path_rate * i / max(1, n - 1) for i in range(n)]
        stages, self.feature_info, cur = [], [], 0
        for i in range(4):
            glob = topks[i] == -2
            stages.append(BiFormerStage(
                embed_dims[i - 1] if i else d0, embed_dims[i], depths[i], downsample=i > 0,
                drop_paths=dp[cur:cur + depths[i]],
                num_heads=8 if glob else embed_dims[i] // head_dim, n_win=n_wins[i], topk=topks[i],
                attn_type="global" if glob else attn_type, qk_dim=qk_dims[i], qk_scale=qk_scale,
                side_dwconv=side_dwconv, mlp_ratio=mlp_ratios[i], before_attn_dwconv=before_attn_dwconv,
                backend=backend, keep_own_region=keep_own_region, center_routing=center_routing))
            cur += depths[i]
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` classes (0: none, ``forward`` returns pooled features)."""
        if global_pool is not None and global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}.")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> the normalised last map ``[B, C4, ceil(H/32), ceil(W/32)]``."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, C4, h, w]`` -> logits ``[B, num_classes]`` (or pooled features with ``pre_logits``)."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, list[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature API: the NCHW outputs of the stages in ``indices`` (an int n: the
        last n stages; None: all), and the final features unless ``intermediates_only``."""
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise ValueError(f"BiFormer intermediates are NCHW maps, got output_fmt={output_fmt!r}.")
        take, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        out = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                out.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return out
        if i == last:
            x = self.norm(x)
        return x, out

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the norm/head); returns the kept indices."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    @torch.no_grad()
    def routings(self, x: Tensor) -> list[list]:
        """Run the model and return, per stage, the routing result of each block (``None`` for global
        attention blocks): ``routings(x)[stage][block].region_ids`` is ``[B, n_win**2, topk]``."""
        x = self.stem(x)
        per_stage = []
        for stage in self.stages:
            rs: list = []
            x = stage(x, routings=rs)
            per_stage.append(rs)
        return per_stage


# ------------------------------------------------------------------------------------------ timm registry


def _cfg(**kwargs) -> dict:
    # No url / hf_hub_id: no pretrained weights exist for these definitions (the machines are offline).
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "stem.0", "classifier": "head", "license": "mit", **kwargs}


default_cfgs = {name: _cfg() for name in ("biformer_tiny", "biformer_small", "biformer_base")}


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    from timm.models import build_model_with_cfg

    if pretrained:
        raise ValueError(f"no pretrained weights are bundled for {variant} (the official ones live on a hub these "
                         "machines cannot reach); create it with pretrained=False and load a state dict yourself.")
    return build_model_with_cfg(BiFormer, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


def _register(fn):
    try:
        from timm.models import register_model
    except ImportError:   # timm is optional: the classes work without it
        return fn
    return register_model(fn)


@_register
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: depths [2, 2, 8, 2], dims [64, 128, 256, 512] (13.1M parameters at 1000 classes)."""
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **{**args, **kwargs})


@_register
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: depths [4, 4, 18, 4], dims [64, 128, 256, 512]."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **{**args, **kwargs})


@_register
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: depths [4, 4, 18, 4], dims [96, 192, 384, 768]."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **{**args, **kwargs})
