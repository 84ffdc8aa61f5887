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
  padded to whole blocks, become a causal :class:`~routed.BlockRoute` over the sorted slots (in a
  cluster, slot order is position order): the block-sparse kernels run it with only the diagonal
  blocks masked.

Under data-parallel training (``torch.distributed``) the routers of all processes keep one set of
centroids: the statistics of every update and of the initialisation are all-reduced, so each step
equals the single-process step over all processes' batches together (see :class:`KMeansRouter`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import cached_constants
from ..ops.nearest_centroid import EPS as _EPS  # F.normalize's
from ..ops.nearest_centroid import centroid_stats, commitment_sum, commitment_terms, gather_centroids, resolve_backend
from ..route import BlockRoute, RouteError, TokenRoute

__all__ = ["KMeansRouter", "TrainAssignment", "cluster_window_route", "cluster_window_mask", "cluster_ranks"]


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(F.normalize(x.float(), dim=-1), norms [..., 1])`` in float32, the norms kept for the callers
    that need them. A half-precision ``x`` is read as it is (the norm accumulates in float32 and the
    division promotes), not copied to float32 first."""
    if x.dtype == torch.float64:
        x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    return x / norm.clamp_min(_EPS), norm


class _CommitmentSum(torch.autograd.Function):
    """``sum over tokens of ||x_hat||^2 - 2 <x_hat, c>`` with ``x_hat = F.normalize(x.float())``, i.e.
    ``sum ||x_hat - c||^2 - sum ||c||^2``: ``c`` gets no gradient, so its norms are a constant the caller
    adds. Written out because autograd through ``F.normalize`` and the difference costs about a dozen
    full-size float32 kernels per tensor; this backward costs two (the normalisation's Jacobian folds
    into one per-token coefficient) and never materialises ``x_hat``."""

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor, norm: Optional[Tensor], cos: Optional[Tensor]) -> Tensor:
        ctx.dtype = x.dtype
        if x.dtype == torch.float64:
            x = x.float()  # float32 throughout, as F.normalize(x.float()) computes it
        if norm is None:
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        denom = norm.clamp_min(_EPS)
        if cos is None:
            cos = (x * c).sum(-1, keepdim=True) / denom  # x * c promotes to float32 inside the kernel
        ctx.save_for_backward(x, c, norm, denom, cos)
        return commitment_terms(norm, cos).sum()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, c, norm, denom, cos = ctx.saved_tensors
        # d/dx of |x_hat|^2 - 2 <x_hat, c> with x_hat = x / max(|x|, eps):
        #   |x| > eps:  (2 / |x|) (x_hat <x_hat, c> - c)   (|x_hat| = 1: that term is constant)
        #   |x| <= eps: (2 / eps) (x / eps - c)
        # both (2 / denom) (x * w / denom - c), with w = <x_hat, c> or 1.
        coef = cos.masked_fill(norm <= _EPS, 1.0) / denom
        t = torch.addcmul(c, x, coef, value=-1)  # c - x * coef, float32
        grad = torch.empty(x.shape, dtype=ctx.dtype, device=x.device)
        return torch.mul(t, g * -2 / denom, out=grad), None, None, None  # rounded once, to x's dtype


def _value_with_grad_of(value: Tensor, with_grad: Tensor) -> Tensor:
    """``value`` (no gradient) in the forward, ``with_grad``'s gradient in the backward."""
    return value + (with_grad - with_grad.detach())


class TrainAssignment(NamedTuple):
    """:meth:`KMeansRouter.train_assign`'s result: ``assignment [B, H, N]`` int64, ``centroids [H, C, D]``
    (float32, from before the EMA step), the keys' ``key_norm`` and ``key_cos [B, H, N]`` (float32) and
    whether the fused kernels ran (:meth:`KMeansRouter.commitment_after` uses the same backend)."""

    assignment: Tensor
    centroids: Tensor
    key_norm: Tensor
    key_cos: Tensor
    kernel: bool


def _mean_sq_norm(c: Tensor, assignment: Tensor) -> Tensor:
    """The mean over tokens of ``||c_a||^2`` (the commitment loss's centroid term): ``c [H, C, D]``
    float32, ``assignment [B, H, N]``; gathered from the ``[H, C]`` norms broadcast over the batch."""
    return c.square().sum(-1).unsqueeze(0).expand(assignment.shape[0], -1, -1).gather(2, assignment).mean()


