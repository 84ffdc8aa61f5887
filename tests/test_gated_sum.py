"""The fused gated branch sum (NSA's gates) against float64 autograd, forward and backward, on
awkward shapes (token counts not a tile multiple, head dims not a power of two, one to four
branches, branches with different strides); outputs poisoned before every kernel run."""

import pytest
import torch

from routed.backends import BackendUnavailable
from routed.ops.gated_sum import gated_sum, gated_sum_reference
from routed.route import RouteError
from routed.testing import assert_close_rel, poisoned_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(2, 3, 37, 64, 3), (1, 2, 5, 48, 1), (1, 4, 70, 128, 4), (3, 1, 33, 16, 2), (1, 2, 1, 80, 3)]


def _inputs(B, H, N, D, G, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, N, G * H, generator=g) * 2).view(B, N, G, H)
    # odd branches token-major ([B, N, H, D] memory), as a transposed projection would be
    branches = [torch.randn(B, N, H, D, generator=g).transpose(1, 2) if i % 2 else torch.randn(B, H, N, D, generator=g)
                for i in range(G)]
    return [t.to(DEVICE, dtype).requires_grad_() for t in (z, *branches)]


@pytest.mark.parametrize("B,H,N,D,G", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_float64_forward_and_backward(B, H, N, D, G, dtype):
    z, *branches = _inputs(B, H, N, D, G, dtype)
    with poisoned_outputs():
        out = gated_sum(z, branches, backend="triton")
    ins64 = [t.detach().double().requires_grad_() for t in (z, *branches)]
    ref = gated_sum_reference(ins64[0], ins64[1:])
    # plain PyTorch in the inputs' dtype: the autograd ops the kernel replaces
    plain = sum(torch.sigmoid(z).permute(2, 0, 3, 1).unsqueeze(-1)[i] * o for i, o in enumerate(branches))
    assert_close_rel(out, ref, plain, floor=1e-6)
    assert out.stride()[1:3] == (D, H * D), "the output is laid out token-major"
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    # float64 gradients with respect to the float64 copies, under the same dout
    with poisoned_outputs():
        got = torch.autograd.grad(out, (z, *branches), dout)
    want = torch.autograd.grad(ref, ins64, dout.double())
    base = torch.autograd.grad(plain, (z, *branches), dout)
    for i, (x, r, b) in enumerate(zip(got, want, base)):
        assert x.dtype == dtype and x.shape == r.shape
        assert_close_rel(x, r, b, floor=1e-6, what="dz" if i == 0 else f"d branch {i - 1}")


def test_reference_backend_equals_the_kernel_forward_and_backward():
    z, *branches = _inputs(2, 2, 19, 32, 3, torch.float32, seed=4)
    want = gated_sum(z, branches, backend="reference")
    ref64 = gated_sum_reference(z.detach().double(), [o.detach().double() for o in branches])
    assert float((want.detach().double() - ref64).norm() / ref64.norm()) < 1e-6
    got = gated_sum(z, branches, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(got.square().sum(), (z, *branches))
    gb = torch.autograd.grad(want.square().sum(), (z, *branches))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    z, *branches = _inputs(1, 2, 8, 16, 3, torch.float32)
    with pytest.raises(RouteError, match=r"gate_logits must be a floating-point \[B, N, branches, H\] = \[1, 8, 3, 2\]"):
        gated_sum(z.reshape(1, 8, 6), branches)
    with pytest.raises(RouteError, match="one shape and dtype"):
        gated_sum(z, [branches[0], branches[1].half(), branches[2]])
    with pytest.raises(RouteError, match="1 to 4 tensors"):
        gated_sum(z, [])
    with pytest.raises(BackendUnavailable, match="unknown gated-sum backend"):
        gated_sum(z, branches, backend="cuda")


def test_triton_backend_raises_where_it_cannot_run(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("a CPU tensor outside the interpreter is the failing case; this machine runs the kernel on CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    z, *branches = _inputs(1, 2, 8, 16, 3, torch.float32)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        gated_sum(z, branches, backend="triton")


def test_kernel_traces_under_torch_compile_without_graph_breaks():
    z, *branches = _inputs(2, 2, 21, 32, 3, torch.float32, seed=7)

    def f(z, a, b, c):
        return gated_sum(z, [a, b, c], backend="triton")

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(z, *branches)
    want = f(z, *branches)
    torch.testing.assert_close(got, want)
    ga = torch.autograd.grad(got.square().sum(), (z, *branches))
    gb = torch.autograd.grad(want.square().sum(), (z, *branches))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
