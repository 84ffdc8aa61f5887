"""Training-free routed prefill for pretrained Hugging Face LLMs.

Importing this module registers an attention implementation named ``"routed"`` with transformers
(and the matching mask function, so the causal and padding masks are built as for SDPA), so::

    import routed.integrations.transformers as rt

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="routed")
    rt.configure(model, rt.RoutedPrefillPolicy(coverage=0.9))      # or model.set_attn_implementation("routed")
    out = model.generate(**inputs, max_new_tokens=32)

In every layer's prefill an estimator (:mod:`routed.routers.estimators`) scores the key blocks
from the layer's own queries and keys and returns a KV-head :class:`~routed.BlockRoute`; exact
attention then runs over the routed blocks (:func:`routed.routed_attention`). Everything that is
not a long causal self-attention prefill runs the model's usual SDPA path, for a reason that
:class:`PrefillRecorder` records: decode steps (unless ``decode="routed"``), prompts shorter than
``min_seq_len``, layers in ``dense_layers``, dropout, non-causal attention, and masks that are not
"causal + contiguous padding" (sliding windows, packed sequences, custom 4-D masks).

Padding: each batch row's valid tokens must be contiguous (left or right padding, as the
tokenizers make it). Rows are routed separately (rows with the same span together), so sink
blocks are a row's real first tokens. Pad *query* rows get zeros (their outputs are never used).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import routed_attention
from ..backends import backends as _backends
from ..route import RouteError
from ..routers.estimators import ESTIMATORS, BlockBudget, make_estimator

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    raise ImportError(f"routed.integrations.transformers needs transformers >= 4.53 (AttentionInterface and "
                      f"AttentionMaskInterface); install it with `pip install routed[hf]` ({e}).") from e

__all__ = ["RoutedPrefillPolicy", "PrefillRecorder", "configure", "register", "set_default_policy",
           "routed_attention_forward", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "routed"
DECODE_MAX_QUERIES = 16  # calls with at most this many queries after a cache are decode steps


@dataclass(frozen=True)
class RoutedPrefillPolicy:
    """How the ``"routed"`` attention implementation prefills.

    Attributes:
        estimator: ``"pooled"`` (mean-pooled block scores), ``"strided"`` (exact attention of
            ``samples`` strided queries per block) or ``"last"`` (of the prompt's last ``samples``
            queries).
        block_size: tokens per query and key block (a multiple of 16 for the Triton kernels).
        top_k / coverage: the budget, exactly one (default ``coverage=0.9``): key blocks per
            query block, or the fraction of the estimated attention mass to keep (adaptive per
            KV head and query block). ``coverage=1.0`` keeps every block (exact dense, as a route).
        sink_blocks: first key blocks always kept. local_blocks: key blocks ending at the
            diagonal always kept (>= 1). dense_last_blocks: final query blocks that attend to every
            block (the prompt's end, whose logits give the first generated token).
        dense_layers: layer indices that always run dense (early layers are often diffuse).
        min_seq_len: calls with fewer queries run dense (short prompts gain nothing).
        samples: sampled queries per block (``"strided"``) or in total (``"last"``); a power of two.
        head_reduce: ``"max"`` or ``"mean"`` over the query heads of a GQA group (KV-head
            routes), or ``"none"`` (a route per query head).
        backend: routed attention backend (``None``: automatic; named: it must run or it raises).
        estimator_backend: ``"triton"``, ``"reference"`` or None (Triton on CUDA).
        decode: ``"dense"`` (SDPA over the KV cache) or ``"routed"`` (route the decode queries
            too, with the same estimator and budget; the Triton backend's split decode path).
    """

    estimator: str = "pooled"
    block_size: int = 64
    top_k: Optional[int] = None
    coverage: Optional[float] = None
    sink_blocks: int = 1
    local_blocks: int = 1
    dense_last_blocks: int = 0
    dense_layers: tuple = ()
    min_seq_len: int = 1024
    samples: int = 8
    head_reduce: str = "max"
    backend: Optional[str] = None
    estimator_backend: Optional[str] = None
    decode: str = "dense"
    _estimator: Any = field(default=None, init=False, repr=False, compare=False)
    _decode_estimator: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.top_k is None and self.coverage is None:
            object.__setattr__(self, "coverage", 0.9)
        if self.estimator not in ESTIMATORS:
            raise RouteError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}.")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise RouteError(f"block_size must be a positive int (a multiple of 16 for the Triton kernels), got "
                             f"{self.block_size!r}.")
        if isinstance(self.dense_layers, int) or not all(isinstance(i, int) and i >= 0 for i in self.dense_layers):
            raise RouteError(f"dense_layers must be a sequence of layer indices >= 0, got {self.dense_layers!r}.")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))
        if not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise RouteError(f"min_seq_len must be an int >= 0 (prompts shorter than it run dense), got "
                             f"{self.min_seq_len!r}.")
        if self.decode not in ("dense", "routed"):
            raise RouteError(f"decode must be 'dense' (SDPA over the KV cache) or 'routed', got {self.decode!r}.")
        names = [b.name for b in _backends()]
        if self.backend is not None and self.backend not in names:
            raise RouteError(f"backend must be one of {names} or None (automatic), got {self.backend!r}.")
        if self.estimator_backend not in (None, "triton", "reference"):
            raise RouteError(f"estimator_backend must be 'triton', 'reference' or None, got {self.estimator_backend!r}.")
        # Builds (and so validates) the budget and the estimator once.
        budget = BlockBudget(top_k=self.top_k, coverage=self.coverage, sink_blocks=self.sink_blocks,
                             local_blocks=self.local_blocks, dense_last_blocks=self.dense_last_blocks)
        est = make_estimator(self.estimator, self.block_size, budget, samples=self.samples,
                             head_reduce=self.head_reduce, backend=self.estimator_backend)
        object.__setattr__(self, "_estimator", est)
        # Decode steps are no prompt end: their route keeps the budget without the dense last blocks.
        decode_est = est if not self.dense_last_blocks else make_estimator(
            self.estimator, self.block_size, dataclasses.replace(budget, dense_last_blocks=0), samples=self.samples,
            head_reduce=self.head_reduce, backend=self.estimator_backend)
        object.__setattr__(self, "_decode_estimator", decode_est)

    @property
    def router(self):
        """The estimator (a router: ``router(q, k, scale=...)`` -> KV-head BlockRoute)."""
        return self._estimator

    @property
    def decode_router(self):
        """The estimator of decode steps (``decode="routed"``): the same, less ``dense_last_blocks``."""
        return self._decode_estimator


@dataclass
class PrefillRecorder:
    """Collects one record per attention call: layer, shapes, path (``"routed"`` / ``"dense"``),
    the reason for a dense call, the route's density, and with ``compare_dense=True`` the relative
    error of the routed attention output against dense SDPA on the same q, k, v (doubles the cost).
    """

    compare_dense: bool = False
    records: list = field(default_factory=list)

    def clear(self) -> None:
        self.records.clear()

    def summary(self) -> dict:
        """Density over all prefill calls (dense calls count 1), weighted by their causal work;
        mean attention error over routed calls; the reasons of dense calls."""
        pre = [r for r in self.records if r["q_len"] > DECODE_MAX_QUERIES]
        work = [r["q_len"] * (2 * r["kv_len"] - r["q_len"] + 1) / 2 * r["batch"] for r in pre]
        dens = [r["density"] if r["path"] == "routed" else 1.0 for r in pre]
        errs = [r["attn_rel_err"] for r in pre if r.get("attn_rel_err") is not None]
        reasons: dict = {}
        for r in self.records:
            if r["path"] == "dense":
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"calls": len(self.records), "routed_calls": sum(r["path"] == "routed" for r in self.records),
                "prefill_density": sum(w * d for w, d in zip(work, dens)) / sum(work) if work else None,
                "attn_rel_err_mean": sum(errs) / len(errs) if errs else None,
                "attn_rel_err_max": max(errs) if errs else None, "dense_reasons": reasons}


_DEFAULT_POLICY: Optional[RoutedPrefillPolicy] = None


def set_default_policy(policy: Optional[RoutedPrefillPolicy]) -> None:
    """The policy of attention modules that :func:`configure` did not reach (None: the defaults)."""
    global _DEFAULT_POLICY
    if policy is not None and not isinstance(policy, RoutedPrefillPolicy):
        raise TypeError(f"policy must be a RoutedPrefillPolicy, got {type(policy).__name__}.")
    _DEFAULT_POLICY = policy


def _policy_of(module) -> RoutedPrefillPolicy:
    global _DEFAULT_POLICY
    policy = getattr(module, "routed_policy", None)
    if policy is None:
        if _DEFAULT_POLICY is None:
            _DEFAULT_POLICY = RoutedPrefillPolicy()
        policy = _DEFAULT_POLICY
    return policy


def register() -> None:
    """Register ``"routed"`` with transformers' attention and mask interfaces (idempotent; done on
    import). The mask function is SDPA's: without a registered one transformers builds no mask
    at all for an unknown implementation, and padding would silently be attended to."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, routed_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def configure(model, policy: Optional[RoutedPrefillPolicy] = None, *, recorder: Optional[PrefillRecorder] = None):
    """Switch ``model`` to the ``"routed"`` attention implementation with ``policy`` (default
    :class:`RoutedPrefillPolicy`) and an optional :class:`PrefillRecorder`. Returns the model."""
    policy = RoutedPrefillPolicy() if policy is None else policy
    if not isinstance(policy, RoutedPrefillPolicy):
        raise TypeError(f"policy must be a RoutedPrefillPolicy, got {type(policy).__name__}.")
    register()
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    found = 0
    for m in model.modules():
        if hasattr(m, "layer_idx") and any(isinstance(getattr(m, n, None), torch.nn.Linear)
                                           for n in ("q_proj", "qkv_proj", "c_attn", "query")):
            m.routed_policy, m.routed_recorder = policy, recorder
            found += 1
    if found == 0:
        raise RouteError(f"found no attention modules (with a layer_idx and a q_proj) in {type(model).__name__}; "
                         "use set_default_policy(policy) for models laid out differently.")
    return model


# --------------------------------------------------------------------------------------------------
# Masks: which calls are "causal self-attention over contiguous valid tokens"

_MASK_MEMO: dict = {}


def _row_spans(mask: Tensor, q_len: int, kv_len: int):
    """For a boolean ``[B, 1, q_len, kv_len]`` mask, each row's valid key span ``(start, end)``
    when the mask is exactly "keys in [start, end), causal by position" on every valid query row
    (queries are the last ``q_len`` positions); else a string saying why not. Memoised on the mask
    object: all layers of a forward share one."""
    key = (id(mask), mask.data_ptr(), mask._version, tuple(mask.shape))
    memo = _MASK_MEMO.get("last")
    if memo is not None and memo[0] == key and memo[1]() is mask:
        return memo[2]
    result = _analyse_mask(mask, q_len, kv_len)
    _MASK_MEMO["last"] = (key, weakref.ref(mask), result)
    return result


def _mask_why_not(mask: Tensor, q_len: int, kv_len: int) -> Optional[str]:
    """Why ``mask`` cannot be routed, from its type and shape alone (no look at its values), or None."""
    if mask.dtype != torch.bool:
        return "a floating-point (additive) mask"
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != q_len or mask.shape[3] != kv_len:
        return f"a mask of shape {list(mask.shape)} (expected [batch, 1, {q_len}, {kv_len}])"
    return None


def _analyse_mask(mask: Tensor, q_len: int, kv_len: int):
    why = _mask_why_not(mask, q_len, kv_len)
    if why is not None:
        return why
    valid = mask[:, 0, -1, :]  # the last query sees every valid key (causal, or a pad query after them)
    kpos = torch.arange(kv_len, device=mask.device)
    qpos = torch.arange(q_len, device=mask.device) + (kv_len - q_len)
    spans = []
    for b in range(mask.shape[0]):
        idx = valid[b].nonzero()
        if idx.numel() == 0:
            spans.append((0, 0))
            continue
        s, e = int(idx[0]), int(idx[-1]) + 1
        if int(valid[b, s:e].sum()) != e - s:
            return "padding inside a sequence (valid tokens not contiguous)"
        qrows = (qpos >= s) & (qpos < e)
        expect = (kpos[None, :] >= s) & (kpos[None, :] < e) & (kpos[None, :] <= qpos[:, None])
        if not bool((mask[b, 0][qrows] == expect[qrows]).all()):
            return "a mask that is not causal over the valid tokens (sliding window, packed sequences, custom)"
        spans.append((s, e))
    return spans


# --------------------------------------------------------------------------------------------------
# The attention function


def _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs) -> Tensor:
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, **kwargs)
    return out


