"""The memory-bank ops on a GPU: the Triton and CUDA backends against the reference, on CUDA
tensors, plus the promise that no op waits for the device.

The CPU suite runs Triton through its interpreter on CPU tensors (test_ops.py,
test_ops_memory.py); this file is where the compiled GPU paths are checked, so it runs only
where a CUDA device is present.
"""

import pytest
import torch

from ddfast import _ext
from ddfast.ops import insert_memory, prune_adaptive
from ddfast.parity import (
    awkward_insert_case,
    check_extremes,
    check_insert,
    check_prune_case,
    extremes_case,
    rows,
    tie_case,
)
from ddfast.ref import class_extremes_ref, insert_adaptive_ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
    else:
        assert _ext.has_cuda(), "built without CUDA kernels: reinstall with DDFAST_CUDA=ON"
    monkeypatch.setenv("DDFAST_BACKEND", request.param)
    return request.param


def cuda(*tensors):
    return tuple(t.cuda() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim", [4096, 1152, 37])
@pytest.mark.parametrize("slots", [1, 64, 4096])
def test_class_extremes_parity(gpu_backend, dtype, dim, slots):
    batch = 64 if slots == 4096 else 8
    check_extremes(*cuda(*extremes_case(batch, 10, slots, dim, dtype, seed=dim + slots)))


@pytest.mark.parametrize("largest", [True, False], ids=["max", "min"])
def test_exact_ties_go_to_first_pair(gpu_backend, largest):
    x, labels, items, counts = cuda(*tie_case(largest))
    _, arg_sample, arg_slot = torch.ops.ddfast.class_extremes(x, labels, items, counts, largest)
    assert (int(arg_sample[0]), int(arg_slot[0])) == (1, 1)
    want = class_extremes_ref(x, labels, items, counts, largest)
    assert torch.equal(arg_sample, want[1]) and torch.equal(arg_slot, want[2])


def test_empty_memories_and_absent_classes(gpu_backend):
    x = torch.randn(3, 40, device="cuda")
    labels = torch.tensor([2, 2, 0], device="cuda")
    items = torch.zeros(4, 6, 40, device="cuda")
    counts = torch.zeros(4, dtype=torch.long, device="cuda")
    values, arg_sample, arg_slot = torch.ops.ddfast.class_extremes(x, labels, items, counts, True)
    assert values.eq(float("-inf")).all() and arg_sample.eq(-1).all() and arg_slot.eq(-1).all()


@pytest.mark.parametrize("shape", [(10, 64, 4096, 8), (10, 64, 1152, 64), (5, 1, 37, 12),
                                   (10, 4096, 256, 64)])
def test_insert_parity(gpu_backend, shape):
    num_classes, slots, dim, batch = shape
    items, counts, new_items, labels = cuda(*awkward_insert_case(num_classes, slots, dim, batch,
                                                                 seed=sum(shape)))
    for adaptive in (True, False):
        check_insert(items.clone(), counts.clone(), new_items, labels, adaptive)


def test_long_random_insertion_sequence(gpu_backend):
    """200 batches, items and counts compared with the reference after every batch."""
    gen = torch.Generator().manual_seed(23)
    items = torch.zeros(6, 16, 96, device="cuda")
    counts = torch.zeros(6, dtype=torch.int64, device="cuda")
    want_items, want_counts = items.clone(), counts.clone()
    for step in range(200):
        batch = int(torch.randint(1, 13, (), generator=gen))
        new_items = rows(batch, 96, gen).cuda()
        labels = torch.randint(0, 5, (batch,), generator=gen).cuda()
        insert_adaptive_ref(want_items, want_counts, new_items, labels)
        insert_memory(items, counts, new_items, labels, True)
        assert torch.equal(counts, want_counts), f"batch {step}"
        assert torch.equal(items, want_items), f"batch {step}"


def test_prune_parity(gpu_backend):
    check_prune_case(1300, 4096, "cuda")  # exact duplicates and zero vectors, capacities 64, 3, 1


def test_two_nonzero_items_beside_zero_items(gpu_backend):
    gen = torch.Generator().manual_seed(16)
    for trial in range(20):
        a, b = rows(2, 24, gen)
        b = b * float(torch.rand((), generator=gen)) * 3
        x = torch.stack([torch.zeros(24), a, torch.zeros(24), b]).cuda()  # (4, 24)
        for capacity, want in ((3, [0, 2, 3]), (2, [0, 2]), (1, [2])):
            assert prune_adaptive(x, capacity).tolist() == want, f"trial {trial}"


def test_no_op_waits_for_the_device(gpu_backend):
    """class_extremes (forward and backward), insertion and pruning enqueue work only."""
    x, labels, real, real_counts, fake, gen_counts = cuda(
        *extremes_case(16, 10, 64, 256, torch.float32, seed=5))
    x.requires_grad_()
    pool = torch.randn(300, 256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        values, _, _ = torch.ops.ddfast.class_extremes(x, labels, real, real_counts, False)
        torch.where(values.isfinite(), values, 0.0).sum().backward()
        insert_memory(fake, gen_counts, x.detach(), labels, True)
        insert_memory(real, real_counts, x.detach(), labels, False)
        prune_adaptive(pool, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
