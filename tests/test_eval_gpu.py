"""The quality measures with the classifier on a GPU and the reference features on the CPU, as
a study computes them there."""

import pytest
import torch

from ddfast.eval.networks import build_network
from ddfast.eval.quality import quality

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_quality_takes_a_gpu_classifier_and_cpu_reference_features():
    torch.manual_seed(0)
    model = build_network("convnet3", num_classes=10, channels=1, resolution=28)
    x, y = torch.randn(64, 1, 28, 28), torch.arange(64) % 10
    ref = torch.randn(80, 2048)
    on_cpu = quality(model, x, y, ref, k=3)
    on_gpu = quality(model.cuda(), x.cuda(), y.cuda(), ref, k=3)
    assert on_gpu.keys() == on_cpu.keys()
    # The features differ by the GPU's float32 rounding (convolutions, TF32 off by default);
    # the Fréchet distance, a difference of sums over 2048 dimensions, to a relative 1e-3.
    assert on_gpu["fd"] == pytest.approx(on_cpu["fd"], rel=1e-3)
    # An untrained classifier's near-ties may flip an argmax or two.
    assert abs(on_gpu["fidelity"] - on_cpu["fidelity"]) <= 2 * 100 / 64
    assert on_gpu["n"] == on_cpu["n"] == 64
