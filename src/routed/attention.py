"""The public functional entry: ``routed_attention(q, k, v, route)``, shaped like SDPA."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .backends import Backend, Run, register_backend, select_backend
from .ops.block_sparse.reference import block_sparse_attention_reference
from .ops.token_group.reference import token_group_attention_reference
from .route import BlockRoute, RouteError, TokenRoute

__all__ = ["routed_attention", "check_inputs"]

Route = Union[BlockRoute, TokenRoute]


def _err(msg: str) -> None:
    raise RouteError(msg)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, route: Route) -> None:
    """Check that ``q, k, v`` and ``route`` fit together; raise :class:`RouteError` saying how not."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            _err(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            _err(f"{name} must be 4-D [batch, heads, seq, head_dim] (the SDPA layout), got shape {list(t.shape)}; "
                 "for [batch, seq, heads, head_dim] inputs use .transpose(1, 2).")
        if not t.is_floating_point():
            _err(f"{name} must be a floating-point tensor, got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        _err(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        _err(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}.")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        _err(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}.")
    if k.shape[:3] != v.shape[:3]:
        _err(f"k {list(k.shape)} and v {list(v.shape)} must agree in batch, heads and seq.")
    if k.shape[-1] != D:
        _err(f"q and k must share head_dim, got {D} and {k.shape[-1]}.")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        _err(f"the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv}) "
             "for grouped-query attention.")
    if route.device != q.device:
        _err(f"the route is on {route.device} but q is on {q.device}; move it with route.to(q.device).")

    if isinstance(route, BlockRoute):
        ids = route.kv_block_ids
        if route.q_len != Nq or route.kv_len != Nk:
            _err(f"the route was built for q_len={route.q_len}, kv_len={route.kv_len} but q has {Nq} tokens and "
                 f"k has {Nk}.")
        positions = [p for p in (route.q_positions, route.kv_positions, route.q_segments, route.kv_segments)
                     if p is not None and p.dim() == 2]
        batches = [ids.shape[0]] + [p.shape[0] for p in positions]
    elif isinstance(route, TokenRoute):
        ids = route.token_ids
        if Nq != Nk or route.seq_len != Nq:
            _err(f"a TokenRoute is for self-attention over seq_len={route.seq_len} tokens; got q with {Nq} "
                 f"and k with {Nk}.")
        batches = [ids.shape[0]]
    else:
        raise TypeError(f"route must be a BlockRoute or TokenRoute, got {type(route).__name__}.")
    for b in batches:
        if b not in (1, B):
            _err(f"the route's batch axis is {b} but the inputs have batch {B}; use 1 (shared) or {B}.")
    hr = ids.shape[1]
    if hr not in (1, Hkv, Hq):
        _err(f"the route has {hr} heads; it must have 1 (shared), {Hkv} (one per key/value head) or "
             f"{Hq} (one per query head).")


def _reference_why_not(q, k, v, route) -> Optional[str]:
    return None


def _reference_run(q, k, v, route, scale):
    if isinstance(route, BlockRoute):
        return block_sparse_attention_reference(q, k, v, route, scale)
    return token_group_attention_reference(q, k, v, route, scale)


register_backend(Backend("reference", priority=0, why_not=_reference_why_not, run=_reference_run,
                         description="plain PyTorch, any device, exact (the ground truth of the tests)"))


def _block_sparse_run(block_sparse_fn) -> Run:
    """A backend's ``run`` from its block-sparse attention ``block_sparse_fn(q, k, v, route, scale)``:
    a TokenRoute is gathered into a group-major, block-diagonal BlockRoute first."""
    from .ops.token_group.via_block_sparse import token_group_attention_block_sparse

    def run(q, k, v, route, scale):
        if isinstance(route, BlockRoute):
            return block_sparse_fn(q, k, v, route, scale)
        return token_group_attention_block_sparse(q, k, v, route, scale, block_sparse_fn)

    return run


