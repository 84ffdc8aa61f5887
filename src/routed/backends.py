"""Backend registry: who can run a routed attention call, and why the others cannot.

A backend is a name, a check that returns ``None`` when it can run a call (or a sentence saying
why not), and a function ``run(q, k, v, route, scale) -> (out, lse)``. Automatic choice walks the
registry in preference order and logs why each faster backend was rejected; a backend asked for
by name that cannot run raises :class:`BackendUnavailable` with that sentence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

logger = logging.getLogger("routed")

WhyNot = Callable[[Tensor, Tensor, Tensor, object], Optional[str]]
Run = Callable[[Tensor, Tensor, Tensor, object, float], "tuple[Tensor, Tensor]"]


class BackendUnavailable(RuntimeError):
    """A backend that was asked for cannot run this call."""


def kernel_or_reference(op: str, backend: Optional[str], why_not: Callable[[], Optional[str]],
                        auto: Callable[[], bool]) -> str:
    """``"triton"`` or ``"reference"`` for an op with one Triton kernel beside its PyTorch reference.

    ``backend`` is checked: an unknown name raises, and so does ``"triton"`` when ``why_not()`` gives a
    reason. None takes the kernel when ``auto()`` (the op's own switch: a CUDA tensor, an environment
    flag; asked only then) holds and ``why_not()`` gives none, else the reference."""
    if backend not in (None, "triton", "reference"):
        raise BackendUnavailable(f"unknown {op} backend {backend!r}; choose 'triton', 'reference' or None.")
    if backend == "triton":
        why = why_not()
        if why is not None:
            raise BackendUnavailable(f"{op} backend 'triton' cannot run this call: {why}.")
        return backend
    if backend is None:
        return "triton" if auto() and why_not() is None else "reference"
    return backend


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int  # higher is tried first by automatic choice
    why_not: WhyNot
    run: Run
    description: str = ""
    # Extra reasons to pass this backend over in automatic choice only (it still runs when named).
    auto_why_not: Optional[WhyNot] = None


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def backends() -> list[Backend]:
    """Registered backends, most preferred first."""
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def explain_backends(q: Tensor, k: Tensor, v: Tensor, route) -> list[tuple[str, Optional[str]]]:
    """For every backend, most preferred first, ``(name, None)`` if automatic choice could take it
    for this call, else ``(name, reason)``."""
    return [(b.name, _auto_reason(b, q, k, v, route)) for b in backends()]


def _auto_reason(b: Backend, q: Tensor, k: Tensor, v: Tensor, route) -> Optional[str]:
    """Why automatic choice passes ``b`` over for this call, or None if it may take it."""
    reason = b.why_not(q, k, v, route)
    if reason is None and b.auto_why_not is not None:
        reason = b.auto_why_not(q, k, v, route)
    return reason


def select_backend(q: Tensor, k: Tensor, v: Tensor, route, backend: Optional[str]) -> Backend:
    if backend is not None:
        if backend not in _REGISTRY:
            raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {sorted(_REGISTRY)} or None "
                                     "for automatic choice.")
        chosen = _REGISTRY[backend]
        reason = chosen.why_not(q, k, v, route)
        if reason is not None:
            raise BackendUnavailable(f"backend {backend!r} cannot run this call: {reason}")
        return chosen
    for b in backends():
        reason = _auto_reason(b, q, k, v, route)
        if reason is None:
            logger.debug("routed: chose backend %r", b.name)
            return b
        logger.debug("routed: backend %r rejected: %s", b.name, reason)
    raise BackendUnavailable("no backend can run this call: "
                             + "; ".join(f"{n}: {r}" for n, r in explain_backends(q, k, v, route)))
