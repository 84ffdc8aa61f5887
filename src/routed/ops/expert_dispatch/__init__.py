"""Expert dispatch: run each token through the expert MLPs its :class:`~routed.route.ExpertRoute`
names and combine the results with the route's weights.

Backends (all exact up to rounding, all differentiable):

| name | runs on | how |
|---|---|---|
| ``grouped_mm`` | Hopper GPUs, bfloat16 | sorted tokens, ``torch._grouped_mm`` per projection |
| ``batched`` | any device | sorted tokens padded to the largest group, one ``bmm`` per projection |
| ``loop`` | any device | sorted tokens, one ``F.linear`` per expert |
| ``reference`` | any device | per-expert loop straight from the expert ids (the tests' ground truth) |

Around the grouped GEMMs, Triton kernels fuse the SwiGLU gate, the weighted combine and the
gather's backward (``fused``; on by default on CUDA GPUs).

``backend=None`` takes the first of ``grouped_mm``, ``batched`` (GPUs only: on a CPU the loop is
as fast and needs no padding), ``loop`` that can run, logging why the others were passed over. A
backend named explicitly that cannot run raises :class:`~routed.backends.BackendUnavailable`.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from ...backends import BackendUnavailable
from ...route import ExpertRoute, RouteError
from .grouped import gmm_batched, gmm_grouped_mm, gmm_loop, grouped_mm_why_not, sorted_expert_mlp
from .reference import expert_mlp_reference, swiglu_expert

__all__ = ["expert_mlp", "fused_why_not", "explain_dispatch_backends", "DISPATCH_BACKENDS", "expert_mlp_reference", "swiglu_expert"]

logger = logging.getLogger("routed")

DISPATCH_BACKENDS = ("grouped_mm", "batched", "loop", "reference")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RouteError(msg)


def check_expert_inputs(x: Tensor, route: ExpertRoute, gate_up_proj: Tensor, down_proj: Tensor) -> None:
    """Check that ``x``, the route and the expert weights fit together; raise :class:`RouteError` saying how not."""
    # The combined test first: the messages below cost more host time to format than the checks.
    if (isinstance(route, ExpertRoute) and isinstance(x, Tensor) and isinstance(gate_up_proj, Tensor)
            and isinstance(down_proj, Tensor) and x.dim() == 2 and x.is_floating_point() and gate_up_proj.dim() == 3
            and route.num_tokens == x.shape[0] and gate_up_proj.shape[0] == route.num_experts
            and gate_up_proj.shape[2] == x.shape[1] and gate_up_proj.shape[1] % 2 == 0
            and down_proj.shape == (gate_up_proj.shape[0], x.shape[1], gate_up_proj.shape[1] // 2)
            and x.dtype == gate_up_proj.dtype == down_proj.dtype
            and x.device == gate_up_proj.device == down_proj.device == route.device):
        return
    _check(isinstance(route, ExpertRoute), f"route must be an ExpertRoute, got {type(route).__name__}.")
    _check(isinstance(x, Tensor) and x.dim() == 2,
           f"x must be 2-D [tokens, hidden], got {list(getattr(x, 'shape', []))}; flatten with x.reshape(-1, hidden).")
    _check(x.is_floating_point(), f"x must be floating point, got {x.dtype}.")
    T, H = x.shape
    _check(route.num_tokens == T, f"the route was built for {route.num_tokens} tokens but x has {T}.")
    _check(gate_up_proj.dim() == 3 and down_proj.dim() == 3,
           f"gate_up_proj must be [experts, 2 * intermediate, hidden] and down_proj [experts, hidden, intermediate]; "
           f"got {list(gate_up_proj.shape)} and {list(down_proj.shape)}.")
    E, I2, Hw = gate_up_proj.shape
    _check(E == route.num_experts, f"the route has {route.num_experts} experts but gate_up_proj has {E}.")
    _check(Hw == H, f"gate_up_proj's last axis ({Hw}) must equal x's hidden size ({H}).")
    _check(I2 % 2 == 0, f"gate_up_proj's middle axis ({I2}) must be 2 * intermediate (gate rows, then up rows).")
    _check(tuple(down_proj.shape) == (E, H, I2 // 2),
           f"down_proj must have shape [{E}, {H}, {I2 // 2}], got {list(down_proj.shape)}.")
    _check(x.dtype == gate_up_proj.dtype == down_proj.dtype,
           f"x ({x.dtype}), gate_up_proj ({gate_up_proj.dtype}) and down_proj ({down_proj.dtype}) must share a dtype.")
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj), ("the route", route)):
        _check(t.device == x.device, f"{name} is on {t.device} but x on {x.device}; move them to one device.")
    raise RouteError("x, the route and the expert weights do not fit together.")


def _why_not(name: str, x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Optional[str]:
    if name == "grouped_mm":
        return grouped_mm_why_not(x, gate_up_proj, down_proj)
    return None


def _auto_why_not(name: str, x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Optional[str]:
    reason = _why_not(name, x, gate_up_proj, down_proj)
    if reason is None and name == "batched" and x.device.type != "cuda":
        reason = "on the CPU the per-expert loop is as fast and needs no padding."
    if reason is None and name == "reference":
        reason = "the reference is for tests; the sorted loop computes the same thing faster."
    return reason


def explain_dispatch_backends(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> list[tuple[str, Optional[str]]]:
    """For every dispatch backend, most preferred first, ``(name, None)`` if automatic choice could take
    it for these inputs, else ``(name, reason)``."""
    return [(n, _auto_why_not(n, x, gate_up_proj, down_proj)) for n in DISPATCH_BACKENDS]


# The choice depends only on the backend asked for, the device, dtypes and sizes: decided once per
# such key (the reasons ask the device for its capability, host time a layer call should not pay).
_CHOICE: dict = {}


def select_dispatch_backend(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, backend: Optional[str]) -> str:
    key = (backend, x.device, x.dtype, gate_up_proj.dtype, down_proj.dtype, x.shape[1], gate_up_proj.shape[1],
           os.environ.get("TRITON_INTERPRET"))
    name = _CHOICE.get(key)
    if name is None:
        name = _CHOICE[key] = _select(x, gate_up_proj, down_proj, backend)  # raises (uncached) if it cannot run
    return name


def _select(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, backend: Optional[str]) -> str:
    if backend is None:
        return _select_auto(x, gate_up_proj, down_proj)
    if backend not in DISPATCH_BACKENDS:
        raise BackendUnavailable(f"unknown dispatch backend {backend!r}; choose one of {list(DISPATCH_BACKENDS)} "
                                 "or None for automatic choice.")
    reason = _why_not(backend, x, gate_up_proj, down_proj)
    if reason is not None:
        raise BackendUnavailable(f"dispatch backend {backend!r} cannot run this call: {reason}")
    return backend


def _select_auto(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> str:
    for name, reason in explain_dispatch_backends(x, gate_up_proj, down_proj):
        if reason is None:
            logger.debug("routed: chose dispatch backend %r", name)
            return name
        logger.debug("routed: dispatch backend %r rejected: %s", name, reason)
    raise AssertionError("unreachable: the loop backend runs everywhere")


_GMM = {"grouped_mm": gmm_grouped_mm, "batched": gmm_batched, "loop": gmm_loop}


def fused_why_not(x: Tensor) -> Optional[str]:
    """Why the fused Triton kernels (gate, combine, gather backward) cannot run on ``x``, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)."
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the fused Triton kernels run on CUDA GPUs (or on the CPU under TRITON_INTERPRET=1); x is on {x.device}."
    return None


