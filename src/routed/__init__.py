"""routed: content-based routing inside transformers.

Routers turn content into routes (plain data); kernels compute exact attention where a route
sends each query (:func:`routed_attention`, :class:`BlockRoute`, :class:`TokenRoute`) and expert
MLPs run where a route sends each token (:class:`ExpertRoute`, :func:`expert_mlp`, :class:`RoutedMoE`).

Vision: ``import routed.models`` registers the BiFormer backbones with timm
(:class:`~routed.layers.bra.BiLevelRoutingAttention` is the layer); ``routed.viz.draw_bra_routing``
draws routes. Hugging Face: ``import routed.integrations.transformers`` registers
``attn_implementation="routed"``; ``routed.integrations.hf_moe`` swaps MoE routers.
"""

from .attention import check_inputs, routed_attention
from .backends import BackendUnavailable, backends, explain_backends
from .experts_metrics import expert_load, load_imbalance, router_entropy, routing_fluctuation, top1_experts
from .layers.bra import BiLevelRoutingAttention
from .layers.moe import RoutedMoE, moe_balance_loss
from .layers.mosa import MoSAAttention
from .layers.routing_attention import RoutingAttention
from .ops.expert_dispatch import explain_dispatch_backends, expert_mlp
from .route import BlockRoute, ExpertRoute, RouteError, TokenRoute, segment_ids_from_cu_seqlens
from .routers.estimators import BlockBudget, PooledBlockEstimator, SampledQueryEstimator, select_blocks
from .routers.experts import (ExpertRouter, RouterOutput, attention_mixed_probs, expert_choice_route, router_z_loss,
                              similarity_mixed_probs, switch_aux_loss, token_choice_route, update_selection_bias)
from .routers.kmeans import KMeansRouter
from .routers.regions2d import RegionGrid, region_topk_route
from .routers.static import causal_dense_route, random_block_route, sliding_window_route

__version__ = "0.1.0"

__all__ = [
    "BlockRoute",
    "TokenRoute",
    "RouteError",
    "segment_ids_from_cu_seqlens",
    "BackendUnavailable",
    "routed_attention",
    "check_inputs",
    "explain_backends",
    "backends",
    "sliding_window_route",
    "causal_dense_route",
    "random_block_route",
    "RegionGrid",
    "region_topk_route",
    "BiLevelRoutingAttention",
    "KMeansRouter",
    "BlockBudget",
    "PooledBlockEstimator",
    "SampledQueryEstimator",
    "select_blocks",
    "RoutingAttention",
    "MoSAAttention",
    "ExpertRoute",
    "expert_mlp",
    "explain_dispatch_backends",
    "ExpertRouter",
    "RouterOutput",
    "token_choice_route",
    "expert_choice_route",
    "similarity_mixed_probs",
    "attention_mixed_probs",
    "switch_aux_loss",
    "router_z_loss",
    "update_selection_bias",
    "RoutedMoE",
    "moe_balance_loss",
    "expert_load",
    "load_imbalance",
    "router_entropy",
    "routing_fluctuation",
    "top1_experts",
]