def _register_triton() -> None:
    try:
        from .ops.block_sparse.triton_ops import block_sparse_attention_triton, why_not_triton
    except ImportError as e:  # triton is an optional dependency
        reason = f"triton is not importable ({e}); install it with `pip install routed[triton]`"
        register_backend(Backend("triton", priority=20, why_not=lambda q, k, v, r: reason, run=None))
        return

    def interpreted(q, k, v, route) -> Optional[str]:
        if q.device.type == "cpu":
            return "on the CPU the Triton kernels run in the interpreter, which is for testing; name it to use it"
        return None

    register_backend(Backend("triton", priority=20, why_not=why_not_triton,
                             run=_block_sparse_run(block_sparse_attention_triton),
                             description="fused Triton block-sparse kernels; a TokenRoute is gathered into a "
                                         "block-diagonal route (CUDA; CPU under TRITON_INTERPRET=1)",
                             auto_why_not=interpreted))


_register_triton()


def _register_flex() -> None:
    from .ops.block_sparse.flex import block_sparse_attention_flex, why_not_flex

    register_backend(Backend("flex", priority=10, why_not=why_not_flex, run=block_sparse_attention_flex,
                             description="torch FlexAttention fed the route's block mask (CUDA; a baseline)"))


_register_flex()


def _register_cpu_gathered() -> None:
    from .ops.block_sparse.cpu_gathered import (auto_why_not_cpu_gathered, block_sparse_attention_cpu_gathered,
                                                why_not_cpu_gathered)

    register_backend(Backend("cpu_gathered", priority=5, why_not=why_not_cpu_gathered,
                             run=_block_sparse_run(block_sparse_attention_cpu_gathered),
                             description="the routed blocks gathered per query block, attended by PyTorch's "
                                         "fused CPU attention kernel (CPU; exact)",
                             auto_why_not=auto_why_not_cpu_gathered))


_register_cpu_gathered()


def routed_attention(q: Tensor, k: Tensor, v: Tensor, route: Route, *, scale: Optional[float] = None,
                     backend: Optional[str] = None, return_lse: bool = False):
    """Exact softmax attention restricted to where ``route`` sends each query.

    Args:
        q: ``[batch, heads_q, q_len, head_dim]``.
        k: ``[batch, heads_kv, kv_len, head_dim]``; ``heads_q`` a multiple of ``heads_kv`` (GQA).
        v: ``[batch, heads_kv, kv_len, head_dim_v]``.
        route: a :class:`~routed.BlockRoute` (causality lives in the route) or a
            :class:`~routed.TokenRoute` (self-attention within token groups).
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: ``"reference"``, ``"triton"``, ... or ``None`` to choose automatically (see
            :func:`routed.explain_backends`). A named backend that cannot run raises.
        return_lse: also return the log-sum-exp (natural log, float32) used to merge branches.
    Returns:
        ``out`` ``[batch, heads_q, q_len, head_dim_v]`` in q's dtype (the Triton backend lays it
        out in q's token/head order: a q that is the transposed view of a ``[B, N, H, d]`` projection
        gives an out whose ``transpose(1, 2).reshape(B, N, H * dv)`` is a view, not a copy); with ``return_lse`` also
        ``lse`` ``[batch, heads_q, q_len]`` for a BlockRoute, ``[batch, heads_q, groups,
        group_size]`` for a TokenRoute (``-inf`` where a query sees nothing; its output is 0).
    """
    check_inputs(q, k, v, route)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chosen = select_backend(q, k, v, route, backend)
    out, lse = chosen.run(q, k, v, route, float(scale))
    return (out, lse) if return_lse else out


def available_backends_for(device: Union[str, torch.device]) -> list[tuple[str, Optional[str]]]:
    """Which backends could run a typical bf16/float32 call on ``device`` (for ``routed info``)."""
    from .backends import backends
    from .routers.static import sliding_window_route

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.zeros(1, 1, 128, 64, device=device, dtype=dtype)
    route = sliding_window_route(128, block_size=64, window_blocks=1, device=device)
    return [(b.name, b.why_not(q, q, q, route)) for b in backends()]
