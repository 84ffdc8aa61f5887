"""Token-choice top-k expert routing as one op: gate distribution, the ``k`` experts of every
token, their combine weights and the expert-sorted order that dispatch walks.

    route, probs = expert_topk_route(logits, k)            # Mixtral / Qwen-MoE: softmax, top-k, renormalise
    route, probs = expert_topk_route(logits, k, mode="topk_softmax")
    route, _ = expert_topk_route(mixed_probs, k, mode="probs")  # the similarity / attention routers

Backends: ``"triton"`` (two kernels and a prefix sum, :mod:`.triton_kernels`; CUDA GPUs, or the
CPU under ``TRITON_INTERPRET=1``) and ``"reference"`` (plain PyTorch: softmax, ``topk``, a stable
sort). Both give the same route: the lowest expert id wins a tie in the kernel, where
``torch.topk`` leaves ties unspecified (random float scores never tie in practice). ``None``
takes the kernel on CUDA GPUs and the reference elsewhere (on the CPU it is faster than the
interpreter, which is for tests that ask for ``"triton"``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...backends import kernel_or_reference
from ...env import triton_why_not
from ...route import ExpertRoute, RouteError

__all__ = ["expert_topk_route", "expert_topk_reference", "EXPERT_TOPK_MODES"]

EXPERT_TOPK_MODES = ("softmax_topk", "topk_softmax", "probs")


def expert_topk_reference(x: Tensor, k: int, mode: str = "softmax_topk", normalize: bool = True,
                          selection_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Plain PyTorch: ``(ids [T, k] int64, weights [T, k] float32, probs [T, E] float32 or None in
    mode "probs")``; see :func:`expert_topk_route` for the modes."""
    if mode == "probs":
        probs, scores, values = None, x, x
    else:
        lf = x.float()
        probs = lf.softmax(-1)
        scores = values = probs if mode == "softmax_topk" else lf
    if selection_bias is not None:
        scores = scores + selection_bias.to(scores.dtype)
    ids = scores.topk(k, dim=-1).indices
    w = values.gather(-1, ids)
    if mode == "topk_softmax":
        w = w.softmax(-1)
    elif normalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return ids, w, probs


def expert_topk_route(x: Tensor, k: int, *, mode: str = "softmax_topk", normalize: bool = True,
                      selection_bias: Optional[Tensor] = None, backend: Optional[str] = None
                      ) -> tuple[ExpertRoute, Optional[Tensor]]:
    """Each token's top-``k`` experts as an :class:`~routed.route.ExpertRoute`, and the gate distribution.

    Args:
        x: ``[T, E]`` router logits (modes ``"softmax_topk"``, ``"topk_softmax"``) or, for ``"probs"``,
            a distribution over the experts (rows summing to 1).
        k: experts per token, ``1 <= k <= E``.
        mode: ``"softmax_topk"``: softmax over all experts, the ``k`` largest probabilities, weights
            those probabilities (renormalised to sum to 1 when ``normalize``); ``"topk_softmax"``:
            the ``k`` largest logits, weights their softmax; ``"probs"``: as ``"softmax_topk"`` on a
            given distribution.
        selection_bias: optional ``[E]`` added to the scores for the choice only (weights stay
            unbiased): auxiliary-loss-free balancing.
        backend: ``"triton"``, ``"reference"`` or None (the kernel where it runs).
    Returns ``(route, probs)``: ``probs [T, E]`` float32 is ``softmax(x)`` (None in mode ``"probs"``).
    The route's weights (float32) and ``probs`` are differentiable in ``x``; no token is dropped.
    """
    if not (isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point()):
        raise RouteError(f"x must be a floating-point [tokens, experts] tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}.")
    E = x.shape[1]
    if not (isinstance(k, int) and 1 <= k <= E):
        raise RouteError(f"k must be an int in [1, num_experts={E}], got {k!r}.")
    if mode not in EXPERT_TOPK_MODES:
        raise RouteError(f"mode must be one of {EXPERT_TOPK_MODES}, got {mode!r}.")
    if selection_bias is not None and (selection_bias.shape != (E,) or selection_bias.device != x.device):
        raise RouteError(f"selection_bias must be [{E}] on {x.device}, got {list(selection_bias.shape)} on "
                         f"{selection_bias.device}.")
    backend = kernel_or_reference("expert top-k", backend, lambda: triton_why_not(x), lambda: x.device.type == "cuda")
    if backend == "triton":
        from .triton_ops import MODES, expert_topk_triton

        bias = None if selection_bias is None else selection_bias.float().contiguous()
        probs, ids, w, order, counts, offsets, inv = expert_topk_triton(x, bias, k, MODES[mode], normalize)
        route = ExpertRoute(ids, w, E, order, counts, offsets, validate=False, slot_rows=inv)
        return route, (None if mode == "probs" else probs)
    ids, w, probs = expert_topk_reference(x, k, mode, normalize, selection_bias)
    return ExpertRoute.from_expert_ids(ids, w, E, all_live=True, validate=False), probs
