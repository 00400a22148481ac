"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) as the DC/DSA evaluation uses it.

The field's 28-32 px numbers (DC, DSA, DM, KIP, IDC on MNIST / Fashion-MNIST / CIFAR) train the
evaluation ConvNet with DSA's strategy ``color_crop_cutout_flip_scale_rotate`` on normalised
images. Its groups:

* color: brightness ``x + (u - 0.5)``; saturation ``(x - m_c) * 2u + m_c`` with ``m_c`` the
  per-pixel channel mean; contrast ``(x - m) * (u + 0.5) + m`` with ``m`` the image mean
  (``u ~ U[0, 1)`` per image and op);
* crop: a translation by up to ``round(0.125 * side)`` pixels in each axis, zero padded;
* cutout: a square of side ``round(0.5 * side)`` at a random centre set to zero;
* flip: horizontal, with probability 0.5 (off for glyphs that have handedness, such as digits);
* scale: x and y scaled independently by a factor uniform in [1 / 1.2, 1.2];
* rotate: by an angle uniform in [-15, 15] degrees.

Mode ``S`` (DSA's default, ``ParamDiffAug.aug_mode``, and what the published tables used) draws
ONE group per batch, shared by the batch, each image with its own parameters. Mode ``M``
applies every group in turn to every batch: about three times the pixel change per call, and
about 3 points lower at Fashion-MNIST IPC 10.

IDC evaluates small-image sets with its own variant of DSA (``misc/augment.py``, mode ``idc``
here): the flip (per image) and the colour group on every batch, then ONE of crop, scale and
rotate per batch; cutout is left out because IDC trains with CutMix.

Scale and rotate resample bilinearly with zero padding (zero is the mean after normalisation)
and ``align_corners=False``, what DSA's ``affine_grid`` / ``grid_sample`` calls do on any
PyTorch since 1.3 (they pass no value). The whole batch is transformed at once on its device;
every per-image draw comes from the ``generator`` argument and the group from a CPU generator,
so a run is reproducible from its seeds and no step waits for the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5
CROP_PAD, CUTOUT, SCALE, ROTATE_DEG = 0.125, 0.5, 1.2, 15.0


def _rand(shape, gen, x: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=x.device, dtype=x.dtype)


def _randint(high_exclusive: int, low: int, b: int, gen, device) -> torch.Tensor:
    return torch.randint(low, high_exclusive, (b,), generator=gen, device=device)


def color(x: torch.Tensor, gen) -> torch.Tensor:
    """Brightness, saturation, contrast. x: (B, C, H, W) -> same."""
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), gen, x) - 0.5) * BRIGHTNESS
    m = x.mean(1, keepdim=True)  # (B, 1, H, W)
    x = (x - m) * (_rand((b, 1, 1, 1), gen, x) * SATURATION) + m
    m = x.mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (x - m) * (_rand((b, 1, 1, 1), gen, x) + CONTRAST) + m


def crop(x: torch.Tensor, gen) -> torch.Tensor:
    """Random translation by up to ``round(CROP_PAD * side)`` pixels, zero padded."""
    b, _, h, w = x.shape
    sh, sw = int(h * CROP_PAD + 0.5), int(w * CROP_PAD + 0.5)
    dy = _randint(sh + 1, -sh, b, gen, x.device)  # (B,) output row i reads input row i + dy
    dx = _randint(sw + 1, -sw, b, gen, x.device)
    rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] + dx[:, None]  # (B, W)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    r = rows.clamp(0, h - 1)[:, None, :, None].expand(-1, x.shape[1], -1, w)  # (B, C, H, W)
    out = x.gather(2, r)
    c = cols.clamp(0, w - 1)[:, None, None, :].expand(-1, x.shape[1], h, -1)
    out = out.gather(3, c)
    return out * valid[:, None].to(x.dtype)


def cutout(x: torch.Tensor, gen) -> torch.Tensor:
    """Zero a square of side ``round(CUTOUT * side)`` centred at a random pixel (clipped)."""
    b, _, h, w = x.shape
    ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
    cy = _randint(h + (1 - ch % 2), 0, b, gen, x.device)  # (B,) centre row
    cx = _randint(w + (1 - cw % 2), 0, b, gen, x.device)
    ys = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - ch // 2)  # (B, H)
    xs = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - cw // 2)  # (B, W)
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
    return x * (~inside)[:, None].to(x.dtype)


def hflip(x: torch.Tensor, gen) -> torch.Tensor:
    """Horizontal flip of each image with probability 0.5."""
    mask = _rand((x.shape[0], 1, 1, 1), gen, x) < 0.5
    return torch.where(mask, x.flip(3), x)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def scale(x: torch.Tensor, gen) -> torch.Tensor:
    """Independent x / y scaling by factors uniform in [1 / SCALE, SCALE]."""
    b = x.shape[0]
    s = _rand((b, 2), gen, x) * (SCALE - 1.0 / SCALE) + 1.0 / SCALE  # (B, 2)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _warp(x, theta)


def rotate(x: torch.Tensor, gen) -> torch.Tensor:
    """Rotation by an angle uniform in [-ROTATE_DEG, ROTATE_DEG] degrees."""
    b = x.shape[0]
    a = (_rand((b,), gen, x) - 0.5) * 2 * ROTATE_DEG / 180 * math.pi  # (B,) radians
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), torch.sin(-a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _warp(x, theta)


MODES = ("S", "M", "idc")


class DSAugment:
    """``DSAugment(flip=..., mode=...)(x, generator, group_generator)``: x (B, C, H, W)
    normalised -> same shape.

    The groups of the module doc in DSA's order; ``flip=False`` drops the flip group. Mode ``S``
    draws one group per call from ``group_generator`` (a CPU generator; None = torch's global
    one), mode ``M`` applies them all, mode ``idc`` applies flip and colour, then one of crop,
    scale and rotate.
    """

    def __init__(self, *, flip: bool = True, mode: str = "S"):
        if mode not in MODES:
            raise ValueError(f"DSA mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if mode == "idc":
            self.always = ([hflip] if flip else []) + [color]
            self.ops = [crop, scale, rotate]
        else:
            self.always = []
            self.ops = [color, crop, cutout] + ([hflip] if flip else []) + [scale, rotate]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 group_generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"DSA needs float images (B, C, H, W), got {tuple(x.shape)} "
                             f"{x.dtype}")
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"the generator lives on {generator.device} but the images on "
                             f"{x.device}: create it on the images' device")
        ops = self.ops
        if self.mode != "M":
            k = int(torch.randint(len(ops), (1,), generator=group_generator))  # a CPU draw
            ops = [ops[k]]
        for op in self.always + ops:
            x = op(x, generator)
        return x
