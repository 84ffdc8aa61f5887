"""Layers: nn.Modules built from a router and an op."""

from .bra import BiLevelRoutingAttention, bra_gather_attention
from .moe import RoutedMoE, moe_balance_loss
