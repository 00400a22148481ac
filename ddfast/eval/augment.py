"""Training augmentation of the evaluation protocol, batched on the device.

Random resized crop and horizontal flip are one affine warp per image, done for the whole batch
with one ``affine_grid`` + ``grid_sample``; colour jitter (brightness, contrast, saturation,
applied in that fixed order), PCA lighting noise and normalisation are per-image broadcasts.
CutMix pastes one box per batch from a permutation of the batch, as the reference code does; the
box is a mask built on the device, so no step waits for the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet's RGB pixels (AlexNet's lighting noise).
_EIGVAL = (0.2175, 0.0188, 0.0045)
_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def norm_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std for RGB; 0.5/0.5 (to [-1, 1]) for grayscale."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels,
                                                                (0.5,) * channels)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _uniform(n: int, lo: float, hi: float, gen, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def crop_boxes(b: int, h: int, w: int, scale, ratio, gen, device, tries: int = 10):
    """Random-resized-crop boxes (top, left, height, width) as float tensors (B,).

    Each image draws ``tries`` candidate (area, log-ratio) pairs and keeps the first that fits;
    an image with none falls back to the largest central crop of a ratio within bounds.
    """
    area = h * w
    target = area * _uniform(b * tries, scale[0], scale[1], gen, device).view(b, tries)
    logr = _uniform(b * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device)
    r = torch.exp(logr).view(b, tries)
    cw = torch.sqrt(target * r).round()
    ch = torch.sqrt(target / r).round()
    ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)  # (B, T)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(b, dtype=torch.long,
                                                                      device=device))
    any_ok = ok.any(1)
    cw = cw.gather(1, first[:, None]).squeeze(1)
    ch = ch.gather(1, first[:, None]).squeeze(1)
    # fallback: central crop of the whole image with its ratio clamped into bounds
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    cw = torch.where(any_ok, cw, torch.full_like(cw, fw))
    ch = torch.where(any_ok, ch, torch.full_like(ch, fh))
    top = torch.floor(torch.rand(b, generator=gen, device=device) * (h - ch + 1))
    left = torch.floor(torch.rand(b, generator=gen, device=device) * (w - cw + 1))
    top = torch.where(any_ok, top, (h - ch) // 2)
    left = torch.where(any_ok, left, (w - cw) // 2)
    return top, left, ch, cw


class Augment:
    """The protocol's train transform for a batch (B, C, H, W) in [0, 1] on any device."""

    def __init__(self, *, out_size: int, crop_scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: bool = True, jitter: float = 0.4, lighting: float = 0.1, mean, std):
        self.out_size, self.scale, self.ratio = out_size, crop_scale, ratio
        self.flip, self.jitter, self.lighting = flip, jitter, lighting
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        dev = x.device
        x = x.float()
        top, left, ch, cw = crop_boxes(b, h, w, self.scale, self.ratio, generator, dev)
        sign = torch.ones(b, device=dev)
        if self.flip:
            sign = torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)  # output coords -> input coords in [-1, 1]
        theta[:, 0, 0] = sign * cw / w
        theta[:, 0, 2] = (2 * left + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * top + ch) / h - 1
        grid = F.affine_grid(theta, [b, c, self.out_size, self.out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter > 0:
            x = self._jitter(x, generator)
        if self.lighting > 0 and c == 3:
            alpha = torch.randn(b, 3, generator=generator, device=dev) * self.lighting  # (B, 3)
            vec = torch.tensor(_EIGVEC, device=dev)
            val = torch.tensor(_EIGVAL, device=dev)
            rgb = (alpha * val) @ vec.T  # (B, 3)
            x = x + rgb.view(b, 3, 1, 1)
        return normalize(x, self.mean, self.std)

    def _jitter(self, x: torch.Tensor, gen) -> torch.Tensor:
        b, c = x.shape[:2]
        dev = x.device
        j = self.jitter
        bright = _uniform(b, 1 - j, 1 + j, gen, dev).view(b, 1, 1, 1)
        x = (x * bright).clamp(0, 1)
        contrast = _uniform(b, 1 - j, 1 + j, gen, dev).view(b, 1, 1, 1)
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = ((x - mean) * contrast + mean).clamp(0, 1)
        if c == 3:
            sat = _uniform(b, 1 - j, 1 + j, gen, dev).view(b, 1, 1, 1)
            gray = _gray(x)
            x = ((x - gray) * sat + gray).clamp(0, 1)
        return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b  # (B, 1, H, W)


def test_transform(x: torch.Tensor, *, out_size: int, mean, std) -> torch.Tensor:
    """Resize the short side to out_size (antialiased) and centre-crop; then normalise."""
    h, w = x.shape[-2:]
    x = x.float()
    if (h, w) != (out_size, out_size):
        s = out_size / min(h, w)
        nh, nw = max(out_size, round(h * s)), max(out_size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - out_size) // 2, (nw - out_size) // 2
        x = x[..., top:top + out_size, left:left + out_size]
    return normalize(x, mean, std)


def cutmix(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0,
           generator: torch.Generator | None = None):
    """CutMix one box per batch: returns (x_mixed, y_a, y_b, lam) with the loss
    lam * CE(out, y_a) + (1 - lam) * CE(out, y_b); lam is the kept area fraction."""
    b, _, h, w = x.shape
    dev = x.device
    if alpha == 1.0:  # Beta(1, 1) is uniform: drawn from the generator, reproducibly
        lam = torch.rand((), generator=generator, device=dev)
    else:
        lam = torch.distributions.Beta(torch.tensor(alpha, device=dev),
                                       torch.tensor(alpha, device=dev)).sample()
    perm = torch.randperm(b, generator=generator, device=dev)
    cut = torch.sqrt(1.0 - lam)
    cut_w, cut_h = torch.floor(w * cut), torch.floor(h * cut)
    cx = torch.randint(0, w, (), generator=generator, device=dev).float()
    cy = torch.randint(0, h, (), generator=generator, device=dev).float()
    x1 = (cx - torch.div(cut_w, 2, rounding_mode="floor")).clamp(0, w)
    x2 = (cx + torch.div(cut_w, 2, rounding_mode="floor")).clamp(0, w)
    y1 = (cy - torch.div(cut_h, 2, rounding_mode="floor")).clamp(0, h)
    y2 = (cy + torch.div(cut_h, 2, rounding_mode="floor")).clamp(0, h)
    rows = torch.arange(h, device=dev).view(h, 1)
    cols = torch.arange(w, device=dev).view(1, w)
    box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)  # (H, W)
    mixed = torch.where(box, x[perm], x)
    lam = 1.0 - box.float().mean()
    return mixed, y, y[perm], lam
