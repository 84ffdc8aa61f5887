"""What this machine has: versions, devices, and which backends can run (``routed info``)."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # an optional dependency that is absent or broken
        return None


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command that wrote a result, for its header: ``python`` and ``argv`` (default
    ``sys.argv``) with the device tool's output folder written ``$OUT`` and any other absolute path
    cut to its last part, so results carry no machine's folders."""
    out = os.environ.get("OUT")

    def clean(a: str) -> str:
        key, eq, value = a.partition("=") if a.startswith("--") and "=" in a else ("", "", a)
        if out and value.startswith(out.rstrip("/") + "/"):
            value = "$OUT/" + value[len(out.rstrip("/")) + 1:]
        elif out and value.rstrip("/") == out.rstrip("/"):
            value = "$OUT"
        elif os.path.isabs(value):
            value = Path(value).name
        return key + eq + (value if value.startswith("$OUT") else shlex.quote(value))

    return " ".join(["python"] + [clean(a) for a in (sys.argv if argv is None else argv)])


def machine_header() -> dict[str, Any]:
    """Versions and hardware, written at the top of every benchmark result."""
    cuda = torch.cuda.is_available()
    header: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "routed": _version("routed"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        # the knobs that change which kernels and configs ran (ROUTED_AUTOTUNE, ROUTED_TMA, ...)
        "routed_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ROUTED_")},
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        header.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count,
                      gpu_capability=f"{props.major}.{props.minor}")
    return header


def env_switch(name: str, default: bool) -> bool:
    """A ``0``/``1`` environment switch (``default`` when unset); any other value raises."""
    flag = os.environ.get(name, "1" if default else "0")
    if flag not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {flag!r}.")
    return flag == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: a CUDA GPU, or the CPU in Triton's
    interpreter (``TRITON_INTERPRET=1``, set before importing routed; exact and slow, for tests)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def triton_why_not(t: torch.Tensor) -> Optional[str]:
    """None if routed's Triton kernels can take ``t`` (triton importable, a device they run on, a float
    dtype they support), else the reason; each kernel family adds its own shape limits."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); install it with `pip install routed[triton]`"
    if not triton_runs_on(t.device):
        return (f"tensors are on {t.device.type}; Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1, set "
                "before importing routed, to run them on the CPU for testing)")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {t.dtype} is not supported (use bfloat16, float16 or float32)"
    return None


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def info() -> dict[str, Any]:
    """Everything ``routed info`` prints."""
    from .attention import available_backends_for

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "machine": machine_header(),
        "optional": {m: _version(m) for m in ("triton", "transformers", "timm", "matplotlib", "safetensors")},
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "backends": {dev: {name: ("ok" if why is None else f"unavailable: {why}")
                           for name, why in available_backends_for(dev)} for dev in devices},
    }
