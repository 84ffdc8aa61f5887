"""Cached constant tensors (index maps, geometry-only routes), safe to share across grad modes."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def cached_constants(maxsize: int = 64) -> Callable[[F], F]:
    """``functools.lru_cache`` for functions that build tensors from their (hashable) arguments alone:
    routes of a fixed geometry, position maps. The body runs outside inference mode, so what it
    returns is a normal tensor even when the first call came from ``torch.inference_mode()`` (an
    inference tensor would make a later training step fail when autograd saves it). Callers must
    treat the results as read-only: every call with the same arguments shares them."""

    def wrap(fn: F) -> F:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

        return cached  # type: ignore[return-value]

    return wrap
