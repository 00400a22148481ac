"""torch.library custom ops of ddfast: backend choice, fake (meta) implementation and autograd.

``torch.ops.ddfast.class_extremes(x, labels, items, counts, largest)`` -> (values, arg_sample,
arg_slot): per class c, the min (max when ``largest``) over (samples i with label c) x (slots
j < counts[c]) of cos(x_i, items[c, j]), and the first (sample, slot) pair in row-major order
attaining it; +inf (-inf) and -1, -1 for a class without a pair. ``ddfast.backend.choose``
picks the implementation (``ddfast.ref.class_extremes_ref`` is the specification). Only x gets
gradient, and only the sample of each extreme pair: the backward recomputes the C extreme
cosines, never a (B, N) matrix. Being an opaque op, it traces under
``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck``.

``torch.ops.ddfast.insert_memory(items, counts, new_items, labels, adaptive)`` appends a batch
to per-class memories and shrinks each to capacity (fifo, or adaptive when ``adaptive``),
mutating ``items`` and ``counts`` in place (``ddfast.ref.insert_fifo_ref`` /
``insert_adaptive_ref`` are the specification). ``torch.ops.ddfast.prune_adaptive(x, capacity)``
returns the indices of the rows adaptive pruning keeps (``ddfast.ref.prune_adaptive_ref``).
Both take detached data and have no autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddfast import _ext
from ddfast.backend import choose
from ddfast.ref import (
    COS_EPS,
    REFRESH_EVERY,
    class_extremes_ref,
    insert_adaptive_ref,
    insert_fifo_ref,
    prune_adaptive_ref,
)

__all__ = ["class_extremes", "insert_memory", "prune_adaptive"]


def _value_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("ddfast::class_extremes", mutates_args=())
def class_extremes(x: Tensor, labels: Tensor, items: Tensor, counts: Tensor,
                   largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, D) float; labels (B,) int64; items (C, N, D); counts (C,) int64 -> values (C,)
    float32 (float64 for float64 x), arg_sample (C,) int64, arg_slot (C,) int64."""
    backend = choose("class_extremes", x.device)
    if x.dtype == torch.float64:  # the fast paths compute in float32; keep float64 exact
        backend = "ref"
    if backend in ("cpp", "cuda"):
        return _ext.class_extremes(x, labels, items, counts, largest, COS_EPS)
    if backend == "triton":
        from ddfast.kernels.minimax import class_extremes as triton_class_extremes

        return triton_class_extremes(x, labels, items, counts, largest, COS_EPS)
    values, arg_sample, arg_slot = class_extremes_ref(x, labels, items, counts, largest)
    # Fresh tensors (an op's outputs may not alias its inputs or each other).
    return values.contiguous(), arg_sample.clone(), arg_slot.clone()


@class_extremes.register_fake
def _(x: Tensor, labels: Tensor, items: Tensor, counts: Tensor, largest: bool):
    num_classes = items.shape[0]
    values = x.new_empty((num_classes,), dtype=_value_dtype(x.dtype))
    arg_sample = x.new_empty((num_classes,), dtype=torch.int64)
    arg_slot = x.new_empty((num_classes,), dtype=torch.int64)
    return values, arg_sample, arg_slot


def _setup_context(ctx, inputs, output) -> None:
    x, labels, items, _, _ = inputs
    _, arg_sample, arg_slot = output
    ctx.save_for_backward(x, labels, items, arg_sample, arg_slot)


def _backward(ctx, grad_values: Tensor, grad_arg_sample, grad_arg_slot):
    """d cos(x_i, m) / d x_i at each class's extreme pair, for the sample of that pair.

    With u = x / max(|x|, eps) and m_hat = m / max(|m|, eps): (m_hat - cos * u) / |x| when
    |x| >= eps, m_hat / eps otherwise (the floor is then a constant). Computed per sample, not
    per class: sample i gets gradient only when it is the extreme sample of its own class, so
    the work is O(B D) however many classes the memories hold, with no host synchronisation.
    """
    x, labels, items, arg_sample, arg_slot = ctx.saved_tensors
    dtype = _value_dtype(x.dtype)
    if x.shape[0] == 0:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device), None, None, None, None
    rows = torch.arange(x.shape[0], device=x.device)  # (B,)
    chosen = arg_sample[labels] == rows  # (B,) the extreme sample of its class
    slot = arg_slot[labels].clamp_min(0)  # (B,)
    xs = x.detach().to(dtype)  # (B, D)
    m = items.detach()[labels, slot].to(dtype)  # (B, D)
    x_norm = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)  # (B, 1)
    m_hat = m / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(COS_EPS)  # (B, D)
    u = xs / x_norm.clamp_min(COS_EPS)  # (B, D)
    cos = (u * m_hat).sum(-1, keepdim=True)  # (B, 1)
    grad = torch.where(x_norm >= COS_EPS, (m_hat - cos * u) / x_norm.clamp_min(COS_EPS),
                       m_hat / COS_EPS)  # (B, D)
    scale = torch.where(chosen, grad_values[labels].to(dtype), 0.0).unsqueeze(1)  # (B, 1)
    return (grad * scale).to(x.dtype), None, None, None, None


class_extremes.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ddfast::insert_memory", mutates_args=("items", "counts"))
def insert_memory(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor,
                  adaptive: bool) -> None:
    """items (C, N, D) float and counts (C,) int64, updated in place; new_items (B, D);
    labels (B,) int64 in [0, C); ``adaptive``: the adaptive rule, else fifo."""
    backend = choose("insert_memory", items.device)
    if items.dtype != torch.float32:  # the fast paths store float32; keep other dtypes exact
        backend = "ref"
    if backend == "cpp" and items.is_contiguous() and counts.dtype == torch.int64:
        _ext.insert_memory(items, counts, new_items, labels, adaptive, COS_EPS)
    elif backend == "triton":
        from ddfast.kernels.memory_insert import insert_memory as triton_insert_memory

        triton_insert_memory(items, counts, new_items, labels, adaptive, COS_EPS)
    elif backend == "cuda":
        _ext.insert_memory_cuda(items, counts, new_items, labels, adaptive, COS_EPS)
    elif adaptive:
        insert_adaptive_ref(items, counts, new_items, labels)
    else:
        insert_fifo_ref(items, counts, new_items, labels)


@insert_memory.register_fake
def _(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor, adaptive: bool) -> None:
    return None


@torch.library.custom_op("ddfast::prune_adaptive", mutates_args=())
def prune_adaptive(x: Tensor, capacity: int) -> Tensor:
    """x (K, D) float -> indices of the rows adaptive pruning keeps, (min(K, capacity),) int64
    ascending (logical order)."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    backend = choose("prune_adaptive", x.device)
    if x.dtype == torch.float64:  # the fast paths compute in float32; keep float64 exact
        backend = "ref"
    if backend == "cpp":
        return _ext.prune_adaptive(x, capacity, REFRESH_EVERY, COS_EPS)
    if backend == "triton":
        from ddfast.kernels.memory_insert import prune_adaptive as triton_prune_adaptive

        return triton_prune_adaptive(x, capacity, REFRESH_EVERY, COS_EPS)
    if backend == "cuda":
        return _ext.prune_adaptive_cuda(x, capacity, REFRESH_EVERY, COS_EPS)
    return prune_adaptive_ref(x, capacity).clone()


@prune_adaptive.register_fake
def _(x: Tensor, capacity: int) -> Tensor:
    return x.new_empty((min(x.shape[0], capacity),), dtype=torch.int64)
