"""Pure-torch references of every memory operation (method.md sections 2 and 3).

Each function here is the specification of one operation, the CPU path, the test oracle and the
benchmark baseline; the fused kernels keep the name stem without ``_ref``. Nothing here imports
Triton or a compiled extension.

Conventions shared by every function:

* A memory is a preallocated pair ``items`` (C, N, D) and ``counts`` (C,) int64. The items of
  class c are ``items[c, :counts[c]]`` in logical insertion order, oldest first; the slots after
  them are unused and held at zero. An eviction compacts the survivors to the front in their
  previous order, so slot index == age rank and "first index on ties" means "oldest item".
* Cosine similarity is ``a.b / (max(|a|, eps) * max(|b|, eps))`` with ``eps = COS_EPS = 1e-8``:
  a zero vector has cosine 0 with everything, itself included, instead of producing a NaN.
* Similarity arithmetic runs in float32 at least (float64 inputs stay float64): x0_hat carries a
  1/sqrt(abar_t) factor up to ~157, which bf16 or fp16 would not survive.
* Ties in an argmax/argmin go to the first index (torch.argmax's documented rule). A min/max in
  the loss is one (sample, slot) pair: the first attaining it in row-major (sample, slot) order,
  which alone gets the gradient (not an even split among exactly tied pairs); only duplicated
  data produces such ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

COS_EPS = 1e-8  # floor on a norm in every cosine, so zero vectors give 0 instead of NaN
REFRESH_EVERY = 64  # evictions between exact recomputations of a prune's running sum


class MinimaxTerms(NamedTuple):
    """The memory terms of one training step; ``total == rep.sum() + div.sum()``."""

    total: Tensor  # () value to add to the diffusion loss; carries gradient to x0_hat
    rep: Tensor  # (C,) representativeness term per class, 0 where skipped
    div: Tensor  # (C,) diversity term per class, 0 where skipped


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def unit_rows_ref(x: Tensor) -> Tensor:
    """Rows scaled to unit length; rows shorter than COS_EPS are divided by COS_EPS instead.

    (..., D) -> (..., D) in float32, or float64 for float64 input.
    """
    x = x.to(_compute_dtype(x.dtype))
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COS_EPS)  # (..., 1)
    return x / norm


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    # Multiply-and-sum rather than a matmul: every output is reduced by the same loop, so equal
    # rows give bitwise-equal results and duplicate items tie exactly (first index wins).
    return (a * b).sum(-1)


def similarity_degree_ref(x: Tensor) -> Tensor:
    """Similarity degree ``s_i = sum_j cos(x_i, x_j)`` over all rows, itself included.

    Computed as ``s_i = u_i . sum_j u_j`` with unit rows u, O(K D) rather than O(K^2 D).
    (..., K, D) -> (..., K).
    """
    u = unit_rows_ref(x)  # (..., K, D)
    return _dot_rows(u, u.sum(-2, keepdim=True))  # (..., K)


def evict_adaptive_ref(units: Tensor, alive: Tensor, total: Tensor, need: Tensor) -> Tensor:
    """One adaptive eviction in every row that needs one (method.md section 3).

    In each row r with ``need[r]``, the alive item of largest similarity degree
    ``s_i = units[r, i] . total[r]`` is evicted (first index on ties): it is cleared from
    ``alive`` and subtracted from ``total``, both in place. O(K D) per row. When exactly two
    nonzero items are alive (whatever number of zero items beside them), both have degree
    1 + cos(m_1, m_2) in exact arithmetic and every zero item 0, so the first of the two goes,
    whatever the rounding; this rule also settles the all-zero tie of two antiparallel items.
    (A zero item's self-cosine is 0; "nonzero" means self-cosine above one half.)

    units (R, K, D) unit rows; alive (R, K) bool; total (R, D) sum of the alive units;
    need (R,) bool. Returns the chosen slot per row (R,) int64, meaningless where need is False.
    A row that needs an eviction must hold at least one alive item.
    """
    num_slots, dim = units.shape[1], units.shape[2]
    s = _dot_rows(units, total.unsqueeze(1))  # (R, K)
    s = s.masked_fill(~alive, float("-inf"))
    idx = s.argmax(dim=1)  # (R,) first maximum on ties
    # Two nonzero items alive: both degrees are 1 + cos(m_1, m_2), an exact tie that rounding
    # would break at random (zero items sit at 0 below them), so decide it exactly.
    nonzero = alive & (_dot_rows(units, units) > 0.5)  # (R, K) alive with self-cosine 1
    first_nonzero = nonzero.to(torch.uint8).argmax(1)  # (R,)
    idx = torch.where(nonzero.sum(1) == 2, first_nonzero, idx)  # (R,)
    hit = torch.nn.functional.one_hot(idx, num_slots).bool() & need.unsqueeze(1)  # (R, K)
    alive &= ~hit
    gone = units.gather(1, idx.view(-1, 1, 1).expand(-1, 1, dim)).squeeze(1)  # (R, D)
    total -= gone * need.unsqueeze(1).to(total.dtype)
    return idx


def prune_adaptive_ref(x: Tensor, capacity: int, *, refresh_every: int = REFRESH_EVERY) -> Tensor:
    """Evict from a (K, D) set, one item at a time, until ``capacity`` items remain.

    Each eviction removes the item of largest similarity degree among the survivors (first index
    on ties), O(K D) through a running sum of unit rows. Subtracting thousands of vectors from
    that sum lets rounding error grow, so it is recomputed exactly every ``refresh_every``
    evictions (0: never); in float32 this keeps the choices equal to the exact O(K^2 D) rule.
    x (K, D) -> indices of the kept rows (min(K, capacity),) int64, ascending (logical order).
    """
    num = x.shape[0]
    if num <= capacity:
        return torch.arange(num, device=x.device)
    units = unit_rows_ref(x).unsqueeze(0)  # (1, K, D)
    index = torch.arange(num, device=x.device)  # (K,) input row held by each slot
    alive = torch.ones(1, num, dtype=torch.bool, device=x.device)  # (1, K)
    total = units.sum(1)  # (1, D)
    need = torch.ones(1, dtype=torch.bool, device=x.device)  # (1,)
    for step in range(num - capacity):
        if refresh_every > 0 and step > 0 and step % refresh_every == 0:
            # Drop the evicted rows (later evictions get cheaper; order is kept, so ties still
            # go to the first index) and recompute the running sum exactly.
            keep = alive[0].nonzero().squeeze(1)  # (K',)
            units, index = units[:, keep], index[keep]  # (1, K', D), (K',)
            alive = torch.ones(1, keep.shape[0], dtype=torch.bool, device=x.device)
            total = units.sum(1)  # (1, D)
        evict_adaptive_ref(units, alive, total, need)
    return index[alive[0]]


def prune_fifo_ref(num_items: int, capacity: int, device: torch.device | None = None) -> Tensor:
    """Indices of the rows fifo keeps from ``num_items`` in logical order: the newest capacity.

    -> (min(num_items, capacity),) int64, ascending.
    """
    return torch.arange(max(num_items - capacity, 0), num_items, device=device)


def _merge_batch(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor):
    """Lay each touched memory out with the batch appended after it, without a host sync.

    Rows are all classes when C <= B (each class once) and the batch's labels otherwise (a class
    repeats once per sample; its rows are identical). Slot p < N is memory slot p, slot N + j is
    batch item j, so slot order is logical order (memory oldest first, then batch order).
    Returns row classes (R,), buffer (R, N + B, D) and valid (R, N + B) bool.
    """
    num_classes, capacity, dim = items.shape
    batch = new_items.shape[0]
    # (R,): (C,) class rows when C <= B, else (B,) one row per sample
    rows = torch.arange(num_classes, device=items.device) if num_classes <= batch else labels
    buf = torch.cat(
        [items[rows], new_items.unsqueeze(0).expand(rows.shape[0], batch, dim)], dim=1
    )  # (R, N + B, D)
    slots = torch.arange(capacity, device=items.device)  # (N,)
    old_valid = slots.unsqueeze(0) < counts[rows].unsqueeze(1)  # (R, N)
    new_valid = labels.unsqueeze(0) == rows.unsqueeze(1)  # (R, B)
    return rows, buf, torch.cat([old_valid, new_valid], dim=1)


def _store_rows(items: Tensor, counts: Tensor, rows: Tensor, buf: Tensor, keep: Tensor) -> None:
    """Compact the kept slots of each row to the front, in order, and write the rows back."""
    capacity, dim = items.shape[1], items.shape[2]
    # A stable sort on "dropped" moves kept slots first without changing their order.
    order = torch.argsort((~keep).to(torch.int32), dim=1, stable=True)[:, :capacity]  # (R, N)
    kept = buf.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))  # (R, N, D)
    num_kept = keep.sum(1)  # (R,)
    used = torch.arange(capacity, device=items.device).unsqueeze(0) < num_kept.unsqueeze(1)
    kept = torch.where(used.unsqueeze(-1), kept, 0.0)  # (R, N, D) unused slots back to zero
    # Rows of one class carry equal data; writing the first row's result for all of them makes
    # the duplicate-index write deterministic even if two rows ever rounded differently.
    leader = (rows.unsqueeze(1) == rows.unsqueeze(0)).to(torch.uint8).argmax(1)  # (R,)
    items[rows] = kept[leader].to(items.dtype)
    counts[rows] = num_kept[leader]


def check_insert_args(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor) -> None:
    """ValueError unless items (C, N, D), counts (C,), new_items (B, D) and labels (B,) fit."""
    if items.dim() != 3 or counts.shape != items.shape[:1]:
        raise ValueError(f"items must be (C, N, D) and counts (C,), got {tuple(items.shape)} "
                         f"and {tuple(counts.shape)}")
    if new_items.dim() != 2 or new_items.shape[1] != items.shape[2]:
        raise ValueError(f"new items must be (B, {items.shape[2]}), got {tuple(new_items.shape)}")
    if labels.shape != new_items.shape[:1]:
        raise ValueError(f"labels must be ({new_items.shape[0]},), got {tuple(labels.shape)}")


def eviction_pools(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor):
    """The pools an adaptive insertion evicts from, laid out for a fused kernel (no host sync).

    Returns rows (R,) their classes, buf (R, N + B, D) float32 contiguous (memory items, then the
    batch items, in logical order), alive (R, N + B) int8 (1 for a valid slot) and excess (R,)
    int64, the evictions each row needs; ``_store_rows(items, counts, rows, buf, alive.bool())``
    writes the survivors back.
    """
    rows, buf, valid = _merge_batch(items, counts, new_items.to(items.dtype), labels.long())
    excess = (valid.sum(1) - items.shape[1]).clamp_min(0).contiguous()  # (R,)
    return rows, buf.to(torch.float32).contiguous(), valid.to(torch.int8).contiguous(), excess


def kept_slots(alive: Tensor, capacity: int) -> Tensor:
    """Indices of the alive slots of one pool (K,), ascending, the first ``capacity`` of them:
    a stable sort puts alive slots first in order, so nothing waits for the device."""
    order = torch.argsort((alive == 0).to(torch.int32), stable=True)  # (K,)
    return order[:capacity].clone()


def insert_with(evict, items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor,
                adaptive: bool) -> None:
    """An insertion whose adaptive evictions run in ``evict(buf, alive, excess)`` (a fused
    kernel that clears ``alive`` in place; see ``eviction_pools``); fifo has no eviction loop and
    runs ``insert_fifo_ref``. Same arguments and result as ``insert_adaptive_ref``."""
    check_insert_args(items, counts, new_items, labels)
    if new_items.shape[0] == 0:
        return
    if not adaptive:
        insert_fifo_ref(items, counts, new_items, labels)
        return
    rows, buf, alive, excess = eviction_pools(items, counts, new_items, labels)
    evict(buf, alive, excess)
    _store_rows(items, counts, rows, buf, alive.bool())


def prune_with(evict, x: Tensor, capacity: int) -> Tensor:
    """A pruning whose evictions run in ``evict(buf, alive, excess)`` on the one pool
    buf (1, K, D); same result as ``prune_adaptive_ref``."""
    num = x.shape[0]
    if num <= capacity:
        return torch.arange(num, device=x.device)
    buf = x.to(torch.float32).contiguous().unsqueeze(0)  # (1, K, D)
    alive = torch.ones(1, num, dtype=torch.int8, device=x.device)  # (1, K)
    excess = torch.full((1,), num - capacity, dtype=torch.int64, device=x.device)  # (1,)
    evict(buf, alive, excess)
    return kept_slots(alive[0], capacity)


def insert_fifo_ref(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor) -> None:
    """Append a batch to its classes' memories in batch order, then drop the oldest to fit.

    items (C, N, D) and counts (C,) int64 are updated in place; new_items (B, D); labels (B,)
    int64 in [0, C). Each class keeps its newest N items, so a class with more than N items in
    the batch keeps only its last N. No host synchronisation.
    """
    check_insert_args(items, counts, new_items, labels)
    if new_items.shape[0] == 0:
        return
    rows, buf, valid = _merge_batch(items, counts, new_items.to(items.dtype), labels)
    newer = valid.flip(1).cumsum(1).flip(1)  # (R, N + B) valid slots at or after each slot
    _store_rows(items, counts, rows, buf, valid & (newer <= items.shape[1]))


def insert_adaptive_ref(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor) -> None:
    """Append a batch to its classes' memories in batch order, then shrink each adaptively.

    While a memory holds more than N items, the item of largest similarity degree is evicted
    (first index on ties), recomputing after each eviction (method.md section 3). items (C, N, D)
    and counts (C,) int64 are updated in place; new_items (B, D); labels (B,) int64 in [0, C).
    Runs exactly B vectorised eviction rounds (a class evicts at most its own batch count, since
    it held at most N before), so there is no host synchronisation. Work per round is
    O(R (N + B) D) with R = min(B, C) rows.
    """
    check_insert_args(items, counts, new_items, labels)
    batch = new_items.shape[0]
    if batch == 0:
        return
    rows, buf, valid = _merge_batch(items, counts, new_items.to(items.dtype), labels)
    units = unit_rows_ref(buf)  # (R, N + B, D)
    alive = valid.clone()  # (R, N + B)
    total = torch.where(valid.unsqueeze(-1), units, 0.0).sum(1)  # (R, D)
    excess = (valid.sum(1) - items.shape[1]).clamp_min(0)  # (R,) evictions each row needs
    for step in range(batch):
        evict_adaptive_ref(units, alive, total, excess > step)
    _store_rows(items, counts, rows, buf, alive)


def _own_class_similarities(x_units: Tensor, labels: Tensor, items: Tensor, counts: Tensor,
                            largest: bool) -> Tensor:
    """Cosines of each sample with its own class's memory slots; unused slots hold -inf (+inf
    for a min). x_units (B, D) unit rows; labels (B,); items (C, N, D); counts (C,) -> (B, N)."""
    capacity = items.shape[1]
    mem = unit_rows_ref(items.detach()[labels].to(x_units.dtype))  # (B, N, D) own class
    sim = _dot_rows(mem, x_units.unsqueeze(1))  # (B, N)
    slots = torch.arange(capacity, device=items.device)  # (N,)
    valid = slots.unsqueeze(0) < counts[labels].unsqueeze(1)  # (B, N)
    return sim.masked_fill(~valid, float("-inf") if largest else float("inf"))


def _first_extreme_pairs(sim: Tensor, labels: Tensor, counts: Tensor, num_classes: int,
                         largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per class, the extreme of a masked (B, N) similarity matrix and its first pair.

    sim (B, N) from ``_own_class_similarities`` (detached); labels (B,); counts (C,). Returns
    values (C,), arg_sample (C,) and arg_slot (C,) int64: the first (sample, slot) in row-major
    order attaining the extreme, -1 (and +-inf) where the class has no pair. No host sync.
    """
    per_value = sim.amax(1) if largest else sim.amin(1)  # (B,)
    per_slot = sim.argmax(1) if largest else sim.argmin(1)  # (B,) first slot on ties
    per_slot = torch.where(counts[labels] > 0, per_slot, -1)  # (B,) -1: no valid slot
    return first_pair_per_class(per_value, per_slot, labels, num_classes, largest)


