"""routed: content-based routing inside transformers.

Routers turn content into routes (plain data); kernels compute exact attention where a route
sends each query. See :func:`routed_attention`, :class:`BlockRoute`, :class:`TokenRoute`.
"""

from .attention import check_inputs, routed_attention
from .backends import BackendUnavailable, backends, explain_backends
from .route import BlockRoute, RouteError, TokenRoute, segment_ids_from_cu_seqlens
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
]
