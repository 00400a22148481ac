"""The latent cache: encode the training images once, draw latents on the device every step.

With a VAE, every training image and its horizontal flip are encoded once; the posterior mean and
standard deviation are stored on disk in a safetensors file whose name is a hash of the data
(content and preprocessing) and of the VAE (its weights), so a second run with the same data and
VAE loads it instead of encoding again. Each step then draws ``z = scale * (mean + std * eps)``
on the device, with a random flip, as DiT's training does with the encoder in the loop.

Without a VAE (pixel space, for small images) the cache is the uint8 images themselves; the
latent of an image is its pixels mapped to [-1, 1].
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddfast.errors import DataError, OutputError
from ddfast.progress import bar

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """$DDFAST_CACHE, else ~/.cache/ddfast."""
    env = os.environ.get("DDFAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ddfast"


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's configuration and exact weights: a changed VAE gets a new cache key."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., C, H, W) in [0, 255] to float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


@dataclass
class LatentSet:
    """Training latents of one dataset split, held on one device.

    pixel space: ``images`` (N, C, H, W) uint8, ``mean`` and ``std`` are None.
    latent space: ``mean`` and ``std`` (N, 2, c, h, w) float32, index 1 of dim 1 being the flip.
    """

    labels: torch.Tensor  # (N,) int64 dataset class indices
    images: torch.Tensor | None = None  # (N, C, H, W) uint8, pixel space
    mean: torch.Tensor | None = None  # (N, 2, c, h, w) posterior mean
    std: torch.Tensor | None = None  # (N, 2, c, h, w) posterior standard deviation
    scale: float = 1.0  # VAE scaling factor (0.18215 for sd-vae)
    key: str = ""  # cache key ("" in pixel space)
    hflip: bool = True  # draw the mirror image half of the time

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        src = self.images if self.images is not None else self.mean[:, 0]
        return tuple(src.shape[1:])

    def to(self, device: torch.device | str) -> LatentSet:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return LatentSet(move(self.labels), move(self.images), move(self.mean), move(self.std),
                         self.scale, self.key, self.hflip)

    def items(self, index: torch.Tensor) -> torch.Tensor:
        """The model-space items at ``index`` (B,) as they are, unflipped: pixels in [-1, 1],
        or the posterior mean latents times the scale. (B, c, h, w) float32."""
        if self.images is not None:
            return to_model_range(self.images[index])
        return self.mean[index, 0] * self.scale

    def draw(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents z0 for the items at ``index`` (B,), each flipped with probability 1/2
        (never when ``hflip`` is off).

        Returns (B, c, h, w) float32 on the set's device. Randomness comes from ``generator``
        (a generator on that device) so that a resumed run draws the same latents.
        """
        device = self.labels.device
        flip = torch.randint(0, 2, (index.shape[0],), device=device, generator=generator)  # (B,)
        if not self.hflip:
            flip = torch.zeros_like(flip)
        if self.images is not None:
            x = to_model_range(self.images[index])  # (B, C, H, W)
            return torch.where(flip.view(-1, 1, 1, 1).bool(), x.flip(-1), x)
        mean = self.mean[index, flip]  # (B, c, h, w)
        std = self.std[index, flip]  # (B, c, h, w)
        eps = torch.randn(mean.shape, device=device, generator=generator, dtype=mean.dtype)
        return (mean + std * eps) * self.scale


def cache_key(source_fingerprint: str, vae_fingerprint: str) -> str:
    blob = json.dumps([FORMAT_VERSION, source_fingerprint, vae_fingerprint]).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of uint8 images (B, C, H, W) and of their flips.

    Returns two (B, 2, c, h, w) float32 tensors on ``device``.
    """
    x = to_model_range(images.to(device))  # (B, C, H, W)
    both = torch.cat([x, x.flip(-1)]).to(dtype)  # (2B, C, H, W)
    dist = vae.encode(both).latent_dist
    b = x.shape[0]
    mean = dist.mean.float()  # (2B, c, h, w)
    std = dist.std.float()
    return (torch.stack([mean[:b], mean[b:]], 1), torch.stack([std[:b], std[b:]], 1))


def build_latents(source, vae=None, *, indices: torch.Tensor | None = None,
                  cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                  batch_size: int = 32, progress: bool = False,
                  hflip: bool = True) -> LatentSet:
    """Latents of ``source`` (an ImageSource), from the cache when present, else encoded once.

    indices: (M,) the items of the source to use (all when None); part of the cache key.
    The cache file is written atomically, so a killed encoding leaves no partial file behind.
    """
    device = torch.device(device)
    if indices is None:
        indices = torch.arange(len(source))
    indices = indices.to(torch.int64).cpu()
    if indices.numel() == 0:
        raise DataError("no training images selected: check data.max_per_class and the source")
    labels = source.labels[indices].clone()  # (M,)
    if vae is None:
        images = _read_images(source, indices, batch_size=max(batch_size, 256), progress=progress)
        return LatentSet(labels=labels.to(device), images=images.to(device), hflip=hflip)

    index_hash = hashlib.sha256(indices.numpy().tobytes()).hexdigest()
    key = cache_key(source.fingerprint() + ":" + index_hash, module_fingerprint(vae))
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"latents-{key}.safetensors"
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    if path.is_file():
        try:
            stored = load_file(str(path), device="cpu")
        except Exception as exc:  # a damaged file must not stop the run: encode again
            stored = None
            print(f"ddfast: latent cache {path} is unreadable ({exc}); encoding again")
        if stored is not None and torch.equal(stored["labels"], labels):
            return LatentSet(labels=labels.to(device), mean=stored["mean"].to(device),
                             std=stored["std"].to(device), scale=scale, key=key,
                             hflip=hflip)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the latent cache folder {folder} ({exc}); pass a "
                          f"writable --data.cache_dir or set DDFAST_CACHE") from exc

    vae = vae.to(device).eval()
    vae_dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for start in bar(range(0, len(indices), batch_size), enabled=progress, desc="encode",
                     unit="batch"):
        chunk = indices[start:start + batch_size]
        mean, std = encode_images(vae, source.images(chunk), device, vae_dtype)
        means.append(mean.cpu())
        stds.append(std.cpu())
    mean = torch.cat(means)  # (M, 2, c, h, w)
    std = torch.cat(stds)
    _atomic_save({"mean": mean, "std": std, "labels": labels}, path,
                 {"format": str(FORMAT_VERSION), "source": source.fingerprint()[:200]})
    return LatentSet(labels=labels.to(device), mean=mean.to(device), std=std.to(device),
                     scale=scale, key=key, hflip=hflip)


def _read_images(source, indices: torch.Tensor, *, batch_size: int,
                 progress: bool) -> torch.Tensor:
    chunks = []
    for start in bar(range(0, len(indices), batch_size), enabled=progress, desc="load",
                     unit="batch"):
        chunks.append(source.images(indices[start:start + batch_size]))
    return torch.cat(chunks)  # (M, C, H, W) uint8
