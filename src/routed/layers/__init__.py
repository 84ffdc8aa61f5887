"""Layers: nn.Modules built from a router and an op."""

from .moe import RoutedMoE
