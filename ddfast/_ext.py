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
    except ImportError as exc:
        # Python started inside the checkout (`python -m ddfast.train` there) imports the source
        # tree, which holds no compiled module; the installed distribution's one serves it.
        installed = _installed_module()
        return exc if installed is None else installed
    return _C


def _installed_module():
    """ddfast._C from the installed ddfast distribution's files, or None when there is none (a
    source checkout that was never installed)."""
    import sys
    from importlib import machinery, metadata, util

    try:
        files = metadata.distribution("ddfast").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.parts[:-1] == ("ddfast",) and f.name.startswith("_C.") and any(
                f.name.endswith(sfx) for sfx in machinery.EXTENSION_SUFFIXES):
            path = f.locate()
            spec = util.spec_from_file_location("ddfast._C", path)
            if spec is None or not path.is_file():
                continue
            module = util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["ddfast._C"] = module
            return module
    return None


def available() -> bool:
    """True when the compiled module imports."""
    return not isinstance(_module(), ImportError)


def has_cuda() -> bool:
    """True when the compiled module carries the CUDA kernels."""
    return available() and bool(_module().has_cuda)


def cuda_archs() -> list[str]:
    """The CUDA architectures the compiled module was built for, as CMake names them ("80",
    "90-real", "90-virtual"); empty without CUDA kernels."""
    if not has_cuda():
        return []
    return [a for a in str(getattr(_module(), "cuda_archs", "")).split(",") if a]


def _require():
    mod = _module()
    if isinstance(mod, ImportError):
        raise RuntimeError(
            "ddfast's compiled module is not built (" + str(mod) + "); install the package with "
            "`pip install .` (or `pip install -e .`) so the C++ extension is compiled"
        )
    return mod


def _require_cuda(mod) -> None:
    if not mod.has_cuda:
        raise RuntimeError(
            "ddfast was built without CUDA kernels: reinstall on a machine with nvcc "
            "(DDFAST_CUDA=ON pip install .) or pass CPU tensors"
        )


def _threads() -> int:
    return int(os.environ.get("DDFAST_NUM_THREADS", torch.get_num_threads()))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


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
        mod.similarity_degree_cpu(
            items.data_ptr(), rows, cols, items.stride(0), eps, out.data_ptr(), _threads()
        )
        return out
    if items.device.type == "cuda":
        _require_cuda(mod)
        workspace = torch.empty(rows + cols, dtype=torch.float32, device=items.device)
        mod.similarity_degree_cuda(
            items.data_ptr(), rows, cols, items.stride(0), eps, out.data_ptr(),
            workspace.data_ptr(), _stream(items.device),
        )
        return out
    raise ValueError(f"similarity_degree: unsupported device {items.device}")


