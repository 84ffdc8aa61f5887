"""RoutingAttention (Routing Transformer layer): the definition in float64, any length, evaluation
before training, no causal leakage, KV-cache decoding equal to the full forward, checkpoints, a
training step that never waits for the device."""

import io
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.cache_utils import DynamicCache

from routed.env import triton_runs_on
from routed.layers.registry import attention_class
from routed.layers.lm_attention import apply_rotary
from routed.layers.routing_attention import RoutingAttention
from routed.testing import poisoned_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _config(**kw):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, kmeans_clusters=3,
                routing_window=8, routing_local_window=8)
    base.update(kw)
    return types.SimpleNamespace(**base)


def rope(n, d, batch=1, start=0, dtype=torch.float64):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.arange(start, start + n, dtype=torch.float64)[:, None] * inv[None]
    e = torch.cat([f, f], -1)
    return e.cos()[None].expand(batch, -1, -1).to(dtype), e.sin()[None].expand(batch, -1, -1).to(dtype)


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    return RoutingAttention(_config(**kw), 0).double().eval()


def _definition(layer, x, cos, sin):
    """The layer written out in float64 with Python loops for the cluster ranks and dense masks."""
    B, N, _ = x.shape
    d, G, kl = layer.head_dim, layer.group, layer.kv_local
    q = layer.q_proj(x).view(B, N, layer.hq, d).transpose(1, 2)
    k = layer.k_proj(x).view(B, N, -1, d).transpose(1, 2)
    if layer.shared_qk:  # a routed head's key is its own query, unit length (G == 1)
        k = torch.cat([k, F.normalize(q[:, kl:], dim=-1)], 1)
    v = layer.v_proj(x).view(B, N, layer.hkv, d).transpose(1, 2)
    qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    pos = torch.arange(N)
    out = torch.zeros(B, layer.hq, N, d, dtype=x.dtype)
    for h in range(layer.hq):
        hk = h // G
        for b in range(B):
            if hk < kl:
                qq, kk = qr[b, h], kr[b, hk]
                blk = pos // layer.local_window
                mask = (blk[None, :] >= blk[:, None] - 1) & (pos[None, :] <= pos[:, None])
            else:
                qq, kk = q[b, h], k[b, hk]
                cent = layer.kmeans.centroids[hk - kl]
                cl = (F.normalize(kk, dim=-1) @ cent.double().T).argmax(-1)
                rank = torch.tensor([int((cl[:t] == cl[t]).sum()) for t in range(N)])
                chunk = rank // layer.window
                before = pos[None, :] < pos[:, None] if layer.shared_qk else pos[None, :] <= pos[:, None]
                mask = (cl[None, :] == cl[:, None]) & (chunk[None, :] >= chunk[:, None] - 1) & before
            s = (qq @ kk.T) * d ** -0.5
            w = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
            out[b, h] = torch.where(mask.any(-1, keepdim=True), w, 0.0) @ v[b, hk]  # nothing seen: zeros
    return layer.o_proj(out.transpose(1, 2).reshape(B, N, -1))


def test_registered():
    assert attention_class("routing") is RoutingAttention


# The paper's shared query/key routed heads (one key per query head, so no GQA)
SHARED_QK = dict(routing_shared_qk=True, num_key_value_heads=4)


@pytest.mark.parametrize("kw", [{}, SHARED_QK], ids=["separate_qk", "shared_qk"])
@pytest.mark.parametrize("n", [37, 8, 1])
def test_matches_definition_at_any_length_before_training(n, kw):
    layer = _layer(kmeans_clusters=3, **kw)
    x = torch.randn(2, n, 64, dtype=torch.float64)
    cos, sin = rope(n, 16, 2)
    assert not bool(layer.kmeans.initialized)
    with poisoned_outputs():
        out, aux = layer(x, (cos, sin))  # evaluation before any training: initialises from x
    assert aux is None and bool(layer.kmeans.initialized)
    torch.testing.assert_close(out, _definition(layer, x, cos, sin), rtol=1e-10, atol=1e-10)


class _Adapted(torch.nn.Linear):
    """A stand-in for an adapter (LoRA) or quantised projection: its forward is not its weight's."""

    def forward(self, x):
        return super().forward(x) * 1.5 + 0.25


