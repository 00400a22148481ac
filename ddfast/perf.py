"""What actually runs on the hardware: the attention kernel PyTorch picks, and matmul speed.

``attention_backends`` profiles one call and reads the scaled-dot-product-attention kernels that
ran, so a run can report (and a benchmark can assert) that flash or cuDNN attention was selected
rather than the math fallback. ``matmul_tflops`` measures the device's dense matmul rate, the
floor the speed benchmarks compare against.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["SDPA_KERNELS", "attention_backends", "compile", "matmul_tflops"]

# aten op name -> backend name, for every SDPA kernel PyTorch dispatches to.
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def attention_backends(fn: Callable[[], object]) -> list[str]:
    """The SDPA backends that ``fn()`` ran, sorted (empty if it ran no attention).

    One call of fn under ``torch.profiler``; on a GPU the device is synchronised around it.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    prof = torch.profiler.profile(activities=activities)
    with _native_stderr_silenced():
        prof.__enter__()
    try:
        with torch.no_grad():
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        with _native_stderr_silenced():
            prof.__exit__(None, None, None)
    return sorted({SDPA_KERNELS[e.name] for e in prof.events() if e.name in SDPA_KERNELS})


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native library prints ``USDT ... profiler_start`` / ``profiler_stop`` lines
    straight to file descriptor 2 when a profile starts and stops; a run's console does not need
    them. Only those two calls are silenced, never ``fn``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def compile(fn, **kwargs):
    """``torch.compile(fn, **kwargs)`` with an on-disk kernel cache of its own per
    ``ATEN_CPU_CAPABILITY``.

    Inductor picks its CPU vector width from that variable, but its cache does not tell kernels
    of different widths apart: after a run under another capability it can reuse a kernel of
    the wrong width and compute wrong sums (a float32 sum of squares came out halved under
    ``ATEN_CPU_CAPABILITY=avx2`` after a run without it). A cache folder per capability avoids
    that, inside ``TORCHINDUCTOR_CACHE_DIR`` when one is set."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        default = os.path.abspath(default_cache_dir())
        chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR", default)
        # torch writes its default into the variable on first use: that one is ours to change;
        # another folder gets a per-capability subfolder.
        if os.path.basename(chosen) != f"isa-{cap}":
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(chosen, f"isa-{cap}")
    return torch.compile(fn, **kwargs)


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                  size: int = 8192, repeats: int = 10) -> float:
    """Dense (size x size) @ (size x size) rate of the device in TFLOP/s, best of ``repeats``."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - began
        best = min(best, seconds)
    return 2 * size**3 / best / 1e12
