"""Evaluation networks of the field, written here (no torchvision): ConvNet-D, ResNetAP-10 and
ResNet-18, all with instance normalisation (GroupNorm with one group per channel), at any input
resolution and channel count.

The designs follow IDC (Kim et al., 2022, ``models/convnet.py``, ``resnet_ap.py``, ``resnet.py``),
which the generative-distillation papers (Minimax, D4M, ...) evaluate with:

* ConvNet-D: D x [conv3x3 (padding 1), instance norm, ReLU, avg-pool 2x2], linear head on the
  flattened map. As in DC/DSA and IDC, the first conv pads a 1-channel input by 3, so 28 px
  grey images become 32 px maps (32-16-8-4, head Linear(2048, C) for ConvNet-3: 317,706
  parameters on Fashion-MNIST). The head is sized for whatever resolution the net is built for,
  and pooling stops once the map is 1x1 so any depth works on small images.
* ResNetAP-10: BasicBlock [1, 1, 1, 1], widths 64/128/256/512; a downsampling block average-pools
  (2x2) after its first conv's norm and ReLU, and its shortcut is conv1x1 -> avg-pool -> norm, so
  the net has no strided convolution at all.
* ResNet-18: BasicBlock [2, 2, 2, 2], strided convolutions as in torchvision.

Stem by resolution, as IDC's ``IntroBlock`` (its thresholds, not a single 64 px cut):

=============  ==================================  ==========================================
resolution     ResNetAP                            ResNet
=============  ==================================  ==========================================
<= 64          conv3x3 s1, norm, ReLU              conv3x3 s1, norm, ReLU
65 .. 128      conv3x3 s1, norm, ReLU, avg-pool 2  conv3x3 s1, norm, ReLU, max-pool 3 s2
> 128          conv7x7 s1, norm, ReLU, avg-pool 4  conv7x7 s2, norm, ReLU, max-pool 3 s2
=============  ==================================  ==========================================

Both ResNets end in global average pooling and a linear head; at 224 px either stem leaves a
56 x 56 map, so the stages see 56/28/14/7 as in ImageNet ResNets.
"""

from __future__ import annotations

import re

import torch
from torch import nn

NETWORKS: tuple[str, ...] = ("convnet3", "convnet6", "resnetap10", "resnet18")

_RESNET_WIDTHS = (64, 128, 256, 512)


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm as the field writes it: GroupNorm with one group per channel, affine."""
    return nn.GroupNorm(channels, channels, affine=True)


class ConvNet(nn.Module):
    """DC/DSA/IDC ConvNet: depth x [conv3x3, instance norm, ReLU, avg-pool 2], linear head.

    Input (B, channels, resolution, resolution) -> logits (B, num_classes).
    """

    def __init__(self, *, depth: int, width: int, channels: int, resolution: int,
                 num_classes: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"ConvNet depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        size, c_in = resolution, channels
        for d in range(depth):
            pad = 3 if (d == 0 and channels == 1) else 1  # DC's grey inputs: 28 px -> 32 px maps
            layers += [nn.Conv2d(c_in, width, 3, padding=pad), instance_norm(width), nn.ReLU()]
            size += 2 * (pad - 1)
            # A 1x1 map cannot be pooled again: deep nets on tiny images keep the 1x1 map.
            if size > 1:
                layers.append(nn.AvgPool2d(2, 2))
                size //= 2
            c_in = width
        self.features = nn.Sequential(*layers)
        self.feature_size = size  # side of the last map; the head depends on it
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, width, s, s)
        return self.classifier(h.flatten(1))  # (B, classes)


class BasicBlock(nn.Module):
    """ResNet basic block (two conv3x3). With ``avg_pool`` a stride-2 block downsamples by a 2x2
    average pool instead of a strided conv, in the main path (after norm1 + ReLU, as IDC) and in
    the shortcut (conv1x1 -> pool -> norm).

    (B, c_in, H, W) -> (B, c_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, avg_pool: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1 if avg_pool else stride, 1, bias=False)
        self.norm1 = instance_norm(c_out)
        self.pool = nn.AvgPool2d(stride, stride) if (avg_pool and stride > 1) else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = instance_norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if avg_pool:
                down = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), down,
                                              instance_norm(c_out))
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                              instance_norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(torch.relu(self.norm1(self.conv1(x))))  # (B, c_out, H', W')
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _stem(channels: int, resolution: int, avg_pool: bool) -> nn.Sequential:
    """IDC's IntroBlock: small (<= 64 px), mid (<= 128 px) or large stem; see the module doc."""
    if resolution <= 64:
        return nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), instance_norm(64),
                             nn.ReLU())
    if resolution <= 128:
        pool = nn.AvgPool2d(2, 2) if avg_pool else nn.MaxPool2d(3, 2, 1)
        return nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), instance_norm(64),
                             nn.ReLU(), pool)
    if avg_pool:  # ResNetAP: a stride-1 7x7 conv, then a 4x4 average pool does all the shrinking
        return nn.Sequential(nn.Conv2d(channels, 64, 7, 1, 3, bias=False), instance_norm(64),
                             nn.ReLU(), nn.AvgPool2d(4, 4))
    return nn.Sequential(nn.Conv2d(channels, 64, 7, 2, 3, bias=False), instance_norm(64),
                         nn.ReLU(), nn.MaxPool2d(3, 2, 1))


class ResNet(nn.Module):
    """ResNet with instance norm; ``avg_pool`` makes it IDC's ResNetAP.

    Input (B, channels, resolution, resolution) -> logits (B, num_classes).
    """

    def __init__(self, *, blocks: tuple[int, ...], channels: int, resolution: int,
                 num_classes: int, avg_pool: bool):
        super().__init__()
        self.stem = _stem(channels, resolution, avg_pool)
        stages: list[nn.Module] = []
        c_in = 64
        for i, (width, n) in enumerate(zip(_RESNET_WIDTHS, blocks, strict=True)):
            stage = []
            for k in range(n):
                stage.append(BasicBlock(c_in, width, 2 if (i > 0 and k == 0) else 1, avg_pool))
                c_in = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            # IDC's init: normal(0, sqrt(2 / (k * k * out_channels))), i.e. Kaiming fan-out.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))  # (B, 512, h, w)
        # Global average pooling: a map that shrank to 1x1 (8 px inputs) still works.
        return self.fc(h.mean(dim=(2, 3)))  # (B, classes)


def build_network(name: str, *, num_classes: int, channels: int, resolution: int,
                  width: int = 128) -> nn.Module:
    """Build one of NETWORKS, or ``convnet<D>`` for any depth D >= 1.

    ``width`` is the ConvNet's channel count; the ResNets always use 64/128/256/512.
    The net takes (B, channels, resolution, resolution) and returns (B, num_classes) logits.
    """
    m = re.fullmatch(r"convnet(\d+)", name)
    if m and int(m.group(1)) >= 1:
        return ConvNet(depth=int(m.group(1)), width=width, channels=channels,
                       resolution=resolution, num_classes=num_classes)
    if name == "resnetap10":
        return ResNet(blocks=(1, 1, 1, 1), channels=channels, resolution=resolution,
                      num_classes=num_classes, avg_pool=True)
    if name == "resnet18":
        return ResNet(blocks=(2, 2, 2, 2), channels=channels, resolution=resolution,
                      num_classes=num_classes, avg_pool=False)
    raise ValueError(f"unknown network {name!r}; valid: {', '.join(NETWORKS)} "
                     f"(or convnet<D> for any depth D >= 1)")
