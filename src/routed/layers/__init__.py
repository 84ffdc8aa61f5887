"""Layers: nn.Modules built from a router and an op. Importing this package registers every
attention layer a routed LM can name (:mod:`routed.layers.registry`)."""

from .bra import BiLevelRoutingAttention, bra_gather_attention
from .lm_attention import DenseAttention, MoBAAttention, SlidingWindowAttention
from .moe import RoutedMoE, moe_balance_loss
from .mosa import MoSAAttention, mosa_select
from .nsa import NSAAttention
from .routing_attention import RoutingAttention

__all__ = ["BiLevelRoutingAttention", "DenseAttention", "MoBAAttention", "MoSAAttention", "NSAAttention", "RoutedMoE",
           "RoutingAttention", "SlidingWindowAttention", "bra_gather_attention", "moe_balance_loss", "mosa_select"]
