"""The reference path for a sparse route uses memory that grows with the routed blocks, not seq^2.

Each measurement runs in a fresh interpreter and reads its peak resident memory (ru_maxrss), so
the numbers include every allocation torch makes on the CPU, forward and backward.
"""

import json
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from routed import routed_attention, sliding_window_route
    from routed.testing import dense_attention_f64, block_route_token_mask
    torch.manual_seed(0)
    n, mode = int(sys.argv[1]), sys.argv[2]
    q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
    route = sliding_window_route(n, block_size=64, window_blocks=4, causal=True)
    mask = block_route_token_mask(route) if mode == "dense" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "routed":
        out = routed_attention(q, k, v, route, backend="reference")
    else:  # the same attention through a dense masked seq x seq score matrix
        out, _ = dense_attention_f64(q, k, v, mask, 0.125, dtype=torch.float32)
    out.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mib": (after - before) / 1024}))
""")


def _peak_growth_mib(n: int, mode: str) -> float:
    res = subprocess.run([sys.executable, "-c", _SCRIPT, str(n), mode], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_growth_mib"]


@pytest.mark.slow
def test_reference_memory_grows_with_routed_blocks_not_seq_squared():
    n = 16384
    # One seq x seq float32 matrix is 1 GiB here; the routed blocks (256 query blocks x 4 key
    # blocks of 64 x 64 scores) are 16 MiB, and the gathered K/V 8 MiB each.
    routed = _peak_growth_mib(n, "routed")
    assert routed < 256, f"routed reference grew peak memory by {routed:.0f} MiB at seq {n}"
    # The measurement can see a seq x seq matrix: the dense computation of the same function must
    # blow through the same bound (if not, this test could not fail).
    dense = _peak_growth_mib(n, "dense")
    assert dense > 1024, f"dense control grew only {dense:.0f} MiB; the measurement is broken"
