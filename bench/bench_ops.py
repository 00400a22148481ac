"""Speed of the memory-bank ops: pure-torch reference against the compiled and Triton paths.

    pytest bench --benchmark-only --benchmark-json=bench-ops.json

Each benchmark's extra_info carries the bytes it must read, so GB/s can be read off the JSON.
"""

import pytest
import torch

from ddfast import _ext, perf
from ddfast.ref import similarity_degree_ref


def _sync(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        torch.cuda.synchronize()
    return x


@pytest.mark.benchmark(group="similarity_degree")
def test_similarity_degree_ref(benchmark, memory_items):
    benchmark.extra_info["bytes"] = memory_items.numel() * 4
    benchmark(lambda: _sync(similarity_degree_ref(memory_items)))


@pytest.mark.benchmark(group="similarity_degree")
def test_similarity_degree_cpp(benchmark, memory_items):
    benchmark.extra_info["bytes"] = memory_items.numel() * 4
    benchmark(lambda: _ext.similarity_degree(memory_items))


@pytest.mark.benchmark(group="similarity_degree")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton is timed on a GPU only")
def test_similarity_degree_triton(benchmark, memory_items):
    from ddfast.kernels.similarity import similarity_degree

    items = memory_items.cuda()
    benchmark.extra_info["bytes"] = items.numel() * 4
    benchmark(lambda: _sync(similarity_degree(items)))


@pytest.mark.benchmark(group="similarity_degree")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_similarity_degree_cuda(benchmark, memory_items):
    items = memory_items.cuda()
    benchmark.extra_info["bytes"] = items.numel() * 4
    benchmark(lambda: _sync(_ext.similarity_degree(items)))


# The step shapes of both minimax extremes and insertion: (B samples, C classes, N slots, D dims).
# DiT-XL/2's D = 4096 with 64-slot memories, and a large batch against 4096-slot memories (CUDA
# only). Insertion starts from full memories, so every class evicts its batch count.
STEP_SHAPES = [(8, 10, 64, 4096), (256, 10, 4096, 4096)]


@pytest.fixture(params=[pytest.param(s, id=f"B{s[0]}xC{s[1]}xN{s[2]}xD{s[3]}")
                        for s in STEP_SHAPES])
def step_shape(request):
    return request.param


def _extremes_inputs(shape, device):
    """Random x, labels, full memories; skips shapes too large for the device."""
    batch, num_classes, slots, dim = shape
    if batch * slots * dim > 2**26 and device != "cuda":
        pytest.skip("the large shape is timed on a GPU only")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(batch, dim, device=device) * 30
    labels = torch.randint(0, num_classes, (batch,), device=device)
    items = torch.randn(num_classes, slots, dim, device=device)
    counts = torch.full((num_classes,), slots, dtype=torch.int64, device=device)
    return x, labels, items, counts


def _extremes_info(benchmark, shape, x):
    batch, _, slots, dim = shape
    benchmark.extra_info["device"] = x.device.type
    benchmark.extra_info["bytes"] = batch * slots * dim * 4 + batch * dim * 4  # own-class reads
    benchmark.extra_info["flops"] = 4 * batch * slots * dim  # dot and item norm per pair


def _ref_device():
    """Where the reference runs: the GPU when there is one, so that the ratios in a GPU run
    compare like with like; else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.benchmark(group="class_extremes")
def test_class_extremes_ref(benchmark, step_shape):
    from ddfast.ref import class_extremes_ref

    args = _extremes_inputs(step_shape, _ref_device())
    _extremes_info(benchmark, step_shape, args[0])
    benchmark(lambda: _sync(class_extremes_ref(*args, False)[0]))


@pytest.mark.benchmark(group="class_extremes")
def test_class_extremes_ref_compiled(benchmark, step_shape):
    from ddfast.ref import class_extremes_ref

    args = _extremes_inputs(step_shape, _ref_device())
    _extremes_info(benchmark, step_shape, args[0])
    compiled = perf.compile(class_extremes_ref, fullgraph=True)
    compiled(*args, False)  # compile outside the timing
    benchmark(lambda: _sync(compiled(*args, False)[0]))


@pytest.mark.benchmark(group="class_extremes")
def test_class_extremes_cpp(benchmark, step_shape):
    args = _extremes_inputs(step_shape, "cpu")
    _extremes_info(benchmark, step_shape, args[0])
    benchmark(lambda: _ext.class_extremes(*args, False))


@pytest.mark.benchmark(group="class_extremes")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton is timed on a GPU only")
def test_class_extremes_triton(benchmark, step_shape):
    from ddfast.kernels.minimax import class_extremes

    args = _extremes_inputs(step_shape, "cuda")
    _extremes_info(benchmark, step_shape, args[0])
    benchmark(lambda: _sync(class_extremes(*args, False)[0]))


@pytest.mark.benchmark(group="class_extremes")
@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda()),
                    reason="needs a CUDA device and the CUDA build")
def test_class_extremes_cuda(benchmark, step_shape):
    args = _extremes_inputs(step_shape, "cuda")
    _extremes_info(benchmark, step_shape, args[0])
    benchmark(lambda: _sync(_ext.class_extremes(*args, False)[0]))


def _insert_device(shape, device):
    batch, _, slots, dim = shape
    large = (slots + batch) * dim * min(batch, shape[1]) > 2**26
    if device == "cuda" or large:
        if not torch.cuda.is_available():
            pytest.skip("the large shape is timed on a GPU only" if large else "needs CUDA")
        return "cuda"
    return "cpu"


def _bench_insert(benchmark, shape, device, fn):
    """Times fn(items, counts, new_items, labels) on fresh copies of full memories each round
    (the op mutates them); the copy is outside the timing."""
    batch, num_classes, slots, dim = shape
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(num_classes, slots, dim, generator=gen).to(device)
    counts = torch.full((num_classes,), slots, dtype=torch.int64, device=device)
    new_items = torch.randn(batch, dim, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    # Each class's pool (memory + its batch items) is read once per eviction.
    benchmark.extra_info["bytes"] = batch * (slots + batch) * dim * 4
    benchmark.extra_info["device"] = device

    def setup():
        return (base.clone(), counts.clone(), new_items, labels), {}

    def run(items, cnt, new, lab):
        fn(items, cnt, new, lab)
        if items.is_cuda:
            torch.cuda.synchronize()

    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="insert_adaptive")
def test_insert_adaptive_ref(benchmark, step_shape):
    from ddfast.ref import insert_adaptive_ref

    device = _insert_device(step_shape, _ref_device())
    _bench_insert(benchmark, step_shape, device, insert_adaptive_ref)


@pytest.mark.benchmark(group="insert_adaptive")
def test_insert_adaptive_cpp(benchmark, step_shape):
    if _insert_device(step_shape, "cpu") != "cpu":
        pytest.skip("the compiled CPU path is timed at the CPU shape only")
    _bench_insert(benchmark, step_shape, "cpu",
                  lambda *args: _ext.insert_memory(*args, True))


@pytest.mark.benchmark(group="insert_adaptive")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton is timed on a GPU only")
def test_insert_adaptive_triton(benchmark, step_shape):
    from ddfast.kernels.memory_insert import insert_memory

    _bench_insert(benchmark, step_shape, "cuda", lambda *args: insert_memory(*args, True))


@pytest.mark.benchmark(group="insert_adaptive")
@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda()),
                    reason="needs a CUDA device and the CUDA build")
def test_insert_adaptive_cuda(benchmark, step_shape):
    _bench_insert(benchmark, step_shape, "cuda",
                  lambda *args: _ext.insert_memory_cuda(*args, True))


# Epoch pruning of one class: K = 1300 items (about an ImageNet class's share of an epoch) to
# N = 64, D = 4096.
PRUNE_SHAPE = (1300, 64, 4096)


def _bench_prune(benchmark, device, fn):
    num, capacity, dim = PRUNE_SHAPE
    x = torch.randn(num, dim, generator=torch.Generator().manual_seed(0)).to(device)
    benchmark.extra_info["bytes"] = (num - capacity) * num * dim * 4 // 2  # shrinking pool reads
    benchmark.extra_info["device"] = device

    def run():
        out = fn(x, capacity)
        if out.is_cuda:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="prune_adaptive")
def test_prune_adaptive_ref(benchmark):
    from ddfast.ref import prune_adaptive_ref

    _bench_prune(benchmark, _ref_device(), prune_adaptive_ref)


@pytest.mark.benchmark(group="prune_adaptive")
def test_prune_adaptive_cpp(benchmark):
    _bench_prune(benchmark, "cpu", _ext.prune_adaptive)


@pytest.mark.benchmark(group="prune_adaptive")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton is timed on a GPU only")
def test_prune_adaptive_triton(benchmark):
    from ddfast.kernels.memory_insert import prune_adaptive

    _bench_prune(benchmark, "cuda", prune_adaptive)


@pytest.mark.benchmark(group="prune_adaptive")
@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda()),
                    reason="needs a CUDA device and the CUDA build")
def test_prune_adaptive_cuda(benchmark):
    _bench_prune(benchmark, "cuda", _ext.prune_adaptive_cuda)
