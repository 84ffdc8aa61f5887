"""Routers: turn content (or nothing, for the static ones) into routes."""

from .blocks import MoBARouter, NSASelectionRouter, block_topk_route
from .experts import ExpertRouter, expert_choice_route, token_choice_route
from .kmeans import KMeansRouter, cluster_window_route
from .regions2d import RegionGrid, region_topk_route
from .static import causal_dense_route, random_block_route, sliding_window_route

__all__ = ["causal_dense_route", "random_block_route", "sliding_window_route", "RegionGrid", "region_topk_route",
           "KMeansRouter", "cluster_window_route", "ExpertRouter", "expert_choice_route", "token_choice_route",
           "MoBARouter", "NSASelectionRouter", "block_topk_route"]