def class_extremes(x: torch.Tensor, labels: torch.Tensor, items: torch.Tensor,
                   counts: torch.Tensor, largest: bool, eps: float = _EPS):
    """Per-class extreme cosine and its first (sample, slot) pair, through the compiled module.

    x (B, D) float32/bfloat16/float16 (upcast to float32 here); labels (B,) int64 in [0, C);
    items (C, N, D) (float32; other dtypes are converted); counts (C,) int64, class c holding
    items[c, :counts[c]]; all on the CPU, or all on one GPU (the CUDA build; nothing waits for
    the device there, and labels outside [0, C) are simply never matched). Returns values (C,)
    float32, arg_sample (C,) and arg_slot (C,) int64: the min (max when ``largest``) cosine over
    (samples of c) x (slots of c), and the first pair in row-major order attaining it; +-inf and
    -1 where c has no pair.
    """
    mod = _require()
    if x.dim() != 2 or items.dim() != 3 or items.shape[2] != x.shape[1]:
        raise ValueError(f"x must be (B, D) and items (C, N, D) with the same D, got "
                         f"{tuple(x.shape)} and {tuple(items.shape)}")
    if labels.shape != x.shape[:1] or counts.shape != items.shape[:1]:
        raise ValueError(f"labels must be ({x.shape[0]},) and counts ({items.shape[0]},), got "
                         f"{tuple(labels.shape)} and {tuple(counts.shape)}")
    if not x.is_floating_point() or x.dtype == torch.float64:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    device = x.device
    if any(t.device != device for t in (labels, items, counts)) or device.type not in ("cpu",
                                                                                       "cuda"):
        raise ValueError("class_extremes: every input must be on the same device, the CPU or a "
                         "CUDA GPU")
    if device.type == "cuda":
        _require_cuda(mod)
    x = x.to(torch.float32)
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:  # e.g. an expanded view
        x = x.contiguous()
    items = items.to(torch.float32)
    if items.stride(2) != 1 or items.stride(1) < items.shape[2]:
        items = items.contiguous()
    labels, counts = labels.to(torch.int64), counts.to(torch.int64)
    num_classes, slots = items.shape[0], items.shape[1]
    values = torch.empty(num_classes, dtype=torch.float32, device=device)  # (C,)
    arg_sample = torch.empty(num_classes, dtype=torch.int64, device=device)  # (C,)
    arg_slot = torch.empty(num_classes, dtype=torch.int64, device=device)  # (C,)
    args = (x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), labels.data_ptr(),
            labels.stride(0), items.data_ptr(), num_classes, slots, items.stride(0),
            items.stride(1), counts.data_ptr(), counts.stride(0), eps, bool(largest),
            values.data_ptr(), arg_sample.data_ptr(), arg_slot.data_ptr())
    if device.type == "cpu":
        mod.class_extremes_cpu(*args, _threads())
        return values, arg_sample, arg_slot
    nbytes = mod.class_extremes_cuda_workspace_bytes(x.shape[0], num_classes, slots)
    workspace = torch.empty(nbytes // 4 + 2, dtype=torch.float32, device=device)  # 8-B aligned
    mod.class_extremes_cuda(*args, workspace.data_ptr(), _stream(device))
    return values, arg_sample, arg_slot




def insert_memory(items: torch.Tensor, counts: torch.Tensor, new_items: torch.Tensor,
                  labels: torch.Tensor, adaptive: bool, eps: float = _EPS) -> None:
    """Append a batch to per-class memories and shrink them to capacity, in place.

    items (C, N, D) float32 with contiguous columns and counts (C,) int64 are updated in place;
    new_items (B, D) (cast to float32 here); labels (B,) int64 in [0, C); all on the CPU.
    ``adaptive`` picks the adaptive rule (largest similarity degree goes first), else fifo.
    Same result as ``ddfast.ref.insert_adaptive_ref`` / ``insert_fifo_ref``.
    """
    from ddfast.ref import check_insert_args

    mod = _require()
    check_insert_args(items, counts, new_items, labels)
    if items.dtype != torch.float32 or counts.dtype != torch.int64:
        raise ValueError(f"items must be float32 and counts int64 (they are updated in place), "
                         f"got {items.dtype} and {counts.dtype}")
    if items.stride(2) != 1 or items.stride(1) < items.shape[2]:
        raise ValueError("items must have contiguous rows (stride 1 along D); it is updated in "
                         "place, so pass a contiguous tensor")
    if any(t.device.type != "cpu" for t in (items, counts, new_items, labels)):
        raise ValueError("insert_memory: every input must be on the CPU")
    new_items = new_items.to(torch.float32)
    if new_items.stride(1) != 1 or new_items.stride(0) < new_items.shape[1]:
        new_items = new_items.contiguous()
    labels = labels.to(torch.int64)
    num_classes, slots, dim = items.shape
    mod.insert_memory_cpu(
        items.data_ptr(), num_classes, slots, dim, items.stride(0), items.stride(1),
        counts.data_ptr(), counts.stride(0), new_items.data_ptr(), new_items.shape[0],
        new_items.stride(0), labels.data_ptr(), labels.stride(0), bool(adaptive), eps,
        _threads(),
    )


def prune_adaptive(x: torch.Tensor, capacity: int, refresh_every: int = 64,
                   eps: float = _EPS) -> torch.Tensor:
    """Indices of the rows adaptive pruning keeps from x (K, D), ascending.

    x float32 (other float dtypes are cast) on the CPU; capacity >= 0. Evicts the alive row of
    largest similarity degree until capacity remain, recomputing the running sum exactly every
    ``refresh_every`` evictions (0: never), as ``ddfast.ref.prune_adaptive_ref``.
    Returns (min(K, capacity),) int64.
    """
    mod = _require()
    if x.dim() != 2 or not x.is_floating_point() or x.device.type != "cpu":
        raise ValueError(f"x must be a floating (K, D) CPU tensor, got {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")
    if isinstance(capacity, bool) or capacity < 0 or refresh_every < 0:
        raise ValueError(f"capacity and refresh_every must be >= 0, got {capacity!r} and "
                         f"{refresh_every!r}")
    x = x.to(torch.float32)
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    kept = torch.empty(min(x.shape[0], capacity), dtype=torch.int64)  # (M,)
    num = mod.prune_adaptive_cpu(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), capacity,
                                 refresh_every, eps, kept.data_ptr(), _threads())
    if num != kept.shape[0]:
        raise RuntimeError(f"prune_adaptive_cpu kept {num} rows, expected {kept.shape[0]}")
    return kept


def _evict_rows_cuda(buf: torch.Tensor, alive: torch.Tensor, excess: torch.Tensor, steps: int,
                     refresh_every: int, eps: float) -> None:
    """Adaptive eviction rounds on the GPU over pools buf (R, K, D) float32 contiguous; alive
    (R, K) int8 updated in place; excess (R,) int64 evictions per row; ``steps`` >= max(excess)
    rounds are enqueued without waiting for the device."""
    mod = _require()
    _require_cuda(mod)
    rows, slots, dim = buf.shape
    floats = mod.evict_rows_cuda_workspace_floats(rows, slots, dim)
    workspace = torch.empty(max(floats, 1), dtype=torch.float32, device=buf.device)
    mod.evict_rows_cuda(buf.data_ptr(), rows, slots, dim, buf.stride(0), buf.stride(1),
                        alive.data_ptr(), excess.data_ptr(), int(steps), int(refresh_every), eps,
                        workspace.data_ptr(), _stream(buf.device))


def insert_memory_cuda(items: torch.Tensor, counts: torch.Tensor, new_items: torch.Tensor,
                       labels: torch.Tensor, adaptive: bool, eps: float = _EPS) -> None:
    """``insert_memory`` on one GPU: the reference's gathers lay out and compact the pools (no
    host sync), and the CUDA kernels run the adaptive evictions. fifo has no eviction loop, so it
    is the reference's gathers alone."""
    from ddfast.ref import insert_with

    # A class evicts at most its own batch count, so B rounds suffice.
    steps = new_items.shape[0]
    insert_with(lambda buf, alive, excess: _evict_rows_cuda(buf, alive, excess, steps, 0, eps),
                items, counts, new_items, labels, adaptive)


def prune_adaptive_cuda(x: torch.Tensor, capacity: int, refresh_every: int = 64,
                        eps: float = _EPS) -> torch.Tensor:
    """``prune_adaptive`` on one GPU: indices of the kept rows of x (K, D), ascending."""
    from ddfast.ref import prune_with

    steps = x.shape[0] - capacity
    return prune_with(lambda buf, alive, excess: _evict_rows_cuda(buf, alive, excess, steps,
                                                                  refresh_every, eps), x, capacity)
