"""Per-class extreme cosine behind the minimax memory terms (method.md section 2).

One program per sample computes the cosines of its row with its own class's valid memory slots,
a block of slots at a time (dimensions looped in blocks, fp32 accumulation), and keeps the
extreme and the first slot attaining it. A small torch reduction then takes, per class, the
extreme over its samples and the first sample attaining it. No atomics, no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ddfast.ref import first_pair_per_class

_EPS = 1e-8


@triton.jit
def _sample_extreme_kernel(
    x_ptr, labels_ptr, items_ptr, counts_ptr, value_ptr, slot_ptr,
    N, D, stride_xb, stride_ic, stride_in, eps,
    LARGEST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    label = tl.load(labels_ptr + i)
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + label), 0), N)
    x_row = x_ptr + i * stride_xb
    sq_x = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        xv = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)  # (BD,)
        sq_x += xv * xv
    x_norm = tl.maximum(tl.sqrt(tl.sum(sq_x, axis=0)), eps)
    if LARGEST:
        best = tl.full((), float("-inf"), tl.float32)
    else:
        best = tl.full((), float("inf"), tl.float32)
    best_slot = tl.full((), -1, tl.int32)
    mem = items_ptr + label * stride_ic
    for n0 in range(0, N, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        valid = slots < count
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        sq_m = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            xv = tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)  # (BD,)
            mask = valid[:, None] & (cols[None, :] < D)
            m = tl.load(mem + slots[:, None] * stride_in + cols[None, :], mask=mask, other=0.0)
            m = m.to(tl.float32)  # (BN, BD)
            dot += tl.sum(m * xv[None, :], axis=1)
            sq_m += tl.sum(m * m, axis=1)
        cos = dot / (x_norm * tl.maximum(tl.sqrt(sq_m), eps))  # (BN,)
        if LARGEST:
            cos = tl.where(valid, cos, -float("inf"))
            block_best = tl.max(cos, axis=0)
            better = block_best > best
        else:
            cos = tl.where(valid, cos, float("inf"))
            block_best = tl.min(cos, axis=0)
            better = block_best < best
        # First slot of the block attaining its extreme; a later block must strictly improve.
        block_slot = tl.min(tl.where((cos == block_best) & valid, slots, N), axis=0)
        better = better & (block_slot < N)
        best_slot = tl.where(better, block_slot, best_slot)
        best = tl.where(better, block_best, best)
    tl.store(value_ptr + i, best)
    tl.store(slot_ptr + i, best_slot.to(tl.int64))


def class_extremes(x: torch.Tensor, labels: torch.Tensor, items: torch.Tensor,
                   counts: torch.Tensor, largest: bool, eps: float = _EPS,
                   block_n: int = 16, block_d: int = 128):
    """Per-class extreme cosine and its first (sample, slot) pair.

    x (B, D) float32/bfloat16/float16; labels (B,) int64 in [0, C); items (C, N, D) float32
    (or half types); counts (C,) int64. Returns values (C,) float32, arg_sample (C,) and
    arg_slot (C,) int64 (see ``ddfast.ref.class_extremes_ref``); +-inf and -1 without a pair.
    """
    if x.dim() != 2 or items.dim() != 3 or items.shape[2] != x.shape[1]:
        raise ValueError(f"x must be (B, D) and items (C, N, D) with the same D, got "
                         f"{tuple(x.shape)} and {tuple(items.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if items.stride(2) != 1:
        items = items.contiguous()
    labels = labels.to(torch.int64).contiguous()
    counts = counts.to(torch.int64).contiguous()
    batch, dim = x.shape
    num_classes, slots = items.shape[0], items.shape[1]
    fill = float("-inf") if largest else float("inf")
    if batch == 0 or slots == 0:
        values = torch.full((num_classes,), fill, dtype=torch.float32, device=x.device)
        none = torch.full((num_classes,), -1, dtype=torch.int64, device=x.device)
        return values, none, none.clone()
    per_value = torch.empty(batch, dtype=torch.float32, device=x.device)  # (B,)
    per_slot = torch.empty(batch, dtype=torch.int64, device=x.device)  # (B,)
    _sample_extreme_kernel[(batch,)](
        x, labels, items, counts, per_value, per_slot,
        slots, dim, x.stride(0), items.stride(0), items.stride(1), eps,
        LARGEST=bool(largest), BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return first_pair_per_class(per_value, per_slot, labels, num_classes, largest)
