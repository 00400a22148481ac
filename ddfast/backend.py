"""The one place that decides which implementation runs an operation on a device.

Backends: ``"ref"`` (pure torch, ``ddfast.ref``), ``"cpp"`` (the compiled module on the CPU),
``"triton"`` (``ddfast.kernels``, on a GPU, or on the CPU under ``TRITON_INTERPRET=1``) and
``"cuda"`` (the compiled module's CUDA kernels). By default a CPU runs ``cpp`` and a GPU runs
``cuda``, then ``triton``; when neither fast path can run, ``ref`` runs after a one-time warning.
The GPU order is measured (``pytest bench --benchmark-only`` on an H200,
results/bench/h200/bench.md): the CUDA kernels beat the Triton ones on every operation at the
large shape, prune_adaptive by 21x; Triton stays the path for a GPU build without nvcc.
``DDFAST_BACKEND=ref|cpp|triton|cuda`` forces one backend and fails loudly when it cannot run.
"""

from __future__ import annotations

import os
import warnings
from importlib.util import find_spec

import torch

from ddfast import _ext
from ddfast.errors import ConfigError

__all__ = ["BACKENDS", "ENV_VAR", "OPS", "choose"]

ENV_VAR = "DDFAST_BACKEND"
BACKENDS = ("ref", "cpp", "triton", "cuda")
# The backends each operation has.
OPS: dict[str, tuple[str, ...]] = {
    "class_extremes": ("ref", "cpp", "triton", "cuda"),
    "insert_memory": ("ref", "cpp", "triton", "cuda"),
    "prune_adaptive": ("ref", "cpp", "triton", "cuda"),
    "similarity_degree": ("ref", "cpp", "triton", "cuda"),
}

_warned: set[tuple[str, str]] = set()  # (op, device type) already warned about a fallback


def _why_not(op_name: str, backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run ``op_name`` on ``device``, else the reason it cannot."""
    if backend not in OPS[op_name]:
        return f"{op_name} has no {backend} implementation (it has {', '.join(OPS[op_name])})"
    if backend == "ref":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on the CPU only, not on {device}"
        if not _ext.available():
            return "ddfast's compiled module is not built; run `pip install -e .` in the checkout"
        return None
    if backend == "triton":
        if find_spec("triton") is None:
            return "Triton is not installed; `pip install triton`"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU), not "
                f"{device}")
    if device.type != "cuda":
        return f"the cuda backend needs a CUDA device, not {device}"
    if not _ext.has_cuda():
        return ("ddfast was built without CUDA kernels; reinstall where nvcc is on PATH "
                "(DDFAST_CUDA=ON pip install -e .)")
    return None


def choose(op_name: str, device: torch.device | str) -> str:
    """The backend that runs ``op_name`` on ``device``: "cpp", "triton", "cuda" or "ref".

    Honours ``DDFAST_BACKEND`` (ConfigError when that backend cannot run here); otherwise picks
    the fastest that can run, and warns once per (op, device type) when that is "ref".
    """
    if op_name not in OPS:
        raise ValueError(f"unknown operation {op_name!r}; known: {sorted(OPS)}")
    device = torch.device(device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ConfigError(f"{ENV_VAR}={forced!r} is not a backend; use one of "
                              f"{', '.join(BACKENDS)}, or unset it to choose automatically")
        reason = _why_not(op_name, forced, device)
        if reason is not None:
            raise ConfigError(f"{ENV_VAR}={forced} cannot run {op_name} on {device}: {reason}; "
                              f"unset {ENV_VAR} to choose automatically")
        return forced
    preferred = ("cpp",) if device.type == "cpu" else ("cuda", "triton")
    reasons = []
    for backend in preferred:
        reason = _why_not(op_name, backend, device)
        if reason is None:
            return backend
        reasons.append(f"{backend}: {reason}")
    key = (op_name, device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"ddfast: {op_name} on {device.type} falls back to the slow pure-torch "
                      f"reference ({'; '.join(reasons)}). Build the extension with "
                      "`pip install -e .` (and install Triton for GPUs) to get the fast path.",
                      RuntimeWarning, stacklevel=2)
    return "ref"
