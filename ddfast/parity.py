"""The fused memory ops against their pure-torch specification (``ddfast.ref``): the cases and the
checks that the test suite and ``python -m ddfast.check`` share.

Each ``check_*`` runs the op through whatever backend ``DDFAST_BACKEND`` (or the automatic choice)
selects, on the device its inputs live on, and raises ``ParityError`` naming what differs;
otherwise it returns the largest differences it saw. What must match exactly matches exactly
(the items a memory keeps, the extreme pair outside near-ties); floating-point values are held to
bounds derived from the computation (``cos_atol``), never to figures tuned on one machine.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddfast.memory import minimax_terms
from ddfast.ops import insert_memory, prune_adaptive
from ddfast.ref import (
    class_extremes_ref,
    insert_adaptive_ref,
    insert_fifo_ref,
    minimax_terms_ref,
    prune_adaptive_ref,
    similarity_degree_ref,
)

__all__ = ["ParityError", "awkward_insert_case", "check_empty", "check_extremes",
           "check_insert", "check_prune", "check_prune_case", "check_similarity_degree",
           "check_ties", "cos_atol", "extremes_case", "insert_case", "memory", "rows",
           "tie_case"]

LAMBDAS = {"lambda_r": 0.5, "lambda_g": 0.25}
FP32_UNIT = 2.0**-24  # unit roundoff of float32


class ParityError(AssertionError):
    """A fused op disagrees with the reference."""


def cos_atol(dim: int) -> float:
    """Bound on |cos_fast - cos_ref| for float32 cosines of D-vectors: each side's dot product
    and norms carry a rounding error that grows like sqrt(D) unit roundoffs for sums in any
    order (blocked, pairwise or SIMD lanes); 8 sqrt(D) u covers both sides with margin, and
    stays far below the gaps between distinct cosines of random data."""
    return 8.0 * math.sqrt(dim) * FP32_UNIT


# ---------------------------------------------------------------- cases


def rows(num: int, dim: int, gen: torch.Generator) -> Tensor:
    """Random rows of varied norms (never zero)."""
    return torch.randn(num, dim, generator=gen) * (torch.rand(num, 1, generator=gen) * 4 + 0.1)


def memory(num_classes: int, slots: int, dim: int, counts: Tensor, gen: torch.Generator) -> Tensor:
    """Random items (C, N, D) with the slots past each count held at zero (as memories keep
    them)."""
    items = rows(num_classes * slots, dim, gen).view(num_classes, slots, dim)
    used = torch.arange(slots).unsqueeze(0) < counts.unsqueeze(1)  # (C, N)
    return torch.where(used.unsqueeze(-1), items, 0.0)


def extremes_case(batch: int, num_classes: int, slots: int, dim: int, dtype: torch.dtype,
                  seed: int) -> tuple[Tensor, ...]:
    """(x, labels, real, real_counts, fake, gen_counts): a batch missing the last class, an empty
    real memory for class 1 and an empty generated memory for class 2; other counts random in
    [1, slots]."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, dim, generator=gen) * 30).to(dtype)
    labels = torch.randint(0, num_classes - 1, (batch,), generator=gen)
    labels[:3] = torch.tensor([0, 1, 2])
    real_counts = torch.randint(1, slots + 1, (num_classes,), generator=gen)
    gen_counts = torch.randint(1, slots + 1, (num_classes,), generator=gen)
    real_counts[1] = 0
    gen_counts[2] = 0
    real = memory(num_classes, slots, dim, real_counts, gen)
    fake = memory(num_classes, slots, dim, gen_counts, gen)
    return x, labels, real, real_counts, fake, gen_counts


def tie_case(largest: bool, dim: int = 64) -> tuple[Tensor, ...]:
    """(x, labels, items, counts): class 0 holds two exact copies of its extreme item (slots 1
    and 3), and samples 1 and 3 are exact copies of each other, so the pair (1, 1) must win over
    (1, 3), (3, 1) and (3, 3)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, dim, generator=gen)
    x[3] = x[1]
    labels = torch.tensor([0, 0, 1, 0, 1])
    counts = torch.tensor([5, 4])
    items = memory(2, 5, dim, counts, gen) * 0.01  # weak cosines
    sign = 1.0 if largest else -1.0
    items[0, 1] = items[0, 3] = sign * 3.0 * x[1]  # cos = +-1 with samples 1 and 3
    return x, labels, items, counts


def insert_case(num_classes: int, slots: int, dim: int, batch: int,
                seed: int) -> tuple[Tensor, ...]:
    """(items, counts, new_items, labels): memories with random counts (class 0 empty, class 1
    full), a batch that never holds the last class and always holds classes 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, slots + 1, (num_classes,), generator=gen)
    counts[0] = 0
    if num_classes > 2:
        counts[1] = slots
    items = memory(num_classes, slots, dim, counts, gen)
    labels = torch.randint(0, max(num_classes - 1, 1), (batch,), generator=gen)
    labels[: min(2, batch, num_classes)] = torch.arange(min(2, batch, num_classes))
    return items, counts, rows(batch, dim, gen), labels


