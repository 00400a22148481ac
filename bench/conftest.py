"""Benchmark setup: shapes shared by the bench files, device facts in the JSON."""

import importlib.util
import platform
import time

import pytest
import torch

# (K items, D dims): a step memory (64 + one batch of 8), a per-epoch prune, DiT-XL/2's D = 4096.
MEMORY_SHAPES = [(72, 4096), (1300, 4096)]


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured copy bandwidth of the device in GB/s: bytes read plus bytes written per second
    of the best of ``repeats`` tensor copies of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - began
        best = min(best, seconds)
    return 2 * nbytes / best / 1e9


def pytest_benchmark_update_machine_info(config, machine_info):
    from ddfast import _ext

    machine_info["torch"] = torch.__version__
    machine_info["cpu"] = platform.processor() or platform.machine()
    machine_info["threads"] = torch.get_num_threads()
    machine_info["ddfast_cuda_build"] = _ext.has_cuda()
    if importlib.util.find_spec("triton") is not None:
        import triton

        machine_info["triton"] = triton.__version__
    machine_info["cpu_copy_gbps"] = round(copy_bandwidth("cpu", 1 << 28), 1)
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["cuda"] = torch.version.cuda
        machine_info["gpu_copy_gbps"] = round(copy_bandwidth("cuda"), 1)
        from ddfast.perf import matmul_tflops

        machine_info["gpu_bf16_tflops"] = round(matmul_tflops("cuda"), 1)


@pytest.fixture(params=[pytest.param(s, id=f"K{s[0]}xD{s[1]}") for s in MEMORY_SHAPES])
def memory_items(request):
    k, d = request.param
    return torch.randn(k, d)
