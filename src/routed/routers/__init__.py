"""Routers: turn content (or nothing, for the static ones) into routes."""

from .static import causal_dense_route, random_block_route, sliding_window_route

__all__ = ["causal_dense_route", "random_block_route", "sliding_window_route"]
