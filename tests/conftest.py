"""Test setup: without a CUDA GPU, Triton kernels run in the interpreter (exact, slow)."""

import os

import torch

# Must happen before routed (and with it triton.jit) is imported: the interpreter is chosen
# when a kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    import pytest

    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU: runs on the device machine, see benchmarks/"))
