"""Evaluation networks: shapes at every resolution, instance norm, sizes, and real learning."""

import pytest
import torch
from torch import nn

from ddfast.data import open_source
from ddfast.eval.networks import build_network


@pytest.mark.parametrize("name", ["convnet3", "convnet6", "resnetap10", "resnet18"])
@pytest.mark.parametrize("res,channels", [(8, 1), (28, 1), (32, 3)])
def test_forward_backward_at_small_resolutions(name, res, channels):
    net = build_network(name, num_classes=7, channels=channels, resolution=res)
    x = torch.randn(2, channels, res, res)
    out = net(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("name", ["convnet6", "resnetap10", "resnet18"])
def test_imagenet_resolution(name):
    net = build_network(name, num_classes=10, channels=3, resolution=224)
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 10)


def test_sizes_and_structure():
    r18 = build_network("resnet18", num_classes=1000, channels=3, resolution=224)
    n = sum(p.numel() for p in r18.parameters())
    assert abs(n - 11.69e6) / 11.69e6 < 0.01, n
    ap = build_network("resnetap10", num_classes=10, channels=3, resolution=224)
    blocks = [m for m in ap.layers]
    assert len(blocks) == 4
    strided = [m for name, m in ap.layers.named_modules()
               if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided == []  # ResNetAP downsamples by average pooling only
    with pytest.raises(ValueError, match="resnetap10"):
        build_network("vgg11", num_classes=10, channels=3, resolution=32)


def test_convnet3_learns_digits_to_95_percent():
    torch.manual_seed(0)
    train, test = open_source("digits", "train"), open_source("digits", "test")
    x = train.images(range(len(train))).float() / 255
    xt = test.images(range(len(test))).float() / 255
    y, yt = train.labels, test.labels
    net = build_network("convnet3", num_classes=10, channels=1, resolution=8)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    assert acc >= 0.95, acc
