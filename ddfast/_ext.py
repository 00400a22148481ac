"""Thin torch-side wrappers of the compiled module ``ddfast._C``.

The extension is built without torch (see CMakeLists.txt), so these wrappers do what torch's C++
API would otherwise do: check every input, then pass raw pointers, sizes, strides and the CUDA
stream handle. The compiled module is optional: ``available()`` says whether it imported.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

_EPS = 1e-8


@lru_cache(maxsize=1)
def _module():
    try:
        from ddfast import _C
    except ImportError as exc:  # a source checkout that was never built
        return exc
    return _C


def available() -> bool:
    """True when the compiled module imports."""
    return not isinstance(_module(), ImportError)


def has_cuda() -> bool:
    """True when the compiled module carries the CUDA kernels."""
    return available() and bool(_module().has_cuda)


def _require():
    mod = _module()
    if isinstance(mod, ImportError):
        raise RuntimeError(
            "ddfast's compiled module is not built (" + str(mod) + "); install the package with "
            "`pip install .` (or `pip install -e .`) so the C++ extension is compiled"
        )
    return mod


def _check_items(items: torch.Tensor) -> None:
    if items.dim() != 2:
        raise ValueError(f"items must be a (K, D) matrix, got shape {tuple(items.shape)}")
    if items.dtype != torch.float32:
        raise ValueError(f"items must be float32, got {items.dtype}; call .float() first")
    if items.stride(1) != 1:
        raise ValueError("items must have contiguous rows (stride 1 along D); call .contiguous()")


def similarity_degree(items: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Similarity degree of each memory item, through the compiled module.

    items: (K, D) float32 with contiguous rows, on the CPU or (with the CUDA build) a GPU.
    Returns (K,) float32 with ``s_i = sum_j cos(m_i, m_j)``, the quantity the adaptive
    replacement rule maximises to choose the item to evict.
    """
    mod = _require()
    _check_items(items)
    rows, cols = items.shape
    out = torch.empty(rows, dtype=torch.float32, device=items.device)  # (K,)
    if rows == 0:
        return out
    if items.device.type == "cpu":
        threads = int(os.environ.get("DDFAST_NUM_THREADS", torch.get_num_threads()))
        mod.similarity_degree_cpu(
            items.data_ptr(), rows, cols, items.stride(0), eps, out.data_ptr(), threads
        )
        return out
    if items.device.type == "cuda":
        if not mod.has_cuda:
            raise RuntimeError(
                "ddfast was built without CUDA kernels: reinstall on a machine with nvcc "
                "(DDFAST_CUDA=ON pip install .) or pass a CPU tensor"
            )
        workspace = torch.empty(rows + cols, dtype=torch.float32, device=items.device)
        stream = torch.cuda.current_stream(items.device).cuda_stream
        mod.similarity_degree_cuda(
            items.data_ptr(), rows, cols, items.stride(0), eps, out.data_ptr(),
            workspace.data_ptr(), stream,
        )
        return out
    raise ValueError(f"similarity_degree: unsupported device {items.device}")
