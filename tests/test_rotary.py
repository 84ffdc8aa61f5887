"""The fused rotary embedding against float64, forward and backward, on awkward shapes (token counts
not a tile multiple, head dims whose half is not a power of two, a batch-1 cos/sin broadcast,
token-major views and head slices of a projection); outputs poisoned before every kernel run."""

import pytest
import torch

from routed.backends import BackendUnavailable
from routed.ops.rotary import apply_rotary, apply_rotary_reference
from routed.route import RouteError
from routed.testing import assert_close_rel, poisoned_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, H, N, D, layout, cos batch)
CASES = [(2, 3, 37, 64, "token_major", 2), (1, 2, 5, 80, "contiguous", 1), (2, 4, 70, 128, "head_slice", 2),
         (3, 1, 33, 16, "token_major", 1), (1, 2, 1, 32, "contiguous", 1)]


def _rope(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 5000, (b, n), generator=g).double()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.cat([pos[..., None] * inv] * 2, -1)
    return ang.cos(), ang.sin()


def _x(B, H, N, D, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "token_major":  # a projection's [B, N, H, D] output seen as [B, H, N, D]
        x = torch.randn(B, N, H, D, generator=g).transpose(1, 2)
    elif layout == "head_slice":  # the first H of 2H heads of such an output (the Routing Transformer's local heads)
        x = torch.randn(B, N, 2 * H, D, generator=g).transpose(1, 2)[:, :H]
    else:
        x = torch.randn(B, H, N, D, generator=g)
    return x.to(DEVICE, dtype).requires_grad_()


@pytest.mark.parametrize("B,H,N,D,layout,cb", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_float64_forward_and_backward(B, H, N, D, layout, cb, dtype):
    x = _x(B, H, N, D, layout, dtype)
    cos64, sin64 = _rope(cb, N, D, seed=N)
    cos, sin = cos64.to(DEVICE, torch.float32), sin64.to(DEVICE, torch.float32)
    with poisoned_outputs():
        out = apply_rotary(x, cos, sin, backend="triton")
    x64 = x.detach().double().requires_grad_()
    ref = apply_rotary_reference(x64, cos64.to(DEVICE), sin64.to(DEVICE))
    plain = apply_rotary_reference(x, cos, sin)  # PyTorch in the input's dtype: what the kernel replaces
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, ref, plain, floor=1e-6)
    if layout != "contiguous" and H > 1 and N > 1:
        assert out.stride()[1:3] == (D, H * D), "the output keeps the projection's token-major layout"
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with poisoned_outputs():
        (got,) = torch.autograd.grad(out, x, dout)
    (want,) = torch.autograd.grad(ref, x64, dout.double())
    (base,) = torch.autograd.grad(plain, x, dout)
    assert got.dtype == dtype
    assert_close_rel(got, want, base, floor=1e-6, what="dx")


def test_general_cos_sin_halves_forward_and_backward():
    """cos/sin whose two halves differ (not HF's duplicated halves): the kernel's rotation and its
    transpose are the general ones, not 'the same with -sin'."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 9, 32, generator=g, dtype=torch.float64).to(DEVICE)
    cos, sin = (torch.randn(2, 9, 32, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    x32 = x.float().requires_grad_()
    out = apply_rotary(x32, cos.float(), sin.float(), backend="triton")
    x64 = x.clone().requires_grad_()
    ref = apply_rotary_reference(x64, cos, sin)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    (got,) = torch.autograd.grad(out, x32, dout.float())
    (want,) = torch.autograd.grad(ref, x64, dout)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    x = torch.randn(1, 2, 8, 16)
    cos, sin = _rope(1, 8, 16, 0)
    with pytest.raises(RouteError, match=r"cos and sin must both be \[B, N, D\]"):
        apply_rotary(x, cos[:, :4], sin[:, :4])
    with pytest.raises(RouteError, match=r"takes x \[B, H, N, D\]"):
        apply_rotary(x[0], cos, sin)
    with pytest.raises(BackendUnavailable, match="unknown rotary backend"):
        apply_rotary(x, cos, sin, backend="cuda")
    with pytest.raises(BackendUnavailable, match="head dim must be even"):
        apply_rotary(*(torch.zeros(shape, device=DEVICE) for shape in ((1, 2, 8, 15), (1, 8, 15), (1, 8, 15))),
                     backend="triton")
    monkeypatch.setenv("ROUTED_ROTARY_KERNEL", "yes")
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="ROUTED_ROTARY_KERNEL must be 0 or 1"):
            apply_rotary(x.to(DEVICE), cos.to(DEVICE).float(), sin.to(DEVICE).float())


def test_triton_backend_raises_where_it_cannot_run(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("a CPU tensor outside the interpreter is the failing case; this machine runs the kernel on CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cos, sin = _rope(1, 8, 16, 0)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        apply_rotary(torch.randn(1, 2, 8, 16), cos.float(), sin.float(), backend="triton")


def test_kernel_traces_under_torch_compile_without_graph_breaks():
    x = _x(2, 3, 21, 32, "token_major", torch.float32, seed=7)
    cos, sin = (t.to(DEVICE).float() for t in _rope(2, 21, 32, 7))

    def f(x):
        return apply_rotary(x, cos, sin, backend="triton") * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    want = f(x)
    torch.testing.assert_close(got, want)
    (ga,) = torch.autograd.grad(got.square().sum(), x)
    (gb,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(ga, gb)
