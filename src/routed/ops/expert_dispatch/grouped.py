"""Sorted dispatch: gather tokens in expert order, run every expert's SwiGLU MLP as one grouped
GEMM per projection, scatter back and combine with the route's weights.

The three grouped-GEMM implementations share the same sorted layout (``ExpertRoute.order``; expert
``e`` owns rows ``offsets[e]:offsets[e + 1]``):

* ``grouped_mm``: ``torch._grouped_mm`` (one CUTLASS kernel over all groups, no padding, no host
  sync); needs a Hopper GPU (compute capability 9.x or newer) and bfloat16.
* ``batched``: pads every group to the largest one and runs one ``bmm``; any device, one host sync
  (the largest group). Memory grows with ``experts * largest group``: an unbalanced route pays.
* ``loop``: one ``F.linear`` per expert over its contiguous rows; any device, one host sync.

Around the GEMMs, ``fused=True`` (the default on CUDA GPUs) runs Triton kernels for the SwiGLU
gate, the weighted combine and the gather's backward (see :mod:`.triton_kernels`); ``fused=False``
runs the same steps as plain PyTorch ops.

Autograd comes from the differentiable ops underneath (``torch._grouped_mm`` has a derivative) and
from the custom ops' registered backward passes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...route import ExpertRoute
from ...testing import new_output

GroupedMM = Callable[[Tensor, Tensor, ExpertRoute], Tensor]


def gmm_grouped_mm(a: Tensor, w: Tensor, route: ExpertRoute) -> Tensor:
    """``a [A, in]`` sorted rows, ``w [E, out, in]`` -> ``[A, out]``: rows of expert ``e`` times ``w[e].T``."""
    return torch._grouped_mm(a, w.transpose(-2, -1), offs=route.offsets[1:])


def gmm_batched(a: Tensor, w: Tensor, route: ExpertRoute) -> Tensor:
    E = route.num_experts
    m = int(route.counts.max())  # host sync: the padded group size
    e = route.sorted_expert_ids()
    rank = torch.arange(a.shape[0], device=a.device) - route.offsets.long()[e]
    slot = e * m + rank
    padded = a.new_zeros(E * m, a.shape[1]).index_copy(0, slot, a).view(E, m, a.shape[1])
    out = torch.bmm(padded, w.transpose(-2, -1))  # [E, m, out]
    return out.reshape(E * m, -1).index_select(0, slot)


def gmm_loop(a: Tensor, w: Tensor, route: ExpertRoute) -> Tensor:
    bounds = route.offsets.tolist()  # host sync
    parts = [F.linear(a[bounds[e]:bounds[e + 1]], w[e]) for e in range(route.num_experts)
             if bounds[e + 1] > bounds[e]]
    return torch.cat(parts) if parts else a.new_zeros(0, w.shape[1])


def slot_rows(route: ExpertRoute) -> Tensor:
    """``[T, k]`` int64: the sorted row of every slot (``-1`` for an empty slot); the route's own when
    its router wrote it."""
    if route.slot_rows is not None:
        return route.slot_rows
    inv = torch.full((route.expert_ids.numel(),), -1, dtype=torch.int64, device=route.device)
    inv[route.order] = torch.arange(route.order.numel(), device=route.device)
    return inv.view(route.expert_ids.shape)


def is_silu(act) -> bool:
    """Whether ``act`` is SiLU (torch's or transformers' SiLUActivation): the fused gate applies."""
    return act is F.silu or isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def sorted_expert_mlp(x: Tensor, route: ExpertRoute, gate_up_proj: Tensor, down_proj: Tensor, gmm: GroupedMM,
                      act: Callable[[Tensor], Tensor] = F.silu, fused: bool = False) -> Tensor:
    """Dispatch ``x [T, H]`` through the experts along ``route``; returns ``[T, H]`` in ``x.dtype``.

    Sort (the route's ``order``) -> gather -> grouped SwiGLU -> weighted sum over each token's
    ``k`` slots. Tokens with no live slot get zeros. ``fused`` runs the gather's backward, the
    SwiGLU gate and the combine as Triton kernels (:mod:`.triton_ops`); otherwise plain PyTorch.
    """
    T, H = x.shape
    k = route.k
    if route.num_assignments == 0:
        out = new_output((T, H), dtype=x.dtype, device=x.device)
        out.zero_()
        # Keep the graph connected so that backward gives zero gradients rather than None.
        return out + 0.0 * (x.sum() + route.weights.sum() + gate_up_proj.sum() + down_proj.sum())
    tok = route.sorted_token_ids()
    inv = slot_rows(route)
    if fused:
        from .triton_ops import moe_combine, moe_gather, moe_swiglu

        xs = moe_gather(x, tok, inv)  # [A, H], expert-sorted
        gu = gmm(xs, gate_up_proj, route)
        if is_silu(act):
            h = moe_swiglu(gu)
        else:
            gate, up = gu.chunk(2, dim=-1)
            h = act(gate) * up
        return moe_combine(gmm(h, down_proj, route), inv, route.weights)
    xs = x.index_select(0, tok)
    gate, up = gmm(xs, gate_up_proj, route).chunk(2, dim=-1)
    ys = gmm(act(gate) * up, down_proj, route)  # [A, H]
    if route.num_assignments == T * k:
        slots = ys.index_select(0, inv.view(-1))  # every slot live: a gather (its backward is a scatter)
    else:
        slots = ys.new_zeros(T * k, H).index_copy(0, route.order, ys)
    w = route.weights.to(x.dtype)
    if k == 1:
        return slots * w
    # [T, 1, k] @ [T, k, H]: the combine accumulates in float32 inside the matmul.
    return torch.bmm(w.unsqueeze(1), slots.view(T, k, H)).squeeze(1)


def grouped_mm_why_not(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Optional[str]:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (needs torch >= 2.8)."
    if x.device.type != "cuda":
        return f"torch._grouped_mm runs on CUDA GPUs here; the inputs are on {x.device.type}."
    cap = torch.cuda.get_device_capability(x.device)
    if cap < (9, 0):
        return f"torch._grouped_mm needs compute capability 9.0 (Hopper) or newer; this GPU has {cap[0]}.{cap[1]}."
    if not (x.dtype == gate_up_proj.dtype == down_proj.dtype == torch.bfloat16):
        return (f"torch._grouped_mm runs in bfloat16; got x {x.dtype}, gate_up_proj {gate_up_proj.dtype}, "
                f"down_proj {down_proj.dtype}.")
    H, I2 = x.shape[1], gate_up_proj.shape[1]
    if H % 8 or (I2 // 2) % 8:
        return f"torch._grouped_mm needs 16-byte aligned rows: hidden ({H}) and intermediate ({I2 // 2}) sizes " \
               "must be multiples of 8."
    return None
