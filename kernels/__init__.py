"""Triton kernels of ddfast, shipped as ``ddfast.kernels``.

Launchers only: they know nothing of autograd. Triton is optional; ``available()`` says
whether it imports. On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from importlib.util import find_spec

if __name__ == "kernels":
    # Reached as a top-level package: the checkout's root is on sys.path (an editable install
    # puts it there, as does running Python from the checkout). The name belongs to another
    # distribution, so behave as if this folder were not there.
    raise ModuleNotFoundError("No module named 'kernels' (ddfast's Triton kernels import as "
                              "ddfast.kernels)", name="kernels")


def available() -> bool:
    """True when Triton can be imported."""
    return find_spec("triton") is not None