def test_projections_that_are_not_plain_linears_are_called():
    """The layer computes v_proj and o_proj per head group from their weights only for plain
    ``nn.Linear``s: an adapted projection's own forward runs, as in the definition (which calls them)."""
    layer = _layer(seed=6)
    for name in ("v_proj", "o_proj"):
        old = getattr(layer, name)
        new = _Adapted(old.in_features, old.out_features, bias=False).double()
        new.weight.data.copy_(old.weight.data)
        setattr(layer, name, new)
    x = torch.randn(2, 21, 64, dtype=torch.float64)
    cos, sin = rope(21, 16, 2)
    out, _ = layer(x, (cos, sin))
    torch.testing.assert_close(out, _definition(layer, x, cos, sin), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("routing_heads", [0, 2, 4])
def test_head_mixes(routing_heads):
    layer = _layer(routing_heads=routing_heads)
    x = torch.randn(1, 21, 64, dtype=torch.float64)
    cos, sin = rope(21, 16)
    out, _ = layer(x, (cos, sin))
    torch.testing.assert_close(out, _definition(layer, x, cos, sin), rtol=1e-10, atol=1e-10)


def test_dense_mode_is_full_causal_attention():
    layer = _layer(attention_dense=True)
    x = torch.randn(2, 19, 64, dtype=torch.float64)
    cos, sin = rope(19, 16, 2)
    out, aux = layer(x, (cos, sin))
    q = apply_rotary(layer.q_proj(x).view(2, 19, 4, 16).transpose(1, 2), cos, sin)
    k = apply_rotary(layer.k_proj(x).view(2, 19, 2, 16).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(2, 19, 2, 16).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, layer.o_proj(o.transpose(1, 2).reshape(2, 19, 64)), rtol=1e-10, atol=1e-10)
    assert aux is None and not bool(layer.kmeans.initialized)


def test_bad_routing_heads_say_how_to_fix():
    with pytest.raises(ValueError, match="multiple of the GQA group size"):
        RoutingAttention(_config(routing_heads=3), 0)
    with pytest.raises(ValueError, match="num_key_value_heads=2 must equal num_attention_heads=4"):
        RoutingAttention(_config(routing_shared_qk=True), 0)


def test_shared_qk_keys_are_the_unit_queries_and_never_the_token_itself():
    layer = _layer(seed=3, **SHARED_QK)
    assert layer.k_proj.out_features == layer.kv_local * layer.head_dim  # no key projection for routed heads
    x = torch.randn(1, 30, 64, dtype=torch.float64)
    cos, sin = rope(30, 16)
    layer(x, (cos, sin))
    # A token alone in its cluster, or first in it, gets nothing from the routed heads: with every
    # token in one cluster, token 0's routed output is zero and token 1 copies token 0's value.
    layer.kmeans.centroids.fill_(1.0 / 4)  # every centroid the same: argmax takes cluster 0 for every token
    captured = {}
    layer.o_proj.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    layer(x, (cos, sin))
    o = captured["in"].view(1, 30, 4, 16)[:, :, layer.kv_local:]  # routed heads
    v = layer.v_proj(x).view(1, 30, 4, 16)[:, :, layer.kv_local:]
    assert bool((o[:, 0] == 0).all())
    torch.testing.assert_close(o[:, 1], v[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, SHARED_QK], ids=["separate_qk", "shared_qk"])
def test_no_causal_leakage(kw):
    layer = _layer(seed=1, **kw)
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    cos, sin = rope(40, 16, 2)
    layer(x, (cos, sin))  # initialise the centroids (from this very input)
    out = layer(x, (cos, sin))[0]
    for t in (0, 17, 39):
        y = x.clone()
        y[:, t:] = torch.randn_like(y[:, t:]) * 3
        torch.testing.assert_close(layer(y, (cos, sin))[0][:, :t], out[:, :t], rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{}, SHARED_QK], ids=["separate_qk", "shared_qk"])