def _why_dense(module, policy: RoutedPrefillPolicy, query: Tensor, key: Tensor, attention_mask, dropout: float,
               is_causal) -> Optional[str]:
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "non-causal attention"
    if dropout and module.training:
        return "attention dropout while training"
    decode = q_len <= DECODE_MAX_QUERIES and kv_len > q_len
    if decode and policy.decode == "dense":
        return "decode step"
    if not decode and q_len < policy.min_seq_len:
        return f"prompt shorter than min_seq_len={policy.min_seq_len}"
    layer = getattr(module, "layer_idx", None)
    if layer is not None and layer in policy.dense_layers:
        return "layer in dense_layers"
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        return f"attention mask of type {type(attention_mask).__name__}"
    return None


def _traced_routed(policy: RoutedPrefillPolicy, query: Tensor, key: Tensor, value: Tensor,
                   attention_mask: Optional[Tensor], scale: float) -> Tensor:
    """The routed path as ``torch.compile`` traces it, with no host look at the mask (transformers
    materialises the mask when compiling, so the eager path's span analysis would sync): the valid
    keys are the mask's last query row (it sees every valid key, after left or right padding), and
    padding becomes segment ids (valid 0, padding -1) that the kernels mask by. Rows are routed
    whole, at absolute block positions: unpadded inputs route as in eager mode; a padded row's
    blocks start at position 0 instead of at its first valid token, so its routes may differ (the
    attention stays causal and never reaches padding). ``key``/``value`` come trimmed of an empty static
    cache's tail, as on the eager path. Returns ``[B, Nq, Hq, Dv]``."""
    q_len, kv_len = query.shape[2], key.shape[2]
    decode = q_len <= DECODE_MAX_QUERIES and kv_len > q_len
    route = (policy.decode_router if decode else policy.router)(query, key, scale=scale)
    if attention_mask is not None:
        seg = torch.where(attention_mask[:, 0, -1, :], 0, -1).to(torch.int32)
        route = route.with_segments(seg[:, kv_len - q_len:], seg)
    out = routed_attention(query, key, value, route, scale=scale, backend=policy.backend)
    return out.transpose(1, 2).contiguous()