def _commitment_sum(x: Tensor, c: Tensor, norm: Optional[Tensor] = None, cos: Optional[Tensor] = None) -> Tensor:
    """``sum ||x_hat - c||^2 - sum ||c||^2`` over the tokens of ``x [..., N, D]`` (any float dtype),
    ``c`` float32 and broadcast to ``x`` (no gradient). ``norm`` (``|x|`` in float32) and ``cos``
    (``<x_hat, c>``), both ``[..., N, 1]``, may come precomputed."""
    return _CommitmentSum.apply(x, c.detach(), norm, cos)


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
        sync_distributed: keep the centroids of all processes identical under data-parallel
            training (below). Turn it off when the processes should cluster on their own (they
            see different kinds of data, or the model is sharded so that ranks hold different
            routers).
        process_group: the ``torch.distributed`` group to synchronise over (default: the world).
        backend: the per-token work of :meth:`assign`, :meth:`update` and :meth:`train_step`
            (nearest centroid, cosines, cluster sums, the commitment loss's gradient):
            ``"triton"`` (one fused pass, :mod:`routed.ops.nearest_centroid`), ``"reference"``
            (PyTorch) or None (the kernel on CUDA unless ``ROUTED_KMEANS_KERNEL=0`` or
            deterministic algorithms are on).

    Buffers (saved with the model): ``centroids [heads, clusters, dim]`` (unit rows) and
    ``initialized`` (a bool scalar). The centroids stay float32 when the module is cast
    (``.to(torch.bfloat16)``, ``.half()``): in bf16 an EMA step of ``1 - decay = 0.001`` would round away.

    Data-parallel training: the centroids are buffers, so DDP's gradient all-reduce never reaches
    them, and its ``broadcast_buffers`` would only copy rank 0's over (the other ranks' batches
    lost). So when ``torch.distributed`` is initialised, ``sync_distributed`` is on, the group
    has more than one process and the module is in training mode, the router synchronises itself:

    * :meth:`update` all-reduces (sums) the per-cluster sums of the unit vectors before the EMA
      step, so every rank takes the step the single process would take over the concatenation of
      all ranks' batches, and all centroids stay identical (``broadcast_buffers`` may stay on or go).
    * The first call in training mode agrees on the state: if no rank is initialised yet, the
      Lloyd initialisation runs over all ranks' tokens (seeds picked from the concatenation in
      rank order, sums all-reduced each iteration), equal to the single-process one over the
      concatenation; if some rank is (a checkpoint, or a first use in evaluation), the lowest such
      rank broadcasts its centroids. Ranks may hold batches of different sizes.

    Every rank of the group must then call the router together (as DDP's forward does). In
    evaluation mode nothing is communicated (evaluation may run on one rank only), so a router
    first used in evaluation initialises from that rank's data; the next training call aligns
    the ranks as above. A single process never communicates nor adds a host sync.
    """

    def __init__(self, heads: int, dim: int, clusters: int, *, decay: float = 0.999, commitment: float = 1e-4,
                 init_iters: int = 10, sync_distributed: bool = True,
                 process_group: Optional[dist.ProcessGroup] = None, backend: Optional[str] = None):
        super().__init__()
        if clusters < 1 or heads < 1 or dim < 1:
            raise ValueError(f"heads, dim and clusters must be >= 1, got {heads}, {dim}, {clusters}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}.")
        self.heads, self.dim, self.clusters = heads, dim, clusters
        self.decay, self.commitment, self.init_iters = decay, commitment, init_iters
        self.sync_distributed, self.process_group = sync_distributed, process_group
        if backend not in (None, "triton", "reference"):
            raise ValueError(f"backend must be 'triton', 'reference' or None, got {backend!r}.")
        self.backend = backend
        self.register_buffer("centroids", F.normalize(torch.randn(heads, clusters, dim), dim=-1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._known_initialized = False  # a host mirror of the flag: no GPU sync per call once it is set
        self._ranks_agree = False  # whether the ranks have aligned their state (distributed training only)

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
        return torch.einsum("bhnd,hcd->bhnc", _unit(x.detach())[0], self.centroids.float())

    def assign(self, x: Tensor) -> Tensor:
        """``[B, H, N]`` int64: the nearest centroid of every vector (initialising first if needed)."""
        self.maybe_init(x)
        if self._kernel(x):
            return centroid_stats(x.detach(), self.centroids, backend="triton")[0]
        return self.similarities(x).argmax(-1)

    def _kernel(self, x: Tensor, want_sums: bool = False) -> bool:
        """Whether this call's per-token work runs on the fused kernels (see ``backend``)."""
        return resolve_backend(self.backend, x, self.centroids, want_sums) == "triton"

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # The loaded flag decides. Read now (one sync, at load time) rather than at the next call, so
        # a compiled model never meets a data-dependent branch on it; meta tensors are read later.
        self._known_initialized = self.initialized.device.type != "meta" and bool(self.initialized)
        self._ranks_agree = False  # ranks may have loaded different states: align them again

    def _sync_group(self) -> Optional[dist.ProcessGroup]:
        """The group to synchronise over, or ``None`` when there is nothing to synchronise (sync off,
        evaluation mode, ``torch.distributed`` absent or not initialised, a group of one). Host-only."""
        if not (self.sync_distributed and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None  # -1 (not a member) falls out too

    @torch.no_grad()
    def maybe_init(self, x: Tensor) -> None:
        """Initialise the centroids from ``x [B, H, N, D]`` if they never were (any mode); under
        distributed training, first make every rank's state agree (see the class docstring)."""
        group = self._sync_group()
        if group is not None and not self._ranks_agree:
            self._agree_across_ranks(x, group)
            return
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
        self._set_initialized(self._lloyd(xn, xn[:, seeds], None))

    def _lloyd(self, xn: Tensor, c: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        """``init_iters`` spherical Lloyd iterations from seeds ``c [H, C, D]`` over the unit vectors
        ``xn [H, T, D]``; with a ``group``, over the tokens of all its ranks (the sums all-reduced)."""
        h = torch.arange(self.heads, device=xn.device)[:, None]
        for _ in range(self.init_iters):
            members = torch.einsum("htd,hcd->htc", xn, c).argmax(-1)
            sums = torch.zeros_like(c).index_put_((h.expand_as(members), members), xn, accumulate=True)
            if group is not None:
                dist.all_reduce(sums, group=group)
            empty = sums.norm(dim=-1, keepdim=True) == 0
            c = torch.where(empty, c, F.normalize(sums, dim=-1))
        return c

    def _set_initialized(self, c: Tensor) -> None:
        self.centroids.copy_(c)
        self.initialized.fill_(True)
        self._known_initialized = True

    def _agree_across_ranks(self, x: Tensor, group: dist.ProcessGroup) -> None:
        """Make every rank of ``group`` hold the same initialised centroids (a collective, once).

        No rank initialised: Lloyd over the concatenation of all ranks' ``x`` (in rank order), as
        one process would run it. Else the lowest initialised rank broadcasts its centroids. The
        flags decide on the host here (one read, once per process: this path is distributed only).
        """
        self._check(x)
        dev, rank, world = self.centroids.device, dist.get_rank(group), dist.get_world_size(group)
        src = torch.where(self.initialized.to(dev), rank, world).to(torch.int64).reshape(1)
        dist.all_reduce(src, op=dist.ReduceOp.MIN, group=group)
        src = int(src.item())
        if src < world:
            dist.broadcast(self.centroids, src=dist.get_global_rank(group, src), group=group)
            self._set_initialized(self.centroids)
        else:
            xn = F.normalize(x.float(), dim=-1).transpose(0, 1).reshape(self.heads, -1, self.dim)  # [H, T, D]
            sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([xn.shape[1]], dtype=torch.int64, device=dev), group=group)
            sizes = [int(t.item()) for t in sizes]
            start, total = sum(sizes[:rank]), sum(sizes)
            if total == 0:
                raise RouteError("KMeansRouter cannot initialise its centroids: no rank has any tokens.")
            # The single-process seeds over the concatenation; each rank fills the ones it holds.
            c = torch.zeros(self.heads, self.clusters, self.dim, device=dev)
            for i in range(self.clusters):
                t = i * total // self.clusters - start
                if 0 <= t < xn.shape[1]:
                    c[:, i] = xn[:, t]
            dist.all_reduce(c, group=group)
            self._set_initialized(self._lloyd(xn, c, group))
        self._ranks_agree = True

    @torch.no_grad()
    def update(self, x: Tensor, assignment: Tensor) -> None:
        """One EMA step of the centroids towards the mean direction of their members.

        ``x [B, H, N, D]``, ``assignment [B, H, N]`` (from :meth:`assign`); clusters without
        members keep their centroid. Call in training only. Under distributed training the sums
        are all-reduced first: the step of all ranks' batches together (see the class docstring).
        """
        self._check(x)
        if self._kernel(x, want_sums=True):
            self._ema_from_sums(centroid_stats(x.detach(), self.centroids, assignment, want_sums=True,
                                               backend="triton")[3], x)
        else:
            self._ema_step(_unit(x)[0], assignment, x)

    @torch.no_grad()
    def _ema_step(self, xn: Tensor, assignment: Tensor, x: Tensor) -> None:
        """:meth:`update` from the unit vectors ``xn [B, H, N, D]`` (float32) of ``x``."""
        H, C, D = self.centroids.shape
        # index_add_ (atomic adds on CUDA; the sorted deterministic path under
        # torch.use_deterministic_algorithms): index_put_(accumulate=True) always sorts the B*H*N
        # indices first, 1.5 ms of a 3.9 ms Routing Transformer layer step at 32k tokens on the H200.
        flat = (_arange(H, xn.device).view(1, H, 1) * C + assignment).reshape(-1)
        sums = torch.zeros(H * C, D, device=xn.device, dtype=torch.float32)
        self._ema_from_sums(sums.index_add_(0, flat, xn.reshape(-1, D)).view(H, C, D), x)

    @torch.no_grad()
    def _ema_from_sums(self, sums: Tensor, x: Tensor) -> None:
        """The EMA step from the per-cluster sums ``[H, C, D]`` of this call's unit vectors of ``x``."""
        group = self._sync_group()
        if group is not None:
            self.maybe_init(x)  # the ranks agree on the centroids before they step together
            dist.all_reduce(sums, group=group)  # sums are additive: the statistics of the concatenation
        means, norms = _unit(sums)
        new = _unit(self.decay * self.centroids + (1 - self.decay) * means)[0]
        torch.where(norms > 0, new, self.centroids, out=self.centroids)  # clusters without members stay

    def commitment_loss(self, x: Tensor, assignment: Tensor) -> Tensor:
        """``commitment * mean ||x/|x| - centroid||^2`` (a scalar; gradients reach ``x`` only).

        ``x [B, H, N, D]``, ``assignment [B, H, N]``."""
        c, c_sq = self._assigned(assignment)
        return self.commitment * (_commitment_sum(x, c) / assignment.numel() + c_sq)

    def _assigned(self, assignment: Tensor) -> tuple[Tensor, Tensor]:
        """Every token's centroid ``[B, H, N, D]`` (float32, no gradient) and the mean of their
        squared norms (a scalar: the ``||c||^2`` term of the commitment loss)."""
        c = self.centroids.detach().float()
        return gather_centroids(c, assignment), _mean_sq_norm(c, assignment)

    def train_step(self, keys: Tensor, queries: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """What a training call of a routing layer does, sharing the unit vectors between the steps:
        :meth:`assign` the keys, their :meth:`commitment_loss` plus that of ``queries`` to the same
        clusters, then one :meth:`update` with the keys (the loss and assignment see the centroids
        from before the step). :meth:`train_assign` then :meth:`commitment_after`.

        Args:
            keys: ``[B, H, N, D]``.
            queries: ``[B, H, G, N, D]`` or None: ``G`` query vectors per key, each committed to its
                key's centroid (a GQA group's query heads); their mean loss counts like the keys'.
        Returns:
            ``(assignment [B, H, N] int64, loss)``: ``loss`` is ``commitment_loss(keys, a)`` plus
            the mean over ``g`` of ``commitment_loss(queries[:, :, g], a)``.
        """
        state = self.train_assign(keys)
        return state.assignment, self.commitment_after(state, keys, queries)

    def train_assign(self, keys: Tensor) -> "TrainAssignment":
        """:meth:`train_step` without its loss: assign the keys ``[B, H, N, D]`` and take the EMA step
        (no gradient). The returned state holds what :meth:`commitment_after` needs: the clusters, the
        centroids from before the step and the keys' norms and cosines. On the fused kernels one pass
        over the keys gives all of it with the EMA sums (no ``[B, H, N, C]`` similarities)."""
        self._check(keys)
        self.maybe_init(keys)
        kernel = self._kernel(keys, want_sums=True)
        c = self.centroids.clone()  # the loss (and the kernel's backward) see the centroids from before the step
        with torch.no_grad():
            if kernel:
                a, k_norm, k_cos, sums = centroid_stats(keys.detach(), c, want_sums=True, backend="triton")
                self._ema_from_sums(sums, keys)
            else:
                kn, k_norm = _unit(keys.detach())
                a = torch.einsum("bhnd,hcd->bhnc", kn, c).argmax(-1)  # as assign()
                # <k_hat, c> from the unit keys at hand (not from the similarities: a float32 matmul
                # may run in TF32, too coarse for the loss's gradient near convergence)
                k_cos = (kn * gather_centroids(c, a)).sum(-1)
                k_norm = k_norm.squeeze(-1)
                self._ema_step(kn, a, keys)
        return TrainAssignment(a, c, k_norm, k_cos, kernel)

    def commitment_after(self, state: "TrainAssignment", keys: Tensor, queries: Optional[Tensor] = None,
                         slot_tokens: Optional[Tensor] = None) -> Tensor:
        """The commitment loss of :meth:`train_step` for the keys (and queries) of a :meth:`train_assign`.

        Without ``slot_tokens``, ``keys [B, H, N, D]`` and ``queries [B, H, G, N, D]`` are the tensors
        given to :meth:`train_assign`. With ``slot_tokens [B, H, L]`` (the token in every slot, ``-1``
        at pads; :func:`cluster_window_route`'s), they are the same vectors in slot order, ``[B, H, L,
        D]`` and ``[B, H, G, L, D]``, as the clustered attention holds them anyway: the loss's backward
        then keeps those alive instead of the projections (a whole ``[B, N, heads, D]`` tensor each,
        of which the routed heads are a view). The value is the token-order loss; pad slots (copies
        of a real token) get a gradient, which the caller's way back from the slots must drop (as
        ``permute_rows`` does: it reads token slots only).
        """
        a, c = state.assignment, state.centroids
        c_sq = _mean_sq_norm(c, a)
        if slot_tokens is None:
            loss = self._rows_commitment(state, keys, a, state.key_norm, state.key_cos) / a.numel() + c_sq
            if queries is not None:
                loss = loss + self._rows_commitment(state, queries, a) / queries[..., 0].numel() + c_sq
            return self.commitment * loss
        if tuple(slot_tokens.shape) != tuple(keys.shape[:-1]) or slot_tokens.shape[:2] != a.shape[:2]:
            raise RouteError(f"slot_tokens must be [B, H, L] = {list(keys.shape[:-1])} for keys {list(keys.shape)}, "
                             f"got {list(slot_tokens.shape)}.")
        with torch.no_grad():
            token, pad = slot_tokens.clamp_min(0), slot_tokens < 0
            a_s, kn_s, kc_s = (t.gather(-1, token) for t in (a, state.key_norm, state.key_cos))
        # value from the tokens, gradient from the slots: the two sums differ only by the pads' terms
        loss = _value_with_grad_of(commitment_terms(state.key_norm, state.key_cos).sum(),
                                   self._rows_commitment(state, keys, a_s, kn_s, kc_s)) / a.numel() + c_sq
        if queries is not None:
            with torch.no_grad():
                qn_s, qc_s = self._rows_stats(state, queries.detach(), a_s)
                value = commitment_terms(qn_s, qc_s).masked_fill(pad.unsqueeze(2), 0).sum()
            grad_sum = self._rows_commitment(state, queries, a_s, qn_s, qc_s)
            loss = loss + _value_with_grad_of(value, grad_sum) / (a.numel() * queries.shape[2]) + c_sq
        return self.commitment * loss

    def _rows_stats(self, state: "TrainAssignment", x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """``|x|`` and ``<x_hat, c_a>`` (float32, shaped like ``x[..., 0]``) of ``x [B, H, (G,) N, D]``."""
        if state.kernel:
            return centroid_stats(x, state.centroids, a, backend="triton")[1:3]
        xn, norm = _unit(x)
        c = gather_centroids(state.centroids, a)
        return norm.squeeze(-1), (xn * (c.unsqueeze(2) if x.dim() == 5 else c)).sum(-1)

    def _rows_commitment(self, state: "TrainAssignment", x: Tensor, a: Tensor, norm: Optional[Tensor] = None,
                         cos: Optional[Tensor] = None) -> Tensor:
        """``sum ||x_hat - c_a||^2 - sum ||c_a||^2`` over the rows of ``x [B, H, (G,) N, D]`` (differentiable
        in ``x``) on the backend :meth:`train_assign` picked; ``norm``, ``cos`` its stats when at hand."""
        if state.kernel:
            return commitment_sum(x, state.centroids, a, norm, cos, backend="triton")
        c = gather_centroids(state.centroids, a)
        c = c.unsqueeze(2) if x.dim() == 5 else c
        return _commitment_sum(x, c, None if norm is None else norm.unsqueeze(-1),
                               None if cos is None else cos.unsqueeze(-1))

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
# Small index constants, built once per shape and device instead of a kernel per call (read only:
# shared by every call; see cached_constants).
@cached_constants(16)
def _arange(n: int, device: torch.device) -> Tensor:
    """``[n]`` int64 ``0 .. n-1``."""
    return torch.arange(n, device=device)


@cached_constants(16)
def _boundaries(rows: int, num_clusters: int, device: torch.device) -> Tensor:
    """``[rows, C + 1]`` int64 ``0 .. C`` in every row, contiguous (as searchsorted wants it)."""
    return torch.arange(num_clusters + 1, device=device).expand(rows, -1).contiguous()


@cached_constants(16)
def _slot_positions(length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[length]`` int32 slot positions for queries and, one later, for keys (the strict test)."""
    pos = torch.arange(length, device=device, dtype=torch.int32)
    return pos, pos + 1


def _sort_by_cluster(cid: Tensor, num_clusters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``cid [R, N]`` int64 sorted stably (by cluster, then position): ``(sorted ids, order, start,
    counts)``, with ``start [R, C]`` the first sorted index of every cluster and ``counts [R, C]`` its
    size. Both come from one binary search over the sorted ids (no scatter of ones, no cumsum)."""
    sorted_cid, order = torch.sort(cid, dim=-1, stable=True)
    bounds = torch.searchsorted(sorted_cid, _boundaries(cid.shape[0], num_clusters, cid.device))  # [R, C + 1]
    return sorted_cid, order, bounds[:, :-1], bounds.diff(dim=-1)


def cluster_ranks(cluster_ids: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Rank of every token inside its cluster (in position order) and the cluster sizes.

    Args:
        cluster_ids: ``[R, N]`` int cluster of every token (rows are independent).
    Returns:
        ``rank [R, N]`` int64 (how many earlier tokens share the cluster) and ``counts [R, C]``.
        A stable sort, O(N log N): no ``N x C`` one-hot.
    """
    R, N = cluster_ids.shape
    sorted_cid, order, start, counts = _sort_by_cluster(cluster_ids.long(), num_clusters)
    sorted_rank = _arange(N, cluster_ids.device) - start.gather(1, sorted_cid)
    return torch.empty_like(order).scatter_(1, order, sorted_rank), counts


def cluster_window_mask(q_clusters: Tensor, q_ranks: Tensor, q_pos: Tensor, kv_clusters: Tensor, kv_ranks: Tensor,
                        kv_pos: Tensor, window: int, *, strict: bool = False) -> Tensor:
    """``[R, Nq, Nk]`` bool: what :func:`cluster_window_route` lets each query see, written out
    (same cluster, key chunk at most one before the query's, key position <= query position, or
    < with ``strict``). Decoding with a KV cache uses it; inputs are ``[R, Nq]`` and ``[R, Nk]``."""
    same = q_clusters[:, :, None] == kv_clusters[:, None, :]
    near = torch.div(kv_ranks, window, rounding_mode="floor")[:, None, :] >= \
        torch.div(q_ranks, window, rounding_mode="floor")[:, :, None] - 1
    before = kv_pos[:, None, :] < q_pos[:, :, None] if strict else kv_pos[:, None, :] <= q_pos[:, :, None]
    return same & near & before


def cluster_window_route(cluster_ids: Tensor, num_clusters: int, window: int, *, strict: bool = False,
                         block_size: Optional[int] = None) -> tuple[BlockRoute, Tensor, Tensor]:
    """Causal clustered attention as a block route over the cluster-sorted token order.

    Each row's tokens are sorted by (cluster, position); every cluster starts on a block boundary
    and fills ``ceil(size / block_size)`` blocks (pad slots at its end). Within a cluster slot order
    is position order, so the route is causal in slot space: a query block of chunk ``t`` (the
    cluster's slots ``t * window .. (t + 1) * window - 1``) routes to the cluster's blocks from the
    start of chunk ``t - 1`` up to itself, and only the diagonal block needs a mask. So a query sees
    the earlier tokens of its cluster in its own chunk of ``window`` and in the chunk before, as
    :func:`cluster_window_mask` writes out, with no positions or segments for the kernels to read.
    Pad slots come after their cluster's tokens, so no real query sees a pad key; pad queries see
    real keys, so callers must give pad slots a zero output gradient (discard them, as
    ``permute_rows(..., zero_padding=True)`` on the way back does).

    Args:
        cluster_ids: ``[R, N]`` int cluster of every token (``R`` = batch x route heads).
        num_clusters: ``C``.
        window: ``w``, tokens per chunk.
        strict: a token does not see itself, only earlier tokens (shared query/key heads, whose own
            key would always score highest); the first token of each cluster then sees nothing
            (its output is zero, its log-sum-exp ``-inf``). Slot positions with keys one later.
        block_size: the route's block ``b``, a divisor of ``w``; default the largest power of two
            dividing ``w``, at most 64. Clusters are padded to whole blocks only (at most ``b - 1``
            pad slots each instead of ``w - 1``).
    Returns:
        ``(route, slot_tokens, token_slots)``: a causal :class:`~routed.BlockRoute` over ``L`` slots
        with ``[R, 1, L / b, 2 w / b]`` ids (rows past the last cluster route nowhere);
        ``slot_tokens [R, L]`` int64, the token in every slot (``-1`` at pad slots); ``token_slots
        [R, N]`` int64, the slot of every token (gather the results back with it).
        ``L = b * floor((N + C (b - 1)) / b)`` (at least ``b``) is fixed by the shapes (no device sync).
    """
    if cluster_ids.dim() != 2:
        raise RouteError(f"cluster_ids must be [rows, seq], got {list(cluster_ids.shape)}.")
    if window < 1:
        raise RouteError(f"window must be >= 1, got {window}.")
    b = min(window & -window, 64) if block_size is None else block_size
    if b < 1 or window % b:
        raise RouteError(f"block_size must divide the window ({window}), got {block_size}.")
    R, N = cluster_ids.shape
    dev = cluster_ids.device
    per_chunk = window // b
    nb = max(1, (N + num_clusters * (b - 1)) // b)
    L = nb * b
    sorted_cid, order, start, counts = _sort_by_cluster(cluster_ids.long(), num_clusters)
    blocks = torch.div(counts + b - 1, b, rounding_mode="floor")  # [R, C]
    ends = blocks.cumsum(-1)
    first = ends - blocks  # [R, C] each cluster's first block
    # slot of the i-th sorted token: i + (its cluster's first slot - its cluster's first sorted index)
    sorted_slot = (first * b - start).gather(1, sorted_cid) + _arange(N, dev)  # [R, N]
    token_slots = torch.empty_like(order).scatter_(1, order, sorted_slot)
    slot_tokens = torch.full((R, L), -1, dtype=torch.long, device=dev).scatter_(1, sorted_slot, order)
    # every block's cluster (C past the last cluster), and its first routed block: chunk t - 1's start
    j = _arange(nb, dev).expand(R, nb)
    cid = torch.searchsorted(ends, j.contiguous(), right=True)  # [R, nb]
    live = cid < num_clusters
    c0 = first.gather(1, cid.clamp_max(num_clusters - 1))
    chunk = torch.div(j - c0, per_chunk, rounding_mode="floor")
    lo = c0 + (chunk - 1).clamp_min(0) * per_chunk
    width = 2 * per_chunk
    n_ids = torch.where(live, j - lo + 1, 0)
    offs = _arange(width, dev)
    ids = torch.where(offs < n_ids[..., None], lo[..., None] + offs, -1)
    # strict: the causal test kv_pos <= q_pos on slot positions with keys one later reads kv < q
    positions, kv_positions = _slot_positions(L, dev) if strict else (None, None)
    route = BlockRoute(ids.to(torch.int32).view(R, 1, nb, width), n_ids.to(torch.int32).view(R, 1, nb), L, L, b, b,
                       causal=True, q_positions=positions, kv_positions=kv_positions, validate=False)
    return route, slot_tokens, token_slots
