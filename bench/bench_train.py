"""Speed of the whole job on a GPU: fine-tuning and sampling at DiT-XL/2 256 px (random weights,
the same FLOPs as the pretrained ones; the real VAE architecture), ddfast's path against a
reference path that does what the published code does (see ``ddfast.speed``).

    pytest bench/bench_train.py --benchmark-only --benchmark-json=results/bench/gpu-train.json
    python bench/summarize.py results/bench/gpu-train.json

Each benchmark's extra_info carries the images per call and the GFLOP they cost, so the summary
gives images/s and the share of the FLOP floor from the device's measured bf16 matmul rate.
Skipped without a CUDA device.
"""

import pytest
import torch

from ddfast.speed import (
    build_workload,
    ddfast_finetune_step,
    ddfast_sample,
    reference_finetune_step,
    reference_sample,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 50  # sampling steps, with guidance 4
SAMPLE_BATCH = 32  # images per ddfast sampling call


@pytest.fixture(scope="module")
def workload():
    torch.backends.cuda.matmul.allow_tf32 = True  # the reference runs TF32, as published
    torch.backends.cudnn.allow_tf32 = True
    return build_workload("xl", "cuda")


def _timed(benchmark, fn, images, gflop_per_image, rounds):
    benchmark.extra_info.update(images=images, device="cuda",
                                gflop=gflop_per_image * images if gflop_per_image else None)

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=3)


@pytest.mark.benchmark(group="finetune")
@pytest.mark.parametrize("batch", [8, 64])
def test_finetune_ddfast(benchmark, workload, batch):
    _timed(benchmark, ddfast_finetune_step(workload, batch), batch, workload.finetune_gflop(), 20)


@pytest.mark.benchmark(group="finetune")
@pytest.mark.parametrize("batch", [8, 64])
def test_finetune_ref(benchmark, workload, batch):
    _timed(benchmark, reference_finetune_step(workload, batch), batch,
           workload.finetune_gflop(), 10)


@pytest.mark.benchmark(group="sample")
def test_sample_ddfast(benchmark, workload):
    run = ddfast_sample(workload, steps=STEPS)
    _timed(benchmark, lambda: run(SAMPLE_BATCH), SAMPLE_BATCH, workload.sample_gflop(STEPS), 3)


@pytest.mark.benchmark(group="sample")
def test_sample_ref(benchmark, workload):
    run = reference_sample(workload, steps=STEPS)
    _timed(benchmark, run, 1, workload.sample_gflop(STEPS), 3)
