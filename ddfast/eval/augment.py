"""Training augmentation of the evaluation protocol (method.md section 5), batched on the device.

IDC / Minimax train their evaluation nets with torchvision's per-image PIL pipeline:
RandomResizedCrop(scale 0.5-1) -> horizontal flip -> colour jitter 0.4 (brightness, contrast,
saturation in random order) -> PCA lighting 0.1 -> normalise; plus CutMix on every batch. Here the
whole batch is transformed at once on the device the images live on, with no per-image Python loop
and no host sync:

* crop + flip: one affine matrix per image (the flip is a negative x scale), one ``affine_grid`` and
  one bilinear ``grid_sample`` for the batch. Boxes are sampled as torchvision's RandomResizedCrop
  samples them (integer sides, 10 tries, central-crop fallback). grid_sample does not antialias,
  which only matters when a crop is shrunk by more than ~2x (never with scale >= 0.5 at equal
  input and output size).
* colour jitter: each op is a blend ``f * x + (1 - f) * target`` (target black for brightness,
  the mean grey level for contrast, the grey image for saturation), ``f`` uniform in
  [1 - j, 1 + j] per image and op. Like IDC's tensor ops (and unlike torchvision's PIL path)
  there is no clamp at all, not even after lighting (IDC clamps nowhere). Without clamps
  the three blends commute (each is linear, contrast keeps the mean grey, saturation keeps the
  grey image), so IDC's random order changes nothing but float rounding; we apply a fixed order
  (brightness, contrast, saturation) and draw no order. Saturation needs colour, so it runs only
  for 3 channels (grey = ITU-R 601 luma for RGB, the channel mean otherwise).
* lighting: AlexNet's PCA noise, ``rgb += eigvec @ (alpha * eigval)``, alpha ~ N(0, 0.1^2) per
  image, with ImageNet's eigen-decomposition; 3 channels only.

Every random draw comes from the ``generator`` argument (which must live on the images' device),
so a run is reproducible from one seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PCA of ImageNet's RGB pixels (AlexNet's lighting noise): eigenvalues and eigenvectors (columns).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, IDC's and torchvision's grey


# Datasets whose evaluation conventions are known: (mean, std) of normalisation, and whether a
# mirrored image keeps its class (flip augmentation). Fashion-MNIST and MNIST: DC/DSA's and IDC's
# values; digits: the mean and std of ddfast's digits training split (no published values).
DATASETS: dict[str, tuple[tuple[float, ...], tuple[float, ...], bool]] = {
    "fashion-mnist": ((0.2861,), (0.3530,), True),
    "mnist": ((0.1307,), (0.3081,), False),
    "digits": ((0.3052,), (0.3760,), False),
}


def norm_stats(channels: int, dataset: str | None = None
               ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for normalisation: the dataset's own (``DATASETS``) when it is known; else
    ImageNet's for 3 channels and 0.5 / 0.5 (maps [0, 1] to [-1, 1]) for any other count."""
    if dataset in DATASETS and len(DATASETS[dataset][0]) == channels:
        return DATASETS[dataset][0], DATASETS[dataset][1]
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


def default_flip(channels: int, dataset: str | None = None) -> bool:
    """Whether training flips images: the dataset's rule when known, else colour sets only
    (grey glyphs such as digits have handedness)."""
    if dataset in DATASETS:
        return DATASETS[dataset][2]
    return channels == 3


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel. x: (B, C, H, W)."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {x.shape[1]} channels")
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _check(x: torch.Tensor, generator: torch.Generator | None) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float batch (B, C, H, W) in [0, 1], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, images on {x.device}")


def _uniform(shape, lo: float, hi: float, gen, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)


