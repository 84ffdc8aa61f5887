"""Helpers for testing routed ops: float64 dense references, poisoning, dtype-relative tolerances.

The dense references here build ``seq x seq`` masks from first principles (not through the route's
own helpers), so a test compares two independent computations.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from .route import BlockRoute, TokenRoute

_POISON = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Inside this context, kernels fill freshly allocated outputs with NaN before writing them,
    so an element a kernel forgets to write fails the comparison instead of passing as zero."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def new_output(shape, *, dtype, device) -> Tensor:
    """Allocate an op's output: uninitialised normally, NaN-filled under :func:`poisoned_outputs`
    (integer outputs: the dtype's most negative value, which no id or count takes)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(dtype).min)
    return t


def _expand_heads(x: Tensor, hq: int) -> Tensor:
    """``[B, H, ...]`` with H in {1, Hkv, Hq} -> ``[B, Hq, ...]`` (GQA: each kv head serves hq/H query heads)."""
    h = x.shape[1]
    return x.expand(x.shape[0], hq, *x.shape[2:]) if h == 1 else x.repeat_interleave(hq // h, dim=1)


def block_route_token_mask(route: BlockRoute) -> Tensor:
    """``[B_r, H_r, Nq, Nk]`` bool: which key each query sees, built straight from the id lists."""
    Nq, Nk = route.q_len, route.kv_len
    qb = torch.arange(Nq, device=route.device) // route.q_block_size
    kb = torch.arange(Nk, device=route.device) // route.kv_block_size
    ids = route.kv_block_ids.long()[:, :, qb]  # [B, H, Nq, K]
    live = torch.arange(ids.shape[-1], device=route.device) < route.kv_block_counts.long()[:, :, qb, None]
    mask = ((ids[..., None] == kb) & live[..., None]).any(-2)  # [B, H, Nq, Nk]
    if route.causal:
        qp = route.q_positions if route.q_positions is not None else torch.arange(Nq, device=route.device) + Nk - Nq
        kp = route.kv_positions if route.kv_positions is not None else torch.arange(Nk, device=route.device)
        qp, kp = qp.long().reshape(-1, 1, Nq, 1), kp.long().reshape(-1, 1, 1, Nk)
        mask = mask & (kp <= qp)
    if route.q_segments is not None:
        qs = route.q_segments.long().reshape(-1, 1, Nq, 1)
        ks = route.kv_segments.long().reshape(-1, 1, 1, Nk)
        mask = mask & (qs == ks)
    return mask


def dense_attention_f64(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                        dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Masked softmax attention over a dense ``[B|1, H|Hkv|1, Nq, Nk]`` mask, computed in ``dtype``
    (float64 for the ground truth; the inputs' dtype for a plain-PyTorch baseline).

    Rows with nothing visible give zeros and ``lse = -inf``. Differentiable.
    """
    hq = q.shape[1]
    q, k, v = q.to(dtype), _expand_heads(k.to(dtype), hq), _expand_heads(v.to(dtype), hq)
    mask = _expand_heads(mask, hq)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return p @ v, lse


def token_route_dense_f64(q: Tensor, k: Tensor, v: Tensor, route: TokenRoute, scale: float,
                          dtype: torch.dtype = torch.float64) -> Tensor:
    """Float64 output of a TokenRoute computed as one dense masked attention per group, summed
    with the route's weights (the definition, written out)."""
    B, hq, N, _ = q.shape
    ids = route.token_ids.long()
    out = torch.zeros(B, hq, N, v.shape[-1], dtype=dtype, device=q.device)
    for g in range(route.num_groups):
        gid = ids[:, :, g]  # [Br, Hr, S]
        member = torch.zeros(*gid.shape[:2], N + 1, dtype=torch.bool, device=q.device)
        member.scatter_(-1, torch.where(gid < 0, N, gid), True)
        member = member[..., :N]
        mask = member[..., :, None] & member[..., None, :]
        if route.causal:
            mask = mask & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        o, _ = dense_attention_f64(q, k, v, mask, scale, dtype)
        w = torch.zeros(*gid.shape[:2], N + 1, dtype=dtype, device=q.device)
        gw = torch.ones_like(gid, dtype=dtype) if route.weights is None else route.weights[:, :, g].to(dtype)
        w.scatter_(-1, torch.where(gid < 0, N, gid), gw)
        out = out + o * _expand_heads(w[..., :N], hq).unsqueeze(-1)
    return out


def _err_norm(x: Tensor, ref: Tensor) -> float:
    """``||x - ref||`` in float64 over finite entries of ``ref``; inf if ``x`` has a NaN or differs
    from ``ref`` where ``ref`` is infinite (an ``lse`` of ``-inf`` must be exactly ``-inf``)."""
    x, ref = x.detach().double(), ref.detach().double()
    if bool(torch.isnan(x).any()):
        return float("inf")
    fin = torch.isfinite(ref)
    if bool((x[~fin] != ref[~fin]).any()) or not bool(torch.isfinite(x[fin]).all()):
        return float("inf")
    return float((x[fin] - ref[fin]).norm())


def _scale_norm(ref: Tensor) -> float:
    """Norm used to make errors relative: ``||ref||``, but at least ``sqrt(numel)`` (entries of
    order one) so that an all-zero reference does not turn rounding noise into an infinite ratio."""
    ref = ref.detach().double()
    fin = ref[torch.isfinite(ref)]
    return max(float(fin.norm()), max(fin.numel(), 1) ** 0.5)


def rel_err(x: Tensor, ref: Tensor) -> float:
    """Relative error ``||x - ref|| / ||ref||`` (see :func:`_scale_norm` for zero references)."""
    return _err_norm(x, ref) / _scale_norm(ref)


def assert_close_rel(x: Tensor, ref: Tensor, baseline: Optional[Tensor] = None, *, factor: float = 3.0,
                     floor: float = 1e-6, what: str = "output") -> None:
    """Assert ``rel_err(x, ref) <= factor * rel_err(baseline, ref) + floor``.

    ``baseline`` is the same quantity computed by plain PyTorch in the same dtype, so the tolerance
    follows what that dtype can do rather than a hand-picked number.
    """
    err = rel_err(x, ref)
    base = 0.0 if baseline is None else rel_err(baseline, ref)
    tol = factor * base + floor
    assert err <= tol, f"{what}: relative error {err:.3e} exceeds {tol:.3e} (plain PyTorch gets {base:.3e})"


def assert_grads_close_rel(out: Tensor, ref: Tensor, base: Tensor, inputs: tuple, dout: Tensor, *,
                           names: tuple = ("dq", "dk", "dv"), **kwargs) -> None:
    """Gradients of ``out`` (the op under test, its backward run with poisoned outputs), ``ref``
    (float64) and ``base`` (plain PyTorch in the inputs' dtype) w.r.t. ``inputs`` under the same
    ``dout``: each of the op's must pass :func:`assert_close_rel` against float64 with ``base``
    setting the tolerance."""
    with poisoned_outputs():
        got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, inputs, dout.double())
    plain = torch.autograd.grad(base, inputs, dout)
    for name, x, r, b in zip(names, got, want, plain):
        assert_close_rel(x, r, b, what=name, **kwargs)


def random_qkv(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype, seed: int, dv: Optional[int] = None,
               device="cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Seeded ``q [b, hq, nq, d]``, ``k [b, hkv, nk, d]``, ``v [b, hkv, nk, dv or d]`` on ``device``,
    requiring gradients: the kernels' test inputs."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n, dd: torch.randn(b, h, n, dd, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return mk(hq, nq, d), mk(hkv, nk, d), mk(hkv, nk, dv or d)


def random_mask_route(b: int, h: int, nq: int, nk: int, bq: int, bk: int, causal: bool, density: float, seed: int,
                      positions: Optional[str] = None, device="cpu") -> BlockRoute:
    """A seeded random block route of about ``density`` of the blocks, on ``device``; ``positions``:
    None (default positions), ``"permuted"`` (one permutation of the key positions, the queries the
    last ``nq`` of them) or ``"batched"`` (a permutation per batch entry)."""
    g = torch.Generator().manual_seed(seed + 100)
    mask = torch.rand(b, h, math.ceil(nq / bq), math.ceil(nk / bk), generator=g) < density
    qp = kp = None
    if positions == "permuted":
        perm = torch.randperm(nk, generator=g).to(torch.int32)
        kp, qp = perm, perm[nk - nq:] if nq <= nk else None
    elif positions == "batched":
        perm = torch.stack([torch.randperm(nk, generator=g) for _ in range(b)]).to(torch.int32)
        kp, qp = perm, perm[:, nk - nq:]
    route = BlockRoute.from_block_mask(mask, q_len=nq, kv_len=nk, q_block_size=bq, kv_block_size=bk,
                                       causal=causal, q_positions=qp, kv_positions=kp)
    return route.to(device)
