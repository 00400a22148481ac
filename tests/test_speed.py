"""The speed benchmark's workloads (ddfast.speed): the reference path computes the same memory
terms as ddfast's reference, and every closure runs (at a tiny size, on the CPU)."""

import pytest
import torch

from ddfast.ref import minimax_terms_ref
from ddfast.speed import (
    ListMemory,
    build_workload,
    ddfast_finetune_step,
    ddfast_sample,
    reference_finetune_step,
    reference_memory_terms,
    reference_sample,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def as_tensors(memory: ListMemory, dim: int):
    """The list memory as ddfast's (C, N, D) items and (C,) counts."""
    num_classes = len(memory.items)
    items = torch.zeros(num_classes, memory.capacity, dim)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for c, rows in enumerate(memory.items):
        if rows:
            items[c, :len(rows)] = torch.stack(rows)
            counts[c] = len(rows)
    return items, counts


def test_reference_memory_terms_equal_ddfast_reference():
    gen = torch.Generator().manual_seed(0)
    real, fake = ListMemory(5, 4), ListMemory(5, 3)
    for _ in range(6):
        x = torch.randn(7, 24, generator=gen)
        labels = torch.randint(0, 4, (7,), generator=gen)
        real.insert(x, labels)
        fake.insert(x * 0.5 + torch.randn(7, 24, generator=gen), labels)
    x = torch.randn(9, 24, generator=gen) * 5
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 0, 4])  # class 4 has empty memories
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = reference_memory_terms(xa, labels, real, fake, lambda_r=0.3, lambda_g=0.7)
    want = minimax_terms_ref(xb, labels, *as_tensors(real, 24), *as_tensors(fake, 24),
                             lambda_r=0.3, lambda_g=0.7)
    assert float(want.rep.sum()) > 0 and float(want.div.sum()) > 0
    for name in ("total", "rep", "div"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5,
                                   atol=1e-6)
    got.total.backward()
    want.total.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-7)


def test_every_workload_closure_runs():
    w = build_workload("tiny", "cpu", num_classes=4)
    assert w.finetune_gflop() is None
    ours, theirs = ddfast_finetune_step(w, 4, capacity=2, compile=False), \
        reference_finetune_step(w, 4, capacity=2)
    first, second = ours(), ours()
    assert first.shape == (5,) and torch.isfinite(second).all() and second[4] > 0
    assert torch.isfinite(theirs()) and torch.isfinite(theirs())
    images = ddfast_sample(w, steps=3, compile=False)(2, label=1)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    one = reference_sample(w, steps=3)(label=1, index=0)
    assert one.shape == (1, 3, 32, 32)
    # The same seeds give the same image whether sampled alone or in a batch.
    torch.testing.assert_close(one[0], images[0], rtol=1e-4, atol=1e-4)
