"""Native Sparse Attention (Yuan et al., 2025) as a registered LM attention layer (``"nsa"``).

Three branches over the same queries, keys and values, mixed by learned gates:

1. **compressed**: keys and values of overlapping blocks (``nsa_compress_block`` tokens every
   ``nsa_compress_stride``) are compressed to one key and one value each by a learned linear map
   of the whole block (initialised to mean pooling; it sees the order of the tokens inside the
   block). Every query attends to the compressed blocks that end at or before it.
2. **selected**: :class:`~routed.routers.blocks.NSASelectionRouter` turns the compressed branch's
   attention probabilities into the ``nsa_top_n`` key blocks of ``attention_block_size`` tokens each
   query block keeps (shared by the query heads of a KV group; first ``nsa_sink_blocks`` blocks and
   ``nsa_local_blocks`` blocks ending at the diagonal always kept); exact attention runs over them
   on the block-sparse kernel.
3. **sliding window**: the last ``nsa_window_blocks`` key blocks (block granular).

``out = sigmoid(g_cmp) * o_cmp + sigmoid(g_slc) * o_slc + sigmoid(g_win) * o_win`` with the gates
a linear map of the layer's input, per query head (the paper's gated sum of branch outputs).
With ``attention_dense=True`` the module computes full causal attention with its q/k/v/o
projections (the compression, router and gates are unused): the same module, dense, for ablations.

Under a KV cache every step recompresses the cached keys and values (``O(kv_len)`` work per step,
small next to a prefill; caching the compressed blocks is not done yet).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import routed_attention
from ..route import BlockRoute
from ..routers.blocks import NSASelectionRouter, check_block_options, compressed_positions
from .lm_attention import LMAttention, _opt, block_window_route
from .registry import register_attention

__all__ = ["NSAAttention"]


@torch.no_grad()
def _mean_pool_init(lin: nn.Linear) -> None:
    """``[D, block * D]`` weight that averages the block's tokens: compression starts as mean pooling."""
    d = lin.out_features
    eye = torch.eye(d, dtype=lin.weight.dtype, device=lin.weight.device)
    lin.weight.copy_(eye.repeat(1, lin.in_features // d) * (d / lin.in_features))


@torch.no_grad()
def _zero_bias_init(lin: nn.Linear) -> None:
    """Small weights, zero bias: every gate starts near sigmoid(0) = 1/2."""
    lin.weight.normal_(0.0, 0.02)
    lin.bias.zero_()


@register_attention("nsa")
class NSAAttention(LMAttention):
    """NSA layer (see the module docstring). ``forward`` follows :mod:`routed.layers.registry`."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.block_size = _opt(config, "attention_block_size", 64)
        self.compress_block = _opt(config, "nsa_compress_block", 32)
        self.compress_stride = _opt(config, "nsa_compress_stride", 16)
        self.top_n = _opt(config, "nsa_top_n", 8)
        self.window_blocks = _opt(config, "nsa_window_blocks", _opt(config, "window_blocks", 4))
        sink, local = _opt(config, "nsa_sink_blocks", 1), _opt(config, "nsa_local_blocks", 2)
        check_block_options(block_size=self.block_size, top_k=self.top_n, sink_blocks=sink, local_blocks=local,
                            max_len=self.max_len, what="nsa_top_n")
        check_block_options(block_size=self.block_size, top_k=self.window_blocks, sink_blocks=0, local_blocks=1,
                            max_len=self.max_len, what="nsa_window_blocks")
        # The router checks that the stride divides the compressed and the selection blocks.
        self.router = NSASelectionRouter(self.block_size, self.top_n, compress_block=self.compress_block,
                                         compress_stride=self.compress_stride,
                                         q_block_size=getattr(config, "route_q_block_size", None),
                                         sink_blocks=sink, local_blocks=local, backend=self.router_backend)
        d, lb = self.head_dim, self.compress_block
        self.compress_k = nn.Linear(lb * d, d, bias=False)
        self.compress_v = nn.Linear(lb * d, d, bias=False)
        self.gate = nn.Linear(self.hidden_size, 3 * self.num_heads, bias=True)
        # A model's weight initialisation calls a module's ``routed_init`` instead of its default.
        self.compress_k.routed_init = self.compress_v.routed_init = _mean_pool_init
        self.gate.routed_init = _zero_bias_init
        for m in (self.compress_k, self.compress_v, self.gate):
            m.routed_init(m)

    def compress(self, x: Tensor) -> Tensor:
        """``[B, Hkv, N, D]`` keys or values -> ``[B, Hkv, Nc, D]`` compressed blocks (Nc may be 0)."""
        B, h, n, d = x.shape
        nc = compressed_positions(n, self.compress_block, self.compress_stride).numel()
        if nc == 0:
            return x.new_zeros(B, h, 0, self.compress_block * d)
        # unfold: [B, h, Nc, D, lb] (a view) -> token-major blocks [B, h, Nc, lb * D]
        blocks = x.unfold(2, self.compress_block, self.compress_stride).transpose(-1, -2)
        return blocks.reshape(B, h, nc, self.compress_block * d)

    def compressed_attention(self, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Every query against the compressed blocks that end at or before it: ``(out [B, Hq, Nq, D],
        lse [B, Hq, Nq])`` (zeros and ``-inf`` where none has ended yet)."""
        nq, nc = q.shape[2], k_cmp.shape[2]
        if nc == 0:
            return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        qpos = torch.arange(nq, device=q.device) + (kv_len - nq)
        kpos = compressed_positions(kv_len, self.compress_block, self.compress_stride, q.device)
        qbs, kbs = self.block_size, self.block_size
        nqb, nkb = -(-nq // qbs), -(-nc // kbs)
        # Every compressed block for every query block; causality by the blocks' end positions.
        ids = torch.arange(nkb, device=q.device, dtype=torch.int32).expand(1, 1, nqb, nkb).contiguous()
        counts = torch.full((1, 1, nqb), nkb, dtype=torch.int32, device=q.device)
        route = BlockRoute(ids, counts, nq, nc, qbs, kbs, causal=True, q_positions=qpos, kv_positions=kpos,
                           validate=False)
        return routed_attention(q, k_cmp, v_cmp, route, scale=self.scale, backend=self.backend, return_lse=True)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hidden: Tensor) -> Tensor:
        B, hq, nq, d = q.shape
        nk = k.shape[2]
        k_cmp, v_cmp = self.compress_k(self.compress(k)), self.compress_v(self.compress(v))
        o_cmp, lse_cmp = self.compressed_attention(q, k_cmp, v_cmp, nk)
        route = self.router(q, k_cmp, lse_cmp, nk, scale=self.scale)
        o_slc = routed_attention(q, k, v, route, scale=self.scale, backend=self.backend)
        window = block_window_route(nq, nk, self.block_size, self.window_blocks, q.device)
        o_win = routed_attention(q, k, v, window, scale=self.scale, backend=self.backend)
        g = torch.sigmoid(self.gate(hidden)).view(B, nq, 3, hq).permute(2, 0, 3, 1).unsqueeze(-1).to(q.dtype)
        return g[0] * o_cmp + g[1] * o_slc + g[2] * o_win

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", compress={self.compress_block}/{self.compress_stride}, "
                f"window_blocks={self.window_blocks}, router={self.router!r}")