def crop_boxes(b: int, h: int, w: int, *, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
               generator: torch.Generator | None = None, device=None, tries: int = 10):
    """RandomResizedCrop boxes for a batch, sampled as torchvision samples them.

    Each image draws ``tries`` (area fraction ~ U(scale), log aspect ~ U(log ratio)) candidates,
    rounds the sides to pixels and keeps the first that fits; an image with none gets the central
    crop of the whole image with its aspect clamped into ``ratio``. The offset is uniform over the
    valid integer positions.

    Returns (top, left, height, width): float tensors (B,) of whole pixels.
    """
    area = h * w
    target = area * _uniform((b, tries), scale[0], scale[1], generator, device)  # (B, T)
    aspect = torch.exp(_uniform((b, tries), math.log(ratio[0]), math.log(ratio[1]),
                                generator, device))  # (B, T) width / height
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)  # (B, T)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # (B, 1): first fitting try (0 if none)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)  # (B,)
    found = ok.any(1)  # (B,)
    # Fallback box: the same for every image, computed on the host from the shape alone.
    if w / h < min(ratio):
        fw, fh = w, round(w / min(ratio))
    elif w / h > max(ratio):
        fw, fh = round(h * max(ratio)), h
    else:
        fw, fh = w, h
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    u = torch.rand(2, b, generator=generator, device=device)  # (2, B)
    top = torch.where(found, torch.floor(u[0] * (h - ch + 1)),
                      (h - ch).div(2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[1] * (w - cw + 1)),
                       (w - cw).div(2, rounding_mode="floor"))
    return top, left, ch, cw


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) grey level: luma for RGB, the channel mean otherwise."""
    if x.shape[1] == 3:
        luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * luma).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


class Augment:
    """The protocol's train transform for a batch; see the module docstring.

    ``Augment(...)(x, generator)``: x (B, C, H, W) float in [0, 1] on any device ->
    (B, C, out_size, out_size) normalised with (mean, std), same dtype and device.
    ``flip``, ``jitter`` (0 = off) and ``lighting`` (0 = off) switch the parts; the crop is
    always on (``crop_scale=(1, 1), ratio=(1, 1)`` on a square image makes it a plain resize).
    """

    def __init__(self, *, out_size: int, crop_scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: bool = True, jitter: float = 0.4, lighting: float = 0.1,
                 mean: Sequence[float], std: Sequence[float]):
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.out_size, self.crop_scale, self.ratio = out_size, tuple(crop_scale), tuple(ratio)
        self.flip, self.jitter, self.lighting = flip, jitter, lighting
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check(x, generator)
        b, c, h, w = x.shape
        dev, gen = x.device, generator
        top, left, ch, cw = crop_boxes(b, h, w, scale=self.crop_scale, ratio=self.ratio,
                                       generator=gen, device=dev)
        sign = torch.ones(b, device=dev)
        if self.flip:
            sign = torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0)
        # affine_grid maps output coordinates in [-1, 1] (pixel edges, align_corners=False) to
        # input coordinates: scale = box side / image side, shift = box centre; the flip mirrors
        # the output x axis about the box centre.
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)  # (B, 2, 3)
        theta[:, 0, 0] = sign * cw / w
        theta[:, 0, 2] = (2 * left + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * top + ch) / h - 1
        grid = F.affine_grid(theta, [b, c, self.out_size, self.out_size], align_corners=False)
        # torchvision crops, then resizes the crop alone: a sample within half a pixel of the
        # box edge repeats the edge pixel. Clamping the sample to the box's outermost pixel
        # centres does the same here (without it, enlarged crops blend in the pixels outside).
        lo_x, hi_x = (2 * left + 1) / w - 1, (2 * (left + cw) - 1) / w - 1  # (B,)
        lo_y, hi_y = (2 * top + 1) / h - 1, (2 * (top + ch) - 1) / h - 1
        gx = torch.maximum(torch.minimum(grid[..., 0], hi_x.view(b, 1, 1).to(grid.dtype)),
                           lo_x.view(b, 1, 1).to(grid.dtype))
        gy = torch.maximum(torch.minimum(grid[..., 1], hi_y.view(b, 1, 1).to(grid.dtype)),
                           lo_y.view(b, 1, 1).to(grid.dtype))
        grid = torch.stack([gx, gy], dim=-1)  # (B, S, S, 2)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)  # (B, C, S, S)
        if self.jitter > 0:
            out = self._jitter(out, gen)
        if self.lighting > 0 and c == 3:
            alpha = torch.randn(b, 3, generator=gen, device=dev, dtype=x.dtype) * self.lighting
            val = torch.tensor(IMAGENET_EIGVAL, device=dev, dtype=x.dtype)  # (3,)
            vec = torch.tensor(IMAGENET_EIGVEC, device=dev, dtype=x.dtype)  # (3, 3) columns
            rgb = (alpha * val) @ vec.T  # (B, 3): eigvec @ (alpha * eigval) per image
            out = out + rgb.view(b, 3, 1, 1)
        return normalize(out, self.mean, self.std)  # no clamp, as IDC

    def _jitter(self, x: torch.Tensor, gen) -> torch.Tensor:
        """Brightness, contrast, saturation (fixed order, see the module doc). x: (B, C, S, S)."""
        b, c = x.shape[:2]
        f = _uniform((b, 3, 1, 1), 1 - self.jitter, 1 + self.jitter, gen, x.device).to(x.dtype)
        x = f[:, 0:1] * x  # brightness: blend with black
        gray = _gray(x)  # (B, 1, S, S)
        mean = gray.mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = f[:, 1:2] * x + (1 - f[:, 1:2]) * mean  # contrast: blend with the mean grey level
        if c == 3:  # saturation needs colour: blend with the grey image
            gray = _gray(x)
            x = f[:, 2:3] * x + (1 - f[:, 2:3]) * gray
        return x


def test_transform(x: torch.Tensor, *, out_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """The protocol's test transform: resize the short side to ``out_size`` (antialiased
    bilinear, as PIL/torchvision Resize), centre-crop ``out_size``, normalise.

    x: (B, C, H, W) float in [0, 1] -> (B, C, out_size, out_size).
    """
    _check(x, None)
    h, w = x.shape[-2:]
    if (h, w) != (out_size, out_size):
        s = out_size / min(h, w)
        nh, nw = max(out_size, round(h * s)), max(out_size, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False)  # (B, C, nh, nw)
        top, left = round((nh - out_size) / 2), round((nw - out_size) / 2)  # torchvision's
        x = x[..., top:top + out_size, left:left + out_size]
    return normalize(x, mean, std)


def sample_beta(alpha: float, *, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """One Beta(alpha, alpha) draw as a 0-d float tensor on ``device``.

    torch.distributions.Beta cannot take a generator, so the draw is G1 / (G1 + G2) with two
    Gamma(alpha) draws from ``torch._standard_gamma``, which can: reproducible from the seed.
    """
    if alpha <= 0:
        raise ValueError(f"Beta parameter must be > 0, got {alpha}")
    g = torch._standard_gamma(torch.full((2,), float(alpha), device=device),
                              generator=generator)  # (2,)
    return g[0] / g.sum()


def cutmix(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0,
           generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix as IDC / the CutMix reference code does it, one box for the whole batch.

    lam ~ Beta(alpha, alpha); a random permutation of the batch; a box of sides
    floor(side * sqrt(1 - lam)) centred at a uniform pixel (clipped at the border) is pasted from
    the permuted images; lam is then corrected to 1 - box area / image area.

    x: (B, C, H, W), y: (B,) -> (x_mixed (B, C, H, W), y_a = y, y_b = y[perm], lam 0-d tensor);
    train with ``lam * CE(out, y_a) + (1 - lam) * CE(out, y_b)``. No host sync.
    """
    _check(x, generator)
    b, _, h, w = x.shape
    dev = x.device
    lam = sample_beta(alpha, generator=generator, device=dev)
    perm = torch.randperm(b, generator=generator, device=dev)  # (B,)
    cut = torch.sqrt(1.0 - lam)
    half_h = torch.floor(h * cut).div(2, rounding_mode="floor")
    half_w = torch.floor(w * cut).div(2, rounding_mode="floor")
    centre = torch.rand(2, generator=generator, device=dev)  # (2,) -> a uniform pixel
    cy, cx = torch.floor(centre[0] * h), torch.floor(centre[1] * w)
    y1, y2 = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
    x1, x2 = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
    rows = torch.arange(h, device=dev).view(h, 1)
    cols = torch.arange(w, device=dev).view(1, w)
    box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)  # (H, W)
    mixed = torch.where(box, x[perm], x)  # (B, C, H, W)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return mixed, y, y[perm], lam


# The name starts with "test": keep pytest from collecting it where a test module imports it.
test_transform.__test__ = False  # type: ignore[attr-defined]
