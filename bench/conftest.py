"""Benchmark setup: shapes shared by the bench files, device facts in the JSON."""

import platform

import pytest
import torch

# (K items, D dims): a step memory (64 + one batch of 8), a per-epoch prune, DiT-XL/2's D = 4096.
MEMORY_SHAPES = [(72, 4096), (1300, 4096)]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["cpu"] = platform.processor() or platform.machine()
    machine_info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()


@pytest.fixture(params=[pytest.param(s, id=f"K{s[0]}xD{s[1]}") for s in MEMORY_SHAPES])
def memory_items(request):
    k, d = request.param
    return torch.randn(k, d)
