"""The graph-of-tokens routers never build the N x N similarity or attention matrix: their mixing
runs through a fused attention kernel (blockwise forward and backward), never SDPA's math path."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from routed.routers.experts import attention_mixed_probs, similarity_mixed_probs

_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from routed.routers.experts import attention_mixed_probs, similarity_mixed_probs
    torch.manual_seed(0)
    n, method = int(sys.argv[1]), sys.argv[2]
    p = torch.rand(1, n, 8).softmax(-1)
    f, q, k = torch.randn(1, n, 64), torch.randn(1, 4, n, 32), torch.randn(1, 2, n, 32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if method == "similarity":
            similarity_mixed_probs(p, f, causal=True)
        else:
            attention_mixed_probs(p, q=q, k=k, causal=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mib": (after - before) / 1024}))
""")


def _peak_growth_mib(n: int, method: str) -> float:
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(n), method], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_growth_mib"]


@pytest.mark.parametrize("method", ["similarity", "attention"])
def test_mixing_memory_stays_far_below_one_n_by_n_matrix(method):
    n = 8192  # one n x n float32 matrix: 256 MiB (SDPA's math path builds several)
    growth = _peak_growth_mib(n, method)
    assert growth < 96, f"{method}: peak memory grew by {growth:.0f} MiB at {n} tokens"


@pytest.mark.parametrize("experts,dim", [(8, 64), (6, 16), (128, 32)])
def test_mixing_takes_a_fused_attention_kernel(monkeypatch, experts, dim):
    # The fused kernels want one head dim for q/k and v; the routers pad to it (fewer experts than
    # feature dims, or more). Record the backend SDPA would pick for every call the routers make.
    picked = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        picked.append(SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, kw.get("is_causal", False),
                                                          scale=kw.get("scale"))))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    p = torch.rand(2, 50, experts).softmax(-1)
    similarity_mixed_probs(p, torch.randn(2, 50, dim), causal=True)
    attention_mixed_probs(p, q=torch.randn(2, 4, 50, dim), k=torch.randn(2, 2, 50, dim), causal=True)
    assert len(picked) == 2 and SDPBackend.MATH not in picked, picked