@pytest.mark.parametrize("prefill", [1, 13, 24])
def test_kv_cache_decoding_equals_full_forward(prefill, kw):
    layer = _layer(seed=2, **kw)
    n = 41
    x = torch.randn(2, n, 64, dtype=torch.float64)
    cos, sin = rope(n, 16, 2)
    full = layer(x, (cos, sin))[0]
    cache = DynamicCache()
    outs = [layer(x[:, :prefill], (cos[:, :prefill], sin[:, :prefill]), past_key_values=cache,
                  cache_position=torch.arange(prefill))[0]]
    t = prefill
    while t < n:  # steps of 1 and a chunk of 3
        step = 3 if t == prefill + 2 else 1
        sl = slice(t, min(n, t + step))
        outs.append(layer(x[:, sl], (cos[:, sl], sin[:, sl]), past_key_values=cache,
                          cache_position=torch.arange(sl.start, sl.stop))[0])
        t = sl.stop
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_decoding_reuses_the_cached_clusters_and_recovers_without_them():
    layer = _layer(seed=7)
    n = 30
    x = torch.randn(1, n, 64, dtype=torch.float64)
    cos, sin = rope(n, 16)
    full = layer(x, (cos, sin))[0]
    cache = DynamicCache()
    layer(x[:, :20], (cos[:, :20], sin[:, :20]), past_key_values=cache)
    seen = []
    assign = layer.kmeans.assign
    layer.kmeans.assign = lambda t: seen.append(t.shape[2]) or assign(t)
    outs = [layer(x[:, t:t + 1], (cos[:, t:t + 1], sin[:, t:t + 1]), past_key_values=cache)[0] for t in range(20, 25)]
    assert seen == [1] * 5  # only the new key is assigned; the cached ones are remembered
    # A copy of the layer that never saw this cache re-assigns the cached keys once, from the cache.
    twin = _layer(seed=8)
    twin.load_state_dict(layer.state_dict())
    seen.clear()
    assign2 = twin.kmeans.assign
    twin.kmeans.assign = lambda t: seen.append(t.shape[2]) or assign2(t)
    outs += [twin(x[:, t:t + 1], (cos[:, t:t + 1], sin[:, t:t + 1]), past_key_values=cache)[0] for t in range(25, n)]
    assert seen == [1, 25] + [1] * 4
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 20:], rtol=1e-10, atol=1e-10)


def test_training_moves_centroids_and_gives_commitment_loss():
    torch.manual_seed(3)
    layer = RoutingAttention(_config(), 0).train()
    x = torch.randn(2, 30, 64, requires_grad=True)
    cos, sin = rope(30, 16, 2, dtype=torch.float32)
    out, aux = layer(x, (cos, sin))
    c0 = layer.kmeans.centroids.clone()
    out2, aux2 = layer(x, (cos, sin))
    assert not torch.equal(layer.kmeans.centroids, c0)
    assert aux.dim() == 0 and float(aux.detach()) > 0
    (out2.square().mean() + aux2).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(layer.k_proj.weight.grad[-16:].norm()) > 0  # the routed heads' keys learn


def test_checkpoint_round_trip():
    layer = _layer(seed=4)
    x = torch.randn(1, 25, 64, dtype=torch.float64)
    cos, sin = rope(25, 16)
    layer.train()
    layer(x, (cos, sin))
    assert_round_trips(layer.eval(), _layer(seed=99))


def assert_round_trips(layer, fresh):
    """Save ``layer``'s state, load it into ``fresh`` (built differently): same outputs, bit for bit."""
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    y = torch.randn(1, 19, 64, dtype=torch.float64)
    cy = rope(19, 16)
    torch.testing.assert_close(fresh(y, cy)[0], layer(y, cy)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{}, SHARED_QK], ids=["separate_qk", "shared_qk"])
