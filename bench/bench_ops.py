"""Speed of the memory-bank ops: pure-torch reference against the compiled and Triton paths.

    pytest bench --benchmark-only --benchmark-json=bench-ops.json

Each benchmark's extra_info carries the bytes it must read, so GB/s can be read off the JSON.
"""

import pytest
import torch

from ddfast import _ext
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