def first_pair_per_class(per_value: Tensor, per_slot: Tensor, labels: Tensor, num_classes: int,
                         largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce per-sample extremes to per-class extremes, the first sample winning ties.

    per_value (B,) each sample's extreme cosine over its class's slots; per_slot (B,) int64 the
    first slot attaining it, -1 when the class memory is empty; labels (B,). Returns values (C,)
    (+inf, or -inf when largest, for classes without a pair), arg_sample (C,) and arg_slot (C,)
    int64 (-1 without a pair). Shared by the reference and the Triton launcher; no host sync.
    """
    batch = per_value.shape[0]
    fill = float("-inf") if largest else float("inf")
    has_pair = per_slot >= 0  # (B,)
    per_value = torch.where(has_pair, per_value, fill)  # (B,)
    init = torch.full((num_classes,), fill, dtype=per_value.dtype, device=per_value.device)
    values = init.scatter_reduce(0, labels, per_value, reduce="amax" if largest else "amin")
    sample = torch.arange(batch, device=per_value.device)  # (B,)
    attains = has_pair & (per_value == values[labels])  # (B,)
    key = torch.where(attains, sample, batch)  # (B,) batch marks "not a candidate"
    first = torch.full((num_classes,), batch, dtype=torch.long, device=per_value.device)
    first = first.scatter_reduce(0, labels, key, reduce="amin")  # (C,)
    found = first < batch  # (C,)
    arg_slot = per_slot[first.clamp_max(max(batch - 1, 0))] if batch else first  # (C,)
    return (values, torch.where(found, first, -1), torch.where(found, arg_slot, -1))


def class_extremes_ref(x: Tensor, labels: Tensor, items: Tensor, counts: Tensor,
                       largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per class, the min (or max) cosine over (its samples in the batch) x (its memory slots).

    x (B, D) any float dtype; labels (B,) int64 in [0, C); items (C, N, D); counts (C,) int64
    (class c holds items[c, :counts[c]]). Returns values (C,) float32 (float64 for float64
    input), arg_sample (C,) and arg_slot (C,) int64: the first (sample, slot) pair in row-major
    order attaining the extreme. Classes absent from the batch or with an empty memory get +inf
    (-inf when largest) and -1, -1. Materialises the (B, N) cosines; no gradient, no host sync.
    """
    num_classes = items.shape[0]
    x_units = unit_rows_ref(x.detach())  # (B, D)
    sim = _own_class_similarities(x_units, labels, items, counts, largest)  # (B, N)
    if sim.shape[1] == 0:  # no slots at all: every class is empty
        sim = torch.zeros(sim.shape[0], 1, dtype=sim.dtype, device=sim.device)
        counts = torch.zeros_like(counts)
    return _first_extreme_pairs(sim, labels, counts, num_classes, largest)


def _class_extreme(x_units: Tensor, labels: Tensor, items: Tensor, counts: Tensor,
                   largest: bool) -> Tensor:
    """Per class, the min (or max) cosine over (its samples in the batch) x (its memory).

    x_units (B, D) unit rows; labels (B,); items (C, N, D); counts (C,). Returns (C,), +inf
    (-inf for the max) for classes absent from the batch or with an empty memory. The value is
    read at the first extreme pair (``class_extremes_ref``), so that pair alone gets gradient.
    """
    num_classes = items.shape[0]
    fill = float("-inf") if largest else float("inf")
    sim = _own_class_similarities(x_units, labels, items, counts, largest)  # (B, N)
    if sim.numel() == 0:
        return torch.full((num_classes,), fill, dtype=sim.dtype, device=sim.device)
    _, arg_sample, arg_slot = _first_extreme_pairs(sim.detach(), labels, counts, num_classes,
                                                   largest)
    picked = sim[arg_sample.clamp_min(0), arg_slot.clamp_min(0)]  # (C,)
    return torch.where(arg_sample >= 0, picked, fill)


def released_class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """(C,) float64: how many times the authors' released loop counts each class's terms.

    It iterates ``set(labels)`` (numpy ints, whose hashes are their values) and adds its running
    sums to the loss once per class visited, so the class at position j of the n visited counts
    n - j times; absent classes count 0. The order is CPython's set order: ascending for most
    batches, but not always, since a small table folds large labels onto small slots
    (``set([2, 9])`` visits 9 first, ``set([0, 8, 4])`` 0, 8, 4). A host sync, fine for a
    compatibility switch."""
    order = list(set(labels.flatten().tolist()))  # the released loop's iteration order
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for j, c in enumerate(order):
        counts[c] = len(order) - j
    return counts.to(labels.device)


def combine_minimax_terms(rep_min: Tensor, div_max: Tensor, labels: Tensor, real_counts: Tensor,
                          gen_counts: Tensor, *, lambda_r: float, lambda_g: float,
                          accumulate_bug: bool = False) -> MinimaxTerms:
    """The minimax terms from the per-class extremes (see ``minimax_terms_ref``).

    rep_min (C,) min cosine with the real memory, div_max (C,) max cosine with the generated
    one, +-inf where a class has no pair; labels (B,); real_counts, gen_counts (C,).
    """
    num_classes = rep_min.shape[0]
    # index_fill_ takes the value as a kernel argument; ``present[labels] = True`` would copy it
    # from the host first, a synchronising transfer on a GPU.
    present = torch.zeros(num_classes, dtype=torch.bool, device=rep_min.device)  # (C,)
    present.index_fill_(0, labels, True)
    has_gen = present & (gen_counts > 0)  # (C,)
    has_real = has_gen & (real_counts > 0)  # (C,)
    weight = 1.0 / present.sum().to(rep_min.dtype)  # () 1/n
    if accumulate_bug:
        weight = weight * released_class_counts(labels, num_classes).to(rep_min)  # (C,)
    # Swap the +-inf of skipped classes for finite values first, so no inf reaches the
    # arithmetic (and no 0 * inf reaches a gradient).
    rep_min = torch.where(has_real, rep_min, 1.0)
    div_max = torch.where(has_gen, div_max, 0.0)
    rep = torch.where(has_real, lambda_r * weight * (1.0 - rep_min), 0.0)  # (C,)
    div = torch.where(has_gen, lambda_g * weight * div_max, 0.0)  # (C,)
    return MinimaxTerms(rep.sum() + div.sum(), rep, div)


def minimax_terms_ref(x0_hat: Tensor, labels: Tensor, real_items: Tensor, real_counts: Tensor,
                      gen_items: Tensor, gen_counts: Tensor, *, lambda_r: float,
                      lambda_g: float, accumulate_bug: bool = False) -> MinimaxTerms:
    """Representativeness and diversity terms of one batch against the memories (method.md 2).

    For each class c in the batch whose generated memory is non-empty, with n the number of
    distinct classes in the batch:
      rep[c] = lambda_r / n * (1 - min_{i: label c, r in M_real[c]} cos(x0_hat_i, r))
      div[c] = lambda_g / n *     max_{i: label c, g in M_gen[c]}  cos(x0_hat_i, g)
    rep[c] is skipped (0) when M_real[c] is empty. One scalar min/max per class over the whole
    samples-by-memory matrix, so only the extreme sample gets gradient; memories get none.

    ``accumulate_bug=True`` reproduces the authors' released loop, which adds running sums
    inside its loop over ``set(labels)``: the class at position j of the n it visits counts
    n - j times, in CPython's set order (``released_class_counts``). NOT the method.

    x0_hat (B, D) any float dtype; labels (B,) int64 in [0, C); real_items (C, N_R, D);
    real_counts (C,); gen_items (C, N_G, D); gen_counts (C,). Returns MinimaxTerms with total ()
    and rep, div (C,) in float32 (float64 for float64 input). No host synchronisation.
    """
    x = unit_rows_ref(x0_hat)  # (B, D)
    rep_min = _class_extreme(x, labels, real_items, real_counts, largest=False)  # (C,)
    div_max = _class_extreme(x, labels, gen_items, gen_counts, largest=True)  # (C,)
    return combine_minimax_terms(rep_min, div_max, labels, real_counts, gen_counts,
                                 lambda_r=lambda_r, lambda_g=lambda_g,
                                 accumulate_bug=accumulate_bug)