def test_triton_backend_matches_reference(kw):
    torch.manual_seed(5)
    cfg = _config(attention_backend="triton", routing_window=16, routing_local_window=16, **kw)
    tri = RoutingAttention(cfg, 0).to(DEVICE)
    ref = RoutingAttention(_config(attention_backend="reference", routing_window=16, routing_local_window=16, **kw),
                           0).to(DEVICE)
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(1, 50, 64, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope(50, 16, dtype=torch.float32))
    tri(x, (cos, sin))  # initialise, then copy the centroids over
    ref.load_state_dict(tri.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with poisoned_outputs():
        oa = tri(xa, (cos, sin))[0]
    ob = ref(xb, (cos, sin))[0]
    torch.testing.assert_close(oa, ob, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(oa)
    with poisoned_outputs():
        oa.backward(g)
    ob.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)


def test_in_the_routed_lm_decoding_equals_full_forward_and_training_works():
    """Both layers by name in the small routed LM: evaluation before training, KV-cache decoding
    (generate) equal to the full forward, a training step with the auxiliary losses."""
    import routed.layers.mosa  # noqa: F401  (registers "mosa")
    from routed.models.routed_lm import _CACHE_FIELD, RoutedLMConfig, RoutedLMForCausalLM

    torch.manual_seed(6)
    cfg = RoutedLMConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attention_types=["routing", "mosa"],
                         kmeans_clusters=3, routing_window=8, mosa_selection="threshold", mosa_sparsity=4)
    model = RoutedLMForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 30))
    full = model(ids).logits
    out = model(ids[:, :12], use_cache=True)
    steps = [out.logits]
    for t in range(12, 30):
        # (the output's cache field is "cache" in transformers 5, "past_key_values" before)
        out = model(ids[:, t:t + 1], cache=getattr(out, _CACHE_FIELD), use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    gen = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (2, 9)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[1].self_attn.router.weight.grad is not None


def test_mqar_generator():
    """benchmarks/mqar.py: every labelled position holds a repeated key and its label is that key's
    value from the opening pairs; keys and values come from their halves of the vocabulary."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("mqar", Path(__file__).resolve().parents[1] / "benchmarks/mqar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mqar = module.mqar

    x, y = mqar(4, 96, 100, 6, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 96)
    for i in range(4):
        pairs = x[i, :12].view(6, 2)
        assert bool((pairs[:, 0] < 50).all() and (pairs[:, 1] >= 50).all())
        kv = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
        asked = (y[i] != -100).nonzero().flatten()
        assert asked.numel() == 6 and {int(x[i, t]) for t in asked} == set(kv)
        assert all(kv[int(x[i, t])] == int(y[i, t]) for t in asked)
    with pytest.raises(ValueError, match="lower --kv-pairs"):
        mqar(1, 20, 100, 16, generator=torch.Generator())


class _HostWaits(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value (``.item()``,
    ``int()``, ``bool()``, ``.tolist()``), an output sized by values (``nonzero``, boolean-mask
    indexing) and copying a host tensor over (``torch.tensor(..., device=...)``)."""

    WAITS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select,
             torch.ops.aten.lift_fresh}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.WAITS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("routing_heads", [2, 4])
def test_training_step_never_waits_for_the_device(routing_heads):
    """A training forward+backward queues its kernels without waiting for the GPU (a wait there
    idles the GPU while the host catches up). The first call may read the ``initialized`` flag once
    (initialisation from data, once per process); the calls after it read nothing."""
    device = torch.device(DEVICE)
    if not triton_runs_on(device):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 (the reference backend reads the route)")
    torch.manual_seed(10)
    layer = RoutingAttention(_config(routing_heads=routing_heads, attention_backend="triton"), 0).to(device).train()
    x = torch.randn(2, 40, 64, device=device, requires_grad=True)
    cos, sin = (t.to(device) for t in rope(40, 16, 2, dtype=torch.float32))
    out, aux = layer(x, (cos, sin))  # initialises the centroids from x
    (out.square().mean() + aux).backward()
    with _HostWaits() as waits:
        out, aux = layer(x, (cos, sin))
        (out.square().mean() + aux).backward()
    assert waits.seen == []