def awkward_insert_case(num_classes: int, slots: int, dim: int, batch: int,
                        seed: int) -> tuple[Tensor, ...]:
    """``insert_case`` whose batch also holds a zero item (row 1) and, from 5 rows on, an exact
    duplicate of a stored item (row 4)."""
    items, counts, new_items, labels = insert_case(num_classes, slots, dim, batch, seed)
    new_items[1] = 0.0
    if batch > 4:
        new_items[4] = items[1, 0]
    return items, counts, new_items, labels


# ---------------------------------------------------------------- checks


def _near_tie_rows(x, items, got, want, atol) -> set[int]:
    """Samples whose gradients may legitimately differ: those of classes where the two sides
    chose different pairs, which must then be near-ties of the reference's extreme."""
    _, got_s, got_j = (t.cpu() for t in got)
    want_v, want_s, want_j = (t.cpu() for t in want)
    out: set[int] = set()
    for c in torch.nonzero((got_s != want_s) | (got_j != want_j)).flatten().tolist():
        if got_s[c] < 0 or want_s[c] < 0:
            raise ParityError(f"class {c}: only one side found a pair")
        i, j = int(got_s[c]), int(got_j[c])
        xi = x[i].double().cpu()
        m = items[c, j].double().cpu()
        cos = float(xi @ m) / (float(xi.norm().clamp_min(1e-8)) * float(m.norm().clamp_min(1e-8)))
        gap = abs(cos - float(want_v[c]))
        if gap > atol:
            raise ParityError(f"class {c}: pair ({i}, {j}) is {gap:.3g} from the extreme "
                              f"(bound {atol:.3g})")
        out |= {i, int(want_s[c])}
    return out


def check_extremes(x: Tensor, labels: Tensor, real: Tensor, real_counts: Tensor, fake: Tensor,
                   gen_counts: Tensor, *, accumulate_bug: bool = False) -> dict[str, float]:
    """class_extremes against class_extremes_ref (values and pairs, both memories), then the
    memory terms and their gradient in x against minimax_terms_ref."""
    atol = cos_atol(x.shape[1])
    worst = {"value": 0.0, "grad_rel": 0.0}
    skip_rows: set[int] = set()
    for items, counts, largest in ((real, real_counts, False), (fake, gen_counts, True)):
        got = torch.ops.ddfast.class_extremes(x, labels, items, counts, largest)
        want = class_extremes_ref(x, labels, items, counts, largest)
        if got[0].dtype != torch.float32 or got[1].dtype != torch.int64:
            raise ParityError(f"dtypes {got[0].dtype}/{got[1].dtype}, want float32/int64")
        finite = want[0].isfinite()
        if not torch.equal(got[0].isfinite(), finite) or not torch.equal(
                got[0][~finite], want[0][~finite]):
            raise ParityError("classes without a pair differ (want +-inf and -1)")
        err = float((got[0][finite] - want[0][finite]).abs().max()) if finite.any() else 0.0
        if err > atol:
            raise ParityError(f"{'max' if largest else 'min'} cosine differs by {err:.3g} "
                              f"(bound {atol:.3g} at D {x.shape[1]})")
        worst["value"] = max(worst["value"], err)
        skip_rows |= _near_tie_rows(x, items, got, want, atol)
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = minimax_terms(xg, labels, real, real_counts, fake, gen_counts,
                        accumulate_bug=accumulate_bug, **LAMBDAS)
    want = minimax_terms_ref(xr, labels, real, real_counts, fake, gen_counts,
                             accumulate_bug=accumulate_bug, **LAMBDAS)
    for name in ("total", "rep", "div"):
        err = float((getattr(got, name) - getattr(want, name)).detach().abs().max())
        # each term is a lambda-weighted sum of at most C cosines
        bound = atol * (LAMBDAS["lambda_r"] + LAMBDAS["lambda_g"]) * real.shape[0]
        if err > bound:
            raise ParityError(f"memory term {name} differs by {err:.3g} (bound {bound:.3g})")
    got.total.backward()
    want.total.backward()
    keep = [i for i in range(x.shape[0]) if i not in skip_rows]
    g, w = xg.grad[keep].float(), xr.grad[keep].float()
    if g.numel():
        scale = float(w.abs().max().clamp_min(1e-30))
        # The gradient is (m_hat - cos u) / |x|: a few roundoffs of each unit vector, plus the
        # cosine's error times |u|; relative to the largest entry. bf16 inputs: 8 bits.
        rtol = 1e-4 if x.dtype == torch.float32 else 1.6e-2
        rel = float((g - w).abs().max()) / scale
        if rel > rtol:
            row, col = divmod(int((g - w).abs().argmax()), g.shape[1])
            raise ParityError(f"gradient differs by {rel:.3g} of its scale at (row {row}, col "
                              f"{col}); bound {rtol:g}")
        worst["grad_rel"] = rel
    if not torch.equal(xg.grad.float().abs().sum(1) > 0, xr.grad.float().abs().sum(1) > 0):
        raise ParityError("gradient reaches other samples than the extreme pairs'")
    return worst


