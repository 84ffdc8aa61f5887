"""Mixture-of-experts layer: an :class:`~routed.routers.experts.ExpertRouter` plus SwiGLU experts
run through :func:`~routed.ops.expert_dispatch.expert_mlp`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..ops.expert_dispatch import expert_mlp
from ..route import RouteError
from ..routers.experts import ExpertRouter, RouterOutput

__all__ = ["RoutedMoE", "moe_balance_loss"]


class RoutedMoE(nn.Module):
    """Routed mixture of SwiGLU experts.

    ``y = sum_j w_j * expert_{e_j}(x)`` over the experts the router picks for each token. The
    expert weights use Hugging Face's layout (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
    so they load from and into Mixtral/Qwen-MoE checkpoints as they are.

    Args:
        hidden_size, intermediate_size: ``H`` and each expert's ``I``.
        num_experts, top_k: ``E`` experts, ``k`` per token.
        router: ``"token_choice"``, ``"expert_choice"``, ``"similarity"`` or ``"attention"``;
            other router options (``score_order``, ``capacity_factor``, ``causal``, ``mix``,
            ``balance_bias_rate``, ``router_backend`` (the fused route kernel or PyTorch), ...) pass
            through ``router_kwargs``.
        aux_loss_coef, z_loss_coef: weights of the Switch and z losses in :attr:`balance_loss`
            (0 leaves a loss out; both are reported in :attr:`last` either way).
        backend: dispatch backend (None = automatic; see
            :func:`routed.ops.expert_dispatch.explain_dispatch_backends`).
        fused: the dispatch's Triton kernels around the GEMMs (None = on CUDA GPUs).

    After each call, :attr:`last` holds the :class:`~routed.routers.experts.RouterOutput` (route,
    logits, probs, losses, load, entropy) and :attr:`balance_loss` the weighted loss to add to the
    training loss (None when both coefficients are 0).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int = 2, *,
                 router: str = "token_choice", aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 backend: Optional[str] = None, fused: Optional[bool] = None, **router_kwargs):
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_coef, self.z_loss_coef, self.backend, self.fused = aux_loss_coef, z_loss_coef, backend, fused
        self.router = ExpertRouter(hidden_size, num_experts, top_k, method=router, **router_kwargs)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size ** -0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size ** -0.5)
        self.last: Optional[RouterOutput] = None
        self.balance_loss: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, backend={self.backend!r}")

    def forward(self, x: Tensor, *, q: Optional[Tensor] = None, k: Optional[Tensor] = None,
                attn_weights: Optional[Tensor] = None, past_probs: Optional[Tensor] = None,
                past_features: Optional[Tensor] = None) -> Tensor:
        """``x [B, N, H]`` or ``[T, H]`` -> the same shape. The attention router needs the preceding
        attention layer's ``q``/``k`` (``[B, heads, N, D]``) or ``attn_weights`` (``[B, heads, N, N]``).

        ``past_probs [B, T, E]`` and (similarity router) ``past_features [B, T, d]`` continue sequences
        whose first ``T`` tokens earlier calls routed (KV-cache decoding): the concatenated
        :attr:`last` ``.gate_probs`` / ``.features`` of those calls; the attention router's ``k`` (or
        ``attn_weights``) then covers all ``T + N`` tokens. See
        :meth:`~routed.routers.experts.ExpertRouter.forward`."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise RouteError(f"x must be [batch, seq, {self.hidden_size}] or [tokens, {self.hidden_size}], "
                             f"got {list(x.shape)}.")
        out = self.router(x, q=q, k=k, attn_weights=attn_weights, past_probs=past_probs, past_features=past_features)
        self.last = out
        loss = None
        if self.aux_loss_coef:
            loss = self.aux_loss_coef * out.aux_loss
        if self.z_loss_coef:
            z = self.z_loss_coef * out.z_loss
            loss = z if loss is None else loss + z
        self.balance_loss = loss
        flat = x.reshape(-1, self.hidden_size)
        y = expert_mlp(flat, out.route, self.gate_up_proj.to(x.dtype), self.down_proj.to(x.dtype),
                       backend=self.backend, fused=self.fused)
        return y.view(x.shape)


def moe_balance_loss(model: nn.Module) -> Optional[Tensor]:
    """Sum of the :attr:`RoutedMoE.balance_loss` of every MoE layer in ``model`` after its last
    forward (None if no layer has one): add it to the training loss."""
    losses = [m.balance_loss for m in model.modules() if isinstance(m, RoutedMoE) and m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else None
