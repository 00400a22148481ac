"""Evaluation networks of the field, written here (no torchvision): ConvNet-D, ResNetAP-10,
ResNet-18, all with instance normalisation (GroupNorm with one group per channel), at any input
resolution and channel count.
"""

from __future__ import annotations

import re

import torch
from torch import nn

NETWORKS = ("convnet3", "convnet6", "resnetap10", "resnet18")


def instance_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(channels, channels, affine=True)


class ConvNet(nn.Module):
    """DC/DSA/IDC ConvNet: depth x [conv3x3, instance norm, ReLU, avg-pool 2], linear head.

    Pooling stops once the feature map is 1x1, so deep nets work on small images.
    """

    def __init__(self, *, depth: int, width: int, channels: int, resolution: int,
                 num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        size, c_in = resolution, channels
        for _ in range(depth):
            layers += [nn.Conv2d(c_in, width, 3, padding=1), instance_norm(width), nn.ReLU(True)]
            if size > 1:
                layers.append(nn.AvgPool2d(2, 2))
                size //= 2
            c_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # (B, classes)


class BasicBlock(nn.Module):
    """ResNet basic block; ``avg_pool`` downsamples by average pooling instead of stride (IDC's
    ResNetAP), in the main path and in the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, avg_pool: bool):
        super().__init__()
        conv_stride = 1 if avg_pool else stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, conv_stride, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2) if (avg_pool and stride > 1) else nn.Identity()
        self.norm1 = instance_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = instance_norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if avg_pool:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, 1, bias=False),
                    nn.AvgPool2d(2, 2) if stride > 1 else nn.Identity(), instance_norm(c_out))
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                              instance_norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.pool(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with instance norm. Images of 64 px and more get the ImageNet stem (7x7 stride 2
    and a 3x3 stride-2 pool); smaller ones a 3x3 stride-1 stem, as the field does for 32 px."""

    def __init__(self, *, blocks: tuple[int, ...], channels: int, resolution: int,
                 num_classes: int, avg_pool: bool):
        super().__init__()
        if resolution >= 64:
            pool = nn.AvgPool2d(3, 2, 1) if avg_pool else nn.MaxPool2d(3, 2, 1)
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 7, 2, 3, bias=False),
                                      instance_norm(64), nn.ReLU(True), pool)
        else:
            self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False),
                                      instance_norm(64), nn.ReLU(True))
        stages, c_in = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            for k in range(n):
                stride = 2 if (i > 0 and k == 0) else 1
                stages.append(BasicBlock(c_in, width, stride, avg_pool))
                c_in = width
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))  # (B, 512, h, w)
        return self.fc(h.mean(dim=(2, 3)))  # (B, classes)


def build_network(name: str, *, num_classes: int, channels: int, resolution: int,
                  width: int = 128) -> nn.Module:
    """One of NETWORKS (or convnet<D> for any depth D)."""
    m = re.fullmatch(r"convnet(\d+)", name)
    if m:
        return ConvNet(depth=int(m.group(1)), width=width, channels=channels,
                       resolution=resolution, num_classes=num_classes)
    if name == "resnetap10":
        return ResNet(blocks=(1, 1, 1, 1), channels=channels, resolution=resolution,
                      num_classes=num_classes, avg_pool=True)
    if name == "resnet18":
        return ResNet(blocks=(2, 2, 2, 2), channels=channels, resolution=resolution,
                      num_classes=num_classes, avg_pool=False)
    raise ValueError(f"unknown network {name!r}; networks are {', '.join(NETWORKS)} "
                     f"(or convnet<depth>)")