def _causal_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Exact causal attention with the queries as the last positions (bottom-right aligned)."""
    nq, nk = q.shape[2], k.shape[2]
    mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def routed_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                             dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs) -> tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface``) for ``attn_implementation="routed"``.

    Args:
        module: the model's attention module (its ``routed_policy`` / ``routed_recorder`` are used).
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (the KV cache included).
        attention_mask: None (plain causal) or SDPA's boolean ``[B, 1, Nq, Nk]`` mask.
        dropout, scaling, is_causal, kwargs: as for transformers' SDPA attention.
    Returns:
        ``(out [B, Nq, Hq, Dv], None)`` as transformers expects.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='routed' does not support attention logit softcapping (`softcap`); "
                         "use 'eager' for this model.")
    if kwargs.get("position_bias") is not None:
        raise ValueError("attn_implementation='routed' does not support an additive `position_bias`; use 'sdpa'.")
    policy = _policy_of(module)
    rec: Optional[PrefillRecorder] = getattr(module, "routed_recorder", None)
    B, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    layer = getattr(module, "layer_idx", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def record(path: str, reason: Optional[str] = None, density: Optional[float] = None,
               err: Optional[float] = None) -> None:
        if rec is not None:
            rec.records.append(dict(layer=layer, batch=B, q_len=q_len, kv_len=kv_len, path=path, reason=reason,
                                    density=density, attn_rel_err=err))

    why = _why_dense(module, policy, query, key, attention_mask, dropout, is_causal)
    if why is None and attention_mask is None and q_len > 1 and kv_len > q_len:
        # As SDPA: no mask with more keys than queries (> 1) is a prefill into an empty static cache,
        # whose unwritten tail the queries must not see.
        key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
    if why is None and torch.compiler.is_compiling():
        why = None if attention_mask is None else _mask_why_not(attention_mask, q_len, kv_len)
        if why is None:  # no host look at the mask; nothing recorded (a recorder is eager-only)
            return _traced_routed(policy, query, key, value, attention_mask, scale), None
    spans = None
    if why is None:
        if attention_mask is None:
            spans = [(0, kv_len)] * B
        else:
            spans = _row_spans(attention_mask, q_len, kv_len)
            if isinstance(spans, str):
                why, spans = spans, None
    if why is not None:
        record("dense", why)
        return _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs), None

    out = None
    densities, weights = [], []
    # Rows with the same span run as one batch; sinks and windows are then each row's real tokens.
    groups: dict = {}
    for b, span in enumerate(spans):
        groups.setdefault(span, []).append(b)
    whole = len(groups) == 1 and next(iter(groups)) == (0, kv_len)
    for (s, e), rows in groups.items():
        q0 = max(s - (kv_len - q_len), 0)
        q1 = e - (kv_len - q_len)
        if q1 <= q0:
            continue  # no valid query in these rows
        sel = slice(None) if whole else torch.tensor(rows, device=query.device)
        q = query[sel][:, :, q0:q1]
        k, v = key[sel][:, :, s:e], value[sel][:, :, s:e]
        if q.shape[2] < policy.min_seq_len and q.shape[2] > DECODE_MAX_QUERIES:
            o = _causal_sdpa(q, k, v, scale)
            d = 1.0
        else:
            decode = q.shape[2] <= DECODE_MAX_QUERIES and k.shape[2] > q.shape[2]
            router = policy.decode_router if decode else policy.router
            route = router(q, k, scale=scale)
            o = routed_attention(q, k, v, route, scale=scale, backend=policy.backend)
            d = route.density() if rec is not None else None
        if whole:
            out = o
        else:
            if out is None:
                out = query.new_zeros(B, query.shape[1], q_len, value.shape[-1])
            out[sel, :, q0:q1] = o
        if d is not None:
            densities.append(d)
            weights.append(len(rows) * (q1 - q0) * (2 * (e - s) - (q1 - q0) + 1) / 2)
    if out is None:
        out = query.new_zeros(B, query.shape[1], q_len, value.shape[-1])
    if rec is not None:
        density = sum(w * d for w, d in zip(weights, densities)) / max(sum(weights), 1.0) if densities else None
        err = None
        if rec.compare_dense:
            ref = _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
            ref = ref.transpose(1, 2)
            keep = torch.zeros(B, q_len, dtype=torch.bool, device=query.device)
            for b, (s, e) in enumerate(spans):
                keep[b, max(s - (kv_len - q_len), 0):max(e - (kv_len - q_len), 0)] = True
            diff = (out.float() - ref.float()).transpose(1, 2)[keep]
            err = float(diff.norm() / ref.float().transpose(1, 2)[keep].norm().clamp_min(1e-30))
        record("routed", density=density, err=err)
    return out.transpose(1, 2).contiguous(), None


register()