def check_ties(largest: bool, device: torch.device | str = "cpu") -> dict[str, float]:
    """Exact ties go to the first (sample, slot) pair in row-major order."""
    x, labels, items, counts = (t.to(device) for t in tie_case(largest))
    values, arg_sample, arg_slot = torch.ops.ddfast.class_extremes(x, labels, items, counts,
                                                                   largest)
    pair = (int(arg_sample[0]), int(arg_slot[0]))
    if pair != (1, 1):
        raise ParityError(f"an exact tie went to pair {pair}, not the first pair (1, 1)")
    want = 1.0 if largest else -1.0
    err = abs(float(values[0]) - want)
    if err > cos_atol(x.shape[1]):
        raise ParityError(f"tied cosine is {float(values[0])!r}, want {want}")
    ref = class_extremes_ref(x, labels, items, counts, largest)
    if not (torch.equal(arg_sample, ref[1]) and torch.equal(arg_slot, ref[2])):
        raise ParityError("pairs of the other classes differ from the reference")
    return {"value": err}


def check_insert(items: Tensor, counts: Tensor, new_items: Tensor, labels: Tensor,
                 adaptive: bool) -> dict[str, float]:
    """Insert through the op (in place) and compare exactly with the reference on copies."""
    want_items, want_counts = items.clone(), counts.clone()
    (insert_adaptive_ref if adaptive else insert_fifo_ref)(want_items, want_counts, new_items,
                                                           labels)
    insert_memory(items, counts, new_items, labels, adaptive)
    if not torch.equal(counts, want_counts):
        raise ParityError(f"counts {counts.tolist()}, want {want_counts.tolist()}")
    if not torch.equal(items, want_items):
        bad = (items != want_items).flatten(1).any(1).nonzero().flatten().tolist()
        raise ParityError(f"kept items differ in classes {bad}")
    return {}


def check_prune(x: Tensor, capacity: int) -> dict[str, float]:
    """prune_adaptive keeps exactly the rows the reference keeps."""
    got, want = prune_adaptive(x, capacity), prune_adaptive_ref(x, capacity)
    got, want = got.cpu().tolist(), want.cpu().tolist()
    if got != want:
        diff = sorted(set(got) ^ set(want))[:4]
        raise ParityError(f"kept rows differ from the reference's ({len(got)} against "
                          f"{len(want)} rows; first rows kept by one side only: {diff})")
    return {}


def check_empty(dim: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """Every memory empty: each class gets +inf (min) / -inf (max) and no pair; then one class
    filled, the others still without a pair."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, dim, generator=gen).to(device)
    labels = torch.tensor([2, 2, 0], device=device)
    items = torch.zeros(4, 6, dim, device=device)
    counts = torch.zeros(4, dtype=torch.int64, device=device)
    for largest, fill in ((False, float("inf")), (True, float("-inf"))):
        values, arg_sample, arg_slot = torch.ops.ddfast.class_extremes(x, labels, items, counts,
                                                                       largest)
        if not (values.eq(fill).all() and arg_sample.eq(-1).all() and arg_slot.eq(-1).all()):
            raise ParityError(f"empty memories gave {values.tolist()}, pairs "
                              f"{arg_sample.tolist()}; want {fill} and -1")
    counts[2] = 2
    items[2, :2] = torch.randn(2, dim, generator=gen).to(device)
    return check_extremes(x, labels, items, counts, items, counts)


def check_prune_case(num: int, dim: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """prune_adaptive on random rows with exact duplicates and zero vectors, at capacities 64,
    3 and 1."""
    x = rows(num, dim, torch.Generator().manual_seed(31))
    x[num // 4: num // 4 + 10] = x[num // 8]  # exact duplicates
    x[[7, num // 2]] = 0.0  # zero vectors
    x = x.to(device)
    for capacity in (64, 3, 1):
        check_prune(x, capacity)
    return {}


def check_similarity_degree(backend: str, num: int, dim: int,
                            device: torch.device | str = "cpu") -> dict[str, float]:
    """The similarity degree of a backend (``cpp``/``cuda``: the compiled module; ``triton``)
    against the float64 reference: each s_i sums K cosines, so the bound is K cosine bounds."""
    x = rows(num, dim, torch.Generator().manual_seed(5))
    x[3] = 0.0
    want = similarity_degree_ref(x.double())
    x = x.to(device)
    if backend == "triton":
        from ddfast.kernels.similarity import similarity_degree

        got = similarity_degree(x)
    else:
        from ddfast import _ext

        got = _ext.similarity_degree(x)
    err = float((got.double().cpu() - want).abs().max())
    bound = num * cos_atol(dim)
    if err > bound:
        raise ParityError(f"similarity degree differs by {err:.3g} (bound {bound:.3g})")
    return {"value": err}