@pytest.mark.parametrize("kw", [{}, SHARED_QK], ids=["separate_qk", "shared_qk"])
def test_training_forward_backward_match_the_definition(kw):
    """Training mode in float64: the output and its gradients as the definition; the commitment loss
    (computed in float32) and its gradients as ``mean ||x/|x| - c||^2`` over the routed keys and
    queries written out (shared query/key: the keys only, they are the queries), with the centroids
    from before the call's EMA step."""
    layer = _layer(seed=9, **kw)
    x = torch.randn(2, 37, 64, dtype=torch.float64)
    cos, sin = rope(37, 16, 2)
    layer(x, (cos, sin))  # initialise (evaluation), then train from these centroids
    layer.train()
    c0 = layer.kmeans.centroids.clone()
    params = [x.requires_grad_()] + list(layer.parameters())
    out, aux = layer(x, (cos, sin))
    assert not torch.equal(layer.kmeans.centroids, c0)  # the EMA stepped
    g_out = torch.autograd.grad(out.square().sum(), params, retain_graph=True)
    g_aux = torch.autograd.grad(aux, params, allow_unused=True)

    layer.kmeans.centroids.copy_(c0)
    want = _definition(layer, x, cos, sin)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(g_out, torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)

    B, N, kl, G, d = 2, 37, layer.kv_local, layer.group, layer.head_dim
    q = layer.q_proj(x).view(B, N, layer.hq, d).transpose(1, 2)[:, kl * G:].unflatten(1, (-1, G))
    k = q[:, :, 0] if layer.shared_qk else layer.k_proj(x).view(B, N, layer.hkv, d).transpose(1, 2)[:, kl:]
    cent = c0.double()
    kn, qn = F.normalize(k, dim=-1), F.normalize(q, dim=-1)
    cl = torch.einsum("bhnd,hcd->bhnc", kn, cent).argmax(-1)
    cc = cent[torch.arange(cent.shape[0]).view(1, -1, 1), cl]  # [B, Hk, N, d]
    q_term = 0.0 if layer.shared_qk else (qn - cc[:, :, None]).pow(2).sum(-1).mean()
    want_aux = layer.kmeans.commitment * ((kn - cc).pow(2).sum(-1).mean() + q_term)
    torch.testing.assert_close(aux.double(), want_aux, rtol=1e-5, atol=1e-9)
    for g, w in zip(g_aux, torch.autograd.grad(want_aux, params, allow_unused=True)):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


@pytest.mark.parametrize("kw", [{}, SHARED_QK, {"routing_heads": 4}], ids=["separate_qk", "shared_qk", "all_routed"])
def test_training_on_the_kernels_matches_the_reference(kw):
    """Training mode on the Triton kernels (attention, row moves, k-means passes) against the PyTorch
    backends: the output, the commitment loss (computed from the slot-order copies, pads included
    in the kernels' rows) and the gradients of each, and the centroids after the EMA step."""
    device = torch.device(DEVICE)
    if not triton_runs_on(device):
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    torch.manual_seed(11)
    sizes = dict(routing_window=16, routing_local_window=16, **kw)
    tri = RoutingAttention(_config(attention_backend="triton", router_backend="triton", **sizes), 0).to(device)
    ref = RoutingAttention(_config(attention_backend="reference", router_backend="reference", **sizes), 0).to(device)
    x = torch.randn(2, 45, 64, device=device)  # 45 tokens in 3 clusters: pad slots in every cluster's last block
    cos, sin = (t.to(device) for t in rope(45, 16, 2, dtype=torch.float32))
    tri(x, (cos, sin))  # initialise from x, then the same centroids for both
    ref.load_state_dict(tri.state_dict())
    tri.train(), ref.train()
    results = []
    for layer, poison in ((tri, True), (ref, False)):
        xi = x.clone().requires_grad_()
        ctx = poisoned_outputs() if poison else torch.enable_grad()
        with ctx:
            out, aux = layer(xi, (cos, sin))
            wrt = [xi] + [p for _, p in sorted(layer.named_parameters())]
            g_aux = torch.autograd.grad(aux, wrt, retain_graph=True, allow_unused=True)
            g_out = torch.autograd.grad(out, wrt, torch.randn_like(out, generator=torch.Generator(device).manual_seed(1)))
        results.append((out, aux, g_out, g_aux, layer.kmeans.centroids.clone()))
    (oa, la, goa, gla, ca), (ob, lb, gob, glb, cb) = results
    torch.testing.assert_close(oa, ob, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-9)
    assert float(la.detach()) > 0
    torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-6)
    for a, b in zip(goa, gob):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    for a, b in zip(gla, glb):
        if b is None or not b.any():
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))
    assert gla[0] is not None and gla[0].abs().max() > 0  # the commitment loss reaches the input
