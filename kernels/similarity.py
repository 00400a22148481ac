"""Similarity degree of a memory's items: s_i = m_hat_i . sum_j m_hat_j (method.md section 3).

Two launches: one program per block of rows computes inverse norms and a partial sum of unit
vectors for its rows; partial sums are reduced in a fixed order (no atomics, so the result is
reproducible), then one program per block of rows takes the dot products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_EPS = 1e-8


@triton.jit
def _partial_unit_sum_kernel(
    items_ptr, inv_norm_ptr, partial_ptr, K, D, stride_k,
    eps, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    row_mask = rows < K
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(items_ptr + rows[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)  # (BK, BD)
        sq += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(sq), eps)  # (BK,)
    inv = tl.where(row_mask, inv, 0.0)
    tl.store(inv_norm_ptr + rows, inv, mask=row_mask)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(items_ptr + rows[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
        part = tl.sum(x.to(tl.float32) * inv[:, None], axis=0)  # (BD,)
        tl.store(partial_ptr + pid * D + cols, part, mask=cols < D)


@triton.jit
def _degree_kernel(
    items_ptr, inv_norm_ptr, unit_sum_ptr, out_ptr, K, D, stride_k,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    row_mask = rows < K
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(items_ptr + rows[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
        u = tl.load(unit_sum_ptr + cols, mask=cols < D, other=0.0)  # (BD,)
        acc += tl.sum(x.to(tl.float32) * u[None, :], axis=1)
    inv = tl.load(inv_norm_ptr + rows, mask=row_mask, other=0.0)
    tl.store(out_ptr + rows, acc * inv, mask=row_mask)


def similarity_degree(items: torch.Tensor, eps: float = _EPS, block_k: int = 16,
                      block_d: int = 64) -> torch.Tensor:
    """items: (K, D) fp32/bf16/fp16 with contiguous rows. Returns (K,) fp32 similarity degrees."""
    if items.dim() != 2 or items.stride(1) != 1:
        raise ValueError("items must be a (K, D) matrix with contiguous rows")
    k, d = items.shape
    out = torch.empty(k, dtype=torch.float32, device=items.device)  # (K,)
    if k == 0:
        return out
    programs = triton.cdiv(k, block_k)
    inv_norm = torch.empty(k, dtype=torch.float32, device=items.device)  # (K,)
    partial = torch.empty(programs, d, dtype=torch.float32, device=items.device)  # (P, D)
    _partial_unit_sum_kernel[(programs,)](
        items, inv_norm, partial, k, d, items.stride(0), eps, BLOCK_K=block_k, BLOCK_D=block_d
    )
    unit_sum = partial.sum(dim=0)  # (D,) fixed-order reduction
    _degree_kernel[(programs,)](
        items, inv_norm, unit_sum, out, k, d, items.stride(0), BLOCK_K=block_k, BLOCK_D=block_d
    )
    return out
