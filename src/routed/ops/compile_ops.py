"""Host launchers that ``torch.compile`` sees as one opaque node.

Dynamo cannot trace a Triton launch made from our own launchers (argument specialisation, our
autotuning, the interpreter's host copies), so a routed layer whose router launches a kernel would
break the graph. :func:`compile_opaque` registers a launcher as a ``torch.library`` custom op with
a fake (shape-only) implementation and returns a function that calls the launcher directly in eager
mode (a custom op's dispatch costs host time an eager call should not pay) and the custom op while
compiling. The launchers take tensors, ints, floats, bools and strings and return tensors of shapes
known from their arguments, which is what lets a traced model keep the router inside its graph.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def compile_opaque(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: ``launcher`` (fully type-annotated, positional arguments, returning a tensor or a
    tuple of tensors) also registered as the custom op ``routed::<name>``, whose outputs ``fake``
    (the same arguments) allocates without computing; see the module docstring."""

    def wrap(launcher: Callable) -> Callable:
        op = torch.library.custom_op(f"routed::{name}", mutates_args=())(launcher)
        op.register_fake(fake)

        @functools.wraps(launcher)
        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else launcher(*args)

        call.custom_op = op
        return call

    return wrap
