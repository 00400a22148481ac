"""How sharp a set's edges are, and the same images made sharper or softer to a given sharpness.

A latent generator's images cannot be sharper than its autoencoder's round trip, and a decoder
trained on squared error smooths edges. ``edge_strength`` measures it in grey levels;
``sharpen_to`` and ``blur_to`` move a set's edges to another set's strength (an unsharp mask or
a Gaussian blur, the one free parameter found by bisection), so an evaluation can tell what the
edges alone are worth to a classifier trained on the set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def edge_strength(images: torch.Tensor) -> float:
    """Mean absolute difference between horizontal neighbours plus that between vertical
    neighbours, in grey levels, of uint8 images (N, C, H, W)."""
    x = images.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return float(dx + dy)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Float images (N, C, H, W) under a separable Gaussian of ``sigma`` pixels (radius
    ceil(3 sigma), edges replicated)."""
    x = images.float()
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-taps.pow(2) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def unsharp(images: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """uint8 images plus ``amount`` times their difference from a Gaussian blur of ``sigma``."""
    x = images.float()
    return _to_uint8(x + amount * (x - gaussian_blur(x, sigma)))


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 images under a Gaussian blur of ``sigma`` pixels."""
    return _to_uint8(gaussian_blur(images, sigma))


def _bisect(strength, target: float, lo: float, hi: float, rising: bool) -> float:
    """The parameter in [lo, hi] where ``strength`` (monotone: rising or falling) meets
    ``target``; an end of the interval when the target lies beyond it."""
    for _ in range(40):
        mid = (lo + hi) / 2
        if (strength(mid) < target) == rising:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sharpen_to(images: torch.Tensor, target: float, sigma: float = 1.0,
               max_amount: float = 5.0) -> tuple[torch.Tensor, float]:
    """The images unsharp-masked until their edge strength meets ``target`` (at least theirs),
    and the amount it took."""
    amount = _bisect(lambda a: edge_strength(unsharp(images, a, sigma)), target, 0.0,
                     max_amount, rising=True)
    return unsharp(images, amount, sigma), amount


def blur_to(images: torch.Tensor, target: float,
            max_sigma: float = 3.0) -> tuple[torch.Tensor, float]:
    """The images blurred until their edge strength meets ``target`` (at most theirs), and the
    blur's sigma in pixels."""
    sigma = _bisect(lambda s: edge_strength(blur(images, s)), target, 1e-3, max_sigma,
                    rising=False)
    return blur(images, sigma), sigma
