"""Triton kernels of ddfast, shipped as ``ddfast.kernels``.

Launchers only: they know nothing of autograd. Triton is optional; ``available()`` says
whether it imports. On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from importlib.util import find_spec


def available() -> bool:
    """True when Triton can be imported."""
    return find_spec("triton") is not None