def expert_mlp(x: Tensor, route: ExpertRoute, gate_up_proj: Tensor, down_proj: Tensor, *,
               backend: Optional[str] = None, act: Callable[[Tensor], Tensor] = F.silu,
               fused: Optional[bool] = None) -> Tensor:
    """Mixture-of-experts SwiGLU MLPs along an expert route.

    ``out[t] = sum_j route.weights[t, j] * down_e @ (act(gate_e @ x[t]) * (up_e @ x[t]))`` with
    ``e = route.expert_ids[t, j]``, over the token's live slots (zeros for a token with none).

    Args:
        x: ``[T, H]`` tokens (flatten batch and sequence first).
        route: an :class:`~routed.route.ExpertRoute` over ``T`` tokens.
        gate_up_proj: ``[E, 2I, H]``, gate rows then up rows (Hugging Face's ``MixtralExperts``
            layout, so its parameters can be passed as they are).
        down_proj: ``[E, H, I]``.
        backend: ``"grouped_mm"``, ``"batched"``, ``"loop"``, ``"reference"`` or None (automatic;
            see :func:`explain_dispatch_backends`).
        act: the gate activation (SiLU for SwiGLU).
        fused: run the SwiGLU gate, the weighted combine and the gather's backward as Triton
            kernels (fewer memory passes; deterministic). None: on CUDA GPUs when Triton is
            installed; True where it cannot run raises.
    Returns ``[T, H]`` in ``x.dtype``; differentiable in ``x``, the route's weights and both
    weight tensors.
    """
    check_expert_inputs(x, route, gate_up_proj, down_proj)
    name = select_dispatch_backend(x, gate_up_proj, down_proj, backend)
    if name == "reference":
        if fused:
            raise BackendUnavailable("the reference backend has no fused kernels; pass fused=None or False.")
        return expert_mlp_reference(x, route.expert_ids, route.weights, gate_up_proj, down_proj, act)
    reason = fused_why_not(x)
    if fused and reason is not None:
        raise BackendUnavailable(f"fused=True cannot run this call: {reason}")
    use_fused = (reason is None and x.device.type == "cuda") if fused is None else fused
    if fused is None and logger.isEnabledFor(logging.DEBUG):
        logger.debug("routed: dispatch kernels around the GEMMs: %s", "fused Triton" if use_fused else
                     f"plain PyTorch ({reason or 'fused kernels are for CUDA GPUs'})")
    return sorted_expert_mlp(x, route, gate_up_proj, down_proj, _GMM[name], act, fused=use_fused)
