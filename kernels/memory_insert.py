"""Adaptive memory insertion and epoch pruning on the GPU (method.md section 3).

One program per memory row (a class's pool: its items, then its batch items in batch order) loops
over the evictions that row needs. Each eviction reads the alive rows once, a block of slots by a
block of dimensions at a time: the unit rows ``x / max(|x|, eps)`` are formed on the fly in
float32 (as ``ddfast.ref.unit_rows_ref``), the degrees ``u_i . total`` are reduced in float32, the
first alive slot of largest degree goes (with the reference's exact two-nonzero-items rule), and
its unit row is subtracted from the running sum ``total``: O(K D) per eviction, never a K x K
matrix. Pruning recomputes ``total`` from the alive rows every ``refresh_every`` evictions, as
``ddfast.ref.prune_adaptive_ref`` does. Laying the pools out and compacting the survivors back
reuse the reference's gather code, so the memory layout is the reference's and nothing syncs with
the host. fifo insertion has no eviction loop to fuse: the Triton backend runs the reference's
gathers for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ddfast.ref import insert_with, prune_with

_EPS = 1e-8


@triton.jit
def _sum_alive_units(row_ptr, norm_ptr, alive_ptr, total_ptr, K, D, stride_k,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """total[:] = sum of the alive unit rows of one pool, in float32."""
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)  # (BD,)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            live = (tl.load(alive_ptr + ks, mask=ks < K, other=0) != 0) & (ks < K)
            norm = tl.load(norm_ptr + ks, mask=ks < K, other=1.0)  # (BK,)
            mask = live[:, None] & (cols[None, :] < D)
            x = tl.load(row_ptr + ks[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(x.to(tl.float32) / norm[:, None], axis=0)
        tl.store(total_ptr + cols, acc, mask=cols < D)


@triton.jit
def _evict_rows_kernel(
    buf_ptr, alive_ptr, excess_ptr, norm_ptr, nonzero_ptr, total_ptr,
    K, D, stride_r, stride_k, eps,
    REFRESH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = buf_ptr + r * stride_r
    alive_row = alive_ptr + r * K
    norm_row = norm_ptr + r * K
    nonzero_row = nonzero_ptr + r * K
    total_row = total_ptr + r * D
    n_evict = tl.load(excess_ptr + r).to(tl.int32)
    # Norms (floored at eps) and "self-cosine 1" flags of every slot.
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = (ks[:, None] < K) & (cols[None, :] < D)
            x = tl.load(row + ks[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            sq += tl.sum(x * x, axis=1)
        norm = tl.maximum(tl.sqrt(sq), eps)  # (BK,)
        tl.store(norm_row + ks, norm, mask=ks < K)
        self_cos = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = (ks[:, None] < K) & (cols[None, :] < D)
            x = tl.load(row + ks[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
            u = x.to(tl.float32) / norm[:, None]
            self_cos += tl.sum(u * u, axis=1)
        tl.store(nonzero_row + ks, (self_cos > 0.5).to(tl.int8), mask=ks < K)
    tl.debug_barrier()
    _sum_alive_units(row, norm_row, alive_row, total_row, K, D, stride_k, BLOCK_K, BLOCK_D)
    num_nonzero = tl.zeros((), dtype=tl.int32)  # alive nonzero slots
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        live = tl.load(alive_row + ks, mask=ks < K, other=0) != 0
        nz = tl.load(nonzero_row + ks, mask=ks < K, other=0) != 0
        num_nonzero += tl.sum((live & nz).to(tl.int32), axis=0)
    tl.debug_barrier()
    for step in range(0, n_evict):
        if REFRESH > 0:  # a compile-time branch; the test below is per step
            refresh_now = (step > 0) & (step % REFRESH == 0)
            if refresh_now:
                _sum_alive_units(row, norm_row, alive_row, total_row, K, D, stride_k, BLOCK_K,
                                 BLOCK_D)
                tl.debug_barrier()
        best = tl.full((), float("-inf"), tl.float32)
        best_slot = tl.zeros((), dtype=tl.int32) + K  # K: none yet
        nz_slot = tl.zeros((), dtype=tl.int32) + K  # first alive nonzero slot
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            live = (tl.load(alive_row + ks, mask=ks < K, other=0) != 0) & (ks < K)
            norm = tl.load(norm_row + ks, mask=ks < K, other=1.0)
            s = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                mask = live[:, None] & (cols[None, :] < D)
                x = tl.load(row + ks[:, None] * stride_k + cols[None, :], mask=mask, other=0.0)
                t = tl.load(total_row + cols, mask=cols < D, other=0.0)  # (BD,)
                s += tl.sum((x.to(tl.float32) / norm[:, None]) * t[None, :], axis=1)
            s = tl.where(live, s, float("-inf"))
            block_best = tl.max(s, axis=0)
            block_slot = tl.min(tl.where(live & (s == block_best), ks, K), axis=0)
            # A later block must strictly improve: the first slot keeps a tie.
            better = (block_slot < K) & ((block_best > best) | (best_slot >= K))
            best_slot = tl.where(better, block_slot, best_slot)
            best = tl.where(better, block_best, best)
            # Two-nonzero-items rule: the first alive nonzero slot.
            nz = tl.load(nonzero_row + ks, mask=ks < K, other=0) != 0
            nz_slot = tl.minimum(nz_slot, tl.min(tl.where(live & nz, ks, K), axis=0))
        victim = tl.where(num_nonzero == 2, nz_slot, best_slot)
        victim = tl.minimum(victim, K - 1)
        tl.debug_barrier()
        tl.store(alive_row + victim, tl.zeros((), dtype=tl.int8))
        num_nonzero -= (tl.load(nonzero_row + victim) != 0).to(tl.int32)
        gone_norm = tl.load(norm_row + victim)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(row + victim * stride_k + cols, mask=cols < D, other=0.0)
            t = tl.load(total_row + cols, mask=cols < D, other=0.0)
            tl.store(total_row + cols, t - x.to(tl.float32) / gone_norm, mask=cols < D)
        tl.debug_barrier()


def _evict(buf: torch.Tensor, alive: torch.Tensor, excess: torch.Tensor, refresh_every: int,
           eps: float, block_k: int, block_d: int) -> None:
    """Run the evictions of every pool row of buf (R, K, D) in place on alive (R, K) int8."""
    rows, slots, dim = buf.shape
    if rows == 0 or slots == 0:
        return
    norm = torch.empty(rows, slots, dtype=torch.float32, device=buf.device)  # (R, K)
    nonzero = torch.empty(rows, slots, dtype=torch.int8, device=buf.device)  # (R, K)
    total = torch.empty(rows, dim, dtype=torch.float32, device=buf.device)  # (R, D)
    _evict_rows_kernel[(rows,)](
        buf, alive, excess, norm, nonzero, total, slots, dim, buf.stride(0), buf.stride(1), eps,
        REFRESH=int(refresh_every), BLOCK_K=block_k, BLOCK_D=block_d,
    )


def insert_memory(items: torch.Tensor, counts: torch.Tensor, new_items: torch.Tensor,
                  labels: torch.Tensor, adaptive: bool, eps: float = _EPS,
                  block_k: int = 16, block_d: int = 128) -> None:
    """Append a batch to per-class memories and shrink them to capacity, in place.

    items (C, N, D) float32 and counts (C,) int64 are updated in place; new_items (B, D);
    labels (B,) int64 in [0, C). Same result as ``ddfast.ref.insert_adaptive_ref`` (adaptive)
    or ``insert_fifo_ref``. No host synchronisation.
    """
    insert_with(lambda buf, alive, excess: _evict(buf, alive, excess, 0, eps, block_k, block_d),
                items, counts, new_items, labels, adaptive)


def prune_adaptive(x: torch.Tensor, capacity: int, refresh_every: int = 64, eps: float = _EPS,
                   block_k: int = 16, block_d: int = 128) -> torch.Tensor:
    """Indices of the rows adaptive pruning keeps from x (K, D): (min(K, capacity),) int64,
    ascending. See ``ddfast.ref.prune_adaptive_ref``. No host synchronisation."""
    return prune_with(lambda buf, alive, excess: _evict(buf, alive, excess, refresh_every, eps,
                                                         block_k, block_d), x, capacity)
