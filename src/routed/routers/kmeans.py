"""Online spherical k-means routing (Routing Transformer, Roy et al., TACL 2021).

:class:`KMeansRouter` keeps, per head, ``C`` unit-norm centroids in the shared query/key space.
Tokens join the cluster of their nearest centroid (cosine similarity); the centroids follow the
data by an exponential moving average of their members, and a commitment loss pulls the vectors
towards their centroids. The centroids are initialised from the first batch the router sees
(a few Lloyd iterations), in training and in evaluation alike, and live in the module's buffers
(with the ``initialized`` flag), so ``state_dict`` round-trips and a fresh model can evaluate or
generate before any training step.

Two ways to turn clusters into a route:

* :meth:`KMeansRouter.balanced_groups` -- each centroid takes its top-``w`` nearest tokens (the
  paper's balanced clusters; a token may sit in several clusters or none). A
  :class:`~routed.TokenRoute`. A token's membership depends on every other token of the sequence,
  later ones included, so it suits bidirectional attention, not a causal language model.
* :func:`cluster_window_route` -- every token sits in the cluster of its nearest centroid, and
  inside its cluster (in position order) attends to the tokens of its own chunk of ``w`` and of
  the chunk before (at most ``2w`` keys). Everything a query sees depends only on itself and
  earlier tokens, so the causal language model neither leaks the future nor differs between a
  full forward and KV-cache decoding. The clusters, sorted by cluster then position and each
  padded to whole chunks, become a block-diagonal-band :class:`~routed.BlockRoute` with the
  original positions for the causal test: the block-sparse kernels run it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..route import BlockRoute, RouteError, TokenRoute

__all__ = ["KMeansRouter", "cluster_window_route", "cluster_window_mask", "cluster_ranks"]


class KMeansRouter(nn.Module):
    """Per-head online spherical k-means.

    Args:
        heads: independent k-means problems (one set of centroids per head).
        dim: vector size (the head dim).
        clusters: centroids per head ``C``.
        decay: EMA decay of the centroids (``0.999`` in the paper); 0 replaces them by the
            batch's cluster means.
        commitment: weight of the commitment loss ``mean ||x/|x| - centroid(x)||^2``.
        init_iters: Lloyd iterations of the initialisation from the first batch.

    Buffers (saved with the model): ``centroids [heads, clusters, dim]`` (unit rows) and
    ``initialized`` (a bool scalar). The centroids stay float32 when the module is cast
    (``.to(torch.bfloat16)``, ``.half()``): in bf16 an EMA step of ``1 - decay = 0.001`` would round away.
    """

    def __init__(self, heads: int, dim: int, clusters: int, *, decay: float = 0.999, commitment: float = 1e-4,
                 init_iters: int = 10):
        super().__init__()
        if clusters < 1 or heads < 1 or dim < 1:
            raise ValueError(f"heads, dim and clusters must be >= 1, got {heads}, {dim}, {clusters}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}.")
        self.heads, self.dim, self.clusters = heads, dim, clusters
        self.decay, self.commitment, self.init_iters = decay, commitment, init_iters
        self.register_buffer("centroids", F.normalize(torch.randn(heads, clusters, dim), dim=-1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._known_initialized = False  # a host mirror of the flag: no GPU sync per call once it is set

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}, clusters={self.clusters}, decay={self.decay}"

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.centroids.dtype != torch.float32:  # follow devices, not dtypes (see the class docstring)
            self.centroids = self.centroids.float()
        return self

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.heads or x.shape[-1] != self.dim:
            raise RouteError(f"KMeansRouter expects [batch, {self.heads}, seq, {self.dim}] vectors, got "
                             f"{list(x.shape)}.")

    def similarities(self, x: Tensor) -> Tensor:
        """``[B, H, N, C]`` cosine similarity of every vector ``x [B, H, N, D]`` to every centroid."""
        self._check(x)
        xn = F.normalize(x.detach().float(), dim=-1)
        return torch.einsum("bhnd,hcd->bhnc", xn, self.centroids.float())

    def assign(self, x: Tensor) -> Tensor:
        """``[B, H, N]`` int64: the nearest centroid of every vector (initialising first if needed)."""
        self.maybe_init(x)
        return self.similarities(x).argmax(-1)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False  # the loaded flag decides (read once, at the next call)

    @torch.no_grad()
    def maybe_init(self, x: Tensor) -> None:
        """Initialise the centroids from ``x [B, H, N, D]`` if they never were (any mode)."""
        if self._known_initialized:
            return
        if bool(self.initialized):
            self._known_initialized = True
            return
        self._check(x)
        xn = F.normalize(x.float(), dim=-1).transpose(0, 1).reshape(self.heads, -1, self.dim)  # [H, T, D]
        T = xn.shape[1]
        # Evenly strided tokens as seeds (deterministic; no draw from the global RNG).
        seeds = torch.div(torch.arange(self.clusters, device=x.device) * T, self.clusters, rounding_mode="floor")
        c = xn[:, seeds]
        for _ in range(self.init_iters):
            members = torch.einsum("htd,hcd->htc", xn, c).argmax(-1)
            sums = torch.zeros_like(c).index_put_(
                (torch.arange(self.heads, device=x.device)[:, None].expand_as(members), members), xn, accumulate=True)
            empty = sums.norm(dim=-1, keepdim=True) == 0
            c = torch.where(empty, c, F.normalize(sums, dim=-1))
        self.centroids.copy_(c)
        self.initialized.fill_(True)
        self._known_initialized = True

    @torch.no_grad()
    def update(self, x: Tensor, assignment: Tensor) -> None:
        """One EMA step of the centroids towards the mean direction of their members.

        ``x [B, H, N, D]``, ``assignment [B, H, N]`` (from :meth:`assign`); clusters without
        members keep their centroid. Call in training only.
        """
        xn = F.normalize(x.float(), dim=-1)
        H, C, D = self.centroids.shape
        sums = torch.zeros(H, C, D, device=x.device, dtype=torch.float32)
        h = torch.arange(H, device=x.device).view(1, H, 1).expand_as(assignment)
        sums.index_put_((h, assignment), xn, accumulate=True)
        means = F.normalize(sums, dim=-1)
        has = sums.norm(dim=-1, keepdim=True) > 0
        new = self.decay * self.centroids + (1 - self.decay) * means
        self.centroids.copy_(torch.where(has, F.normalize(new, dim=-1), self.centroids))

    def commitment_loss(self, x: Tensor, assignment: Tensor) -> Tensor:
        """``commitment * mean ||x/|x| - centroid||^2`` (a scalar; gradients reach ``x`` only)."""
        xn = F.normalize(x.float(), dim=-1)
        c = self.centroids.float()[torch.arange(self.heads, device=x.device).view(1, -1, 1), assignment]
        return self.commitment * (xn - c.detach()).pow(2).sum(-1).mean()

    def balanced_groups(self, x: Tensor, group_size: int, *, causal: bool = False) -> TokenRoute:
        """The paper's balanced clusters: each centroid takes its ``group_size`` nearest tokens.

        Args:
            x: ``[B, H, N, D]`` vectors (the keys, or shared queries/keys).
            group_size: ``w``; ``min(w, N)`` tokens per cluster.
        Returns:
            A :class:`~routed.TokenRoute` with ``token_ids [B, H, C, w]`` sorted by position (a
            token may sit in several groups or none). Not causal-safe: see the module docstring.
        """
        self.maybe_init(x)
        sim = self.similarities(x)  # [B, H, N, C]
        w = min(group_size, x.shape[2])
        ids = sim.transpose(-1, -2).topk(w, dim=-1).indices.sort(dim=-1).values
        return TokenRoute(ids, x.shape[2], causal=causal, validate=False)


# -------------------------------------------------------------------------------------------------
def cluster_ranks(cluster_ids: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Rank of every token inside its cluster (in position order) and the cluster sizes.

    Args:
        cluster_ids: ``[R, N]`` int cluster of every token (rows are independent).
    Returns:
        ``rank [R, N]`` int64 (how many earlier tokens share the cluster) and ``counts [R, C]``.
        A stable sort, O(N log N): no ``N x C`` one-hot.
    """
    R, N = cluster_ids.shape
    cid = cluster_ids.long()
    order = torch.sort(cid, dim=-1, stable=True).indices  # by cluster, then position
    counts = torch.zeros(R, num_clusters, dtype=torch.long, device=cid.device)
    counts.scatter_add_(1, cid, torch.ones_like(cid))
    start = counts.cumsum(-1) - counts  # first sorted index of every cluster
    sorted_pos = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=cid.device).expand(R, N))
    return sorted_pos - start.gather(1, cid), counts


