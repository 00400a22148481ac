"""Diversity measures against brute-force loops."""

import itertools

import pytest
import torch

from ddfast.eval.diversity import coverage, features, pairwise_cosine_distance, set_diversity
from ddfast.eval.networks import build_network


def _pairwise_loop(f):
    pairs = [(i, j) for i, j in itertools.permutations(range(f.shape[0]), 2)]
    cos = torch.nn.functional.cosine_similarity
    return sum(1 - float(cos(f[i].double(), f[j].double(), dim=0)) for i, j in pairs) / len(pairs)


def _coverage_loop(real, fake, k):
    covered = 0
    for i in range(real.shape[0]):
        d = sorted(float((real[i] - real[j]).double().norm()) for j in range(real.shape[0])
                   if j != i)
        radius = d[k - 1]
        covered += any(float((real[i] - f).double().norm()) <= radius for f in fake)
    return covered / real.shape[0]


def test_pairwise_distance_matches_loop():
    f = torch.randn(7, 13, generator=torch.Generator().manual_seed(0))
    assert pairwise_cosine_distance(f) == pytest.approx(_pairwise_loop(f), abs=1e-12)
    assert pairwise_cosine_distance(f[:1]) is None
    assert pairwise_cosine_distance(f[:1].repeat(4, 1)) == pytest.approx(0.0, abs=1e-12)


def test_coverage_matches_loop_and_its_bounds():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 6, generator=g)
    fake = torch.randn(9, 6, generator=g) * 0.7
    assert coverage(real, fake, 5) == pytest.approx(_coverage_loop(real, fake, 5))
    assert coverage(real, real, 5) == 1.0
    assert coverage(real, real[:1] + 100.0, 5) == 0.0
    with pytest.raises(ValueError, match="more than k"):
        coverage(real[:5], fake, 5)


def test_set_diversity_is_the_class_mean():
    g = torch.Generator().manual_seed(2)
    real_f, real_y = torch.randn(60, 4, generator=g), torch.arange(60) % 3
    fake_f, fake_y = torch.randn(9, 4, generator=g), torch.arange(9) % 3
    out = set_diversity(real_f, real_y, fake_f, fake_y)
    covs = [coverage(real_f[real_y == c], fake_f[fake_y == c]) for c in range(3)]
    pws = [pairwise_cosine_distance(fake_f[fake_y == c]) for c in range(3)]
    assert out["coverage"] == pytest.approx(sum(covs) / 3)
    assert out["pairwise"] == pytest.approx(sum(pws) / 3)
    assert [p["class"] for p in out["per_class"]] == [0, 1, 2]
    one = set_diversity(real_f, real_y, fake_f[:3], fake_y[:3])  # IPC 1
    assert one["pairwise"] is None


def test_features_are_the_classifier_input():
    torch.manual_seed(0)
    net = build_network("convnet3", num_classes=10, channels=1, resolution=28).train()
    x = torch.randn(5, 1, 28, 28)
    f = features(net, x, batch_size=2)
    assert f.shape == (5, net.classifier.in_features)
    assert net.training  # the mode it had is restored
    with torch.no_grad():
        torch.testing.assert_close(net.classifier(f), net.eval()(x))