def cluster_window_mask(q_clusters: Tensor, q_ranks: Tensor, q_pos: Tensor, kv_clusters: Tensor, kv_ranks: Tensor,
                        kv_pos: Tensor, window: int) -> Tensor:
    """``[R, Nq, Nk]`` bool: what :func:`cluster_window_route` lets each query see, written out
    (same cluster, key chunk at most one before the query's, key position <= query position).
    Decoding with a KV cache uses it; inputs are ``[R, Nq]`` and ``[R, Nk]``."""
    same = q_clusters[:, :, None] == kv_clusters[:, None, :]
    near = torch.div(kv_ranks, window, rounding_mode="floor")[:, None, :] >= \
        torch.div(q_ranks, window, rounding_mode="floor")[:, :, None] - 1
    return same & near & (kv_pos[:, None, :] <= q_pos[:, :, None])


def cluster_window_route(cluster_ids: Tensor, num_clusters: int, window: int) -> tuple[BlockRoute, Tensor, Tensor]:
    """Causal clustered attention as a block route over the cluster-sorted token order.

    Each row's tokens are sorted by (cluster, position); every cluster starts on a block boundary
    and fills ``ceil(size / window)`` blocks of ``window`` slots (pad slots in between). Query block
    ``j`` routes to key blocks ``j - 1`` and ``j``; segment ids (the cluster; a segment of its own
    for every pad slot) keep queries inside their cluster and the original positions give the
    causal test. So a query sees the earlier tokens of its cluster in its own chunk of ``window``
    and in the chunk before, as :func:`cluster_window_mask` writes out.

    Args:
        cluster_ids: ``[R, N]`` int cluster of every token (``R`` = batch x route heads).
        num_clusters: ``C``.
        window: ``w``, tokens per chunk (the block size of the route).
    Returns:
        ``(route, slot_tokens, token_slots)``: a causal :class:`~routed.BlockRoute` over ``L``
        slots, shared by all rows, with ``[R, L]`` positions and segments; ``slot_tokens [R, L]``
        int64, the token in every slot (``-1`` at pad slots); ``token_slots [R, N]`` int64, the
        slot of every token (gather the results back with it). ``L = window * min(N, floor((N + C (w - 1)) / w))``
        is fixed by the shapes (no device sync), at most ``N + C (w - 1)`` rounded to whole blocks.
    """
    if cluster_ids.dim() != 2:
        raise RouteError(f"cluster_ids must be [rows, seq], got {list(cluster_ids.shape)}.")
    if window < 1:
        raise RouteError(f"window must be >= 1, got {window}.")
    R, N = cluster_ids.shape
    dev = cluster_ids.device
    cid = cluster_ids.long()
    rank, counts = cluster_ranks(cid, num_clusters)
    blocks = torch.div(counts + window - 1, window, rounding_mode="floor")  # [R, C]
    block_start = blocks.cumsum(-1) - blocks
    slot = block_start.gather(1, cid) * window + rank  # [R, N]
    nb = max(1, min(N, (N + num_clusters * (window - 1)) // window))
    L = nb * window
    slot_tokens = torch.full((R, L), -1, dtype=torch.long, device=dev)
    slot_tokens.scatter_(1, slot, torch.arange(N, device=dev).expand(R, N))
    live = slot_tokens >= 0
    positions = slot_tokens.clamp_min(0).to(torch.int32)
    seg_of_pad = -1 - torch.arange(L, device=dev)
    segments = torch.full((R, L), 0, dtype=torch.long, device=dev)
    segments.scatter_(1, slot, cid)
    segments = torch.where(live, segments, seg_of_pad).to(torch.int32)
    j = torch.arange(nb, device=dev, dtype=torch.int32)
    ids = torch.stack([j - 1, j], -1)
    ids[0] = torch.tensor([0, -1], dtype=torch.int32, device=dev)
    counts_r = torch.full((nb,), 2, dtype=torch.int32, device=dev)
    counts_r[0] = 1
    route = BlockRoute(ids.view(1, 1, nb, 2), counts_r.view(1, 1, nb), L, L, window, window, causal=True,
                       q_positions=positions, kv_positions=positions, q_segments=segments, kv_segments=segments,
                       validate=False)
    return route, slot_tokens, slot
