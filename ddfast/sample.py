"""Distilled-set generation: sample, decode and write a class-per-folder tree of PNGs.

Every image has its own seed derived from (base seed, class, index), so the set does not depend on
the batch size, and the IPC-k set is the first k files of each class folder in sorted order (the
evaluation protocol's rule): one tree serves every IPC up to the largest sampled. Images already
on disk are kept, so a killed sampling run resumes where it stopped, with identical results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddfast.diffusion import Diffusion, image_seed, sample
from ddfast.distributed import Dist
from ddfast.io import to_uint8_image, write_json, write_png
from ddfast.progress import bar

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_folder_name(name: str, index: int) -> str:
    """A class name made safe as one path component (no separators, no dot-only names)."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or f"class_{index:04d}"
    return cleaned[:100]


@dataclass(frozen=True)
class ClassSpec:
    index: int  # dataset class index
    name: str  # class name (a wnid for ImageNet folders)
    cond_label: int  # label that conditions the DiT
    folder: str  # output folder name


def class_specs(class_names: list[str], cond_labels: list[int]) -> list[ClassSpec]:
    specs, seen = [], set()
    for i, (name, cond) in enumerate(zip(class_names, cond_labels, strict=True)):
        folder = safe_folder_name(name, i)
        if folder in seen:  # two names that sanitise alike stay distinct
            folder = f"{folder}_{i}"
        seen.add(folder)
        specs.append(ClassSpec(i, name, int(cond), folder))
    return specs


def decode(latents: torch.Tensor, vae, scale: float) -> torch.Tensor:
    """Latents (B, c, h, w) to images (B, C, H, W) in [-1, 1]; pixel space when vae is None."""
    if vae is None:
        return latents.clamp(-1, 1)
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        return vae.decode((latents / scale).to(dtype)).sample.float().clamp(-1, 1)


def write_distilled(out_dir: Path, model, vae, diffusion: Diffusion, classes: list[ClassSpec],
                    ipc: int, *, latent_shape: tuple[int, int, int], null_label: int,
                    scale: float, steps: int, sampler: str, guidance_scale: float,
                    guidance_channels: str, seed: int, batch_size: int, device: torch.device,
                    precision: str = "fp32", progress: bool = False,
                    config_digest: str = "", dist: Dist | None = None,
                    guidance_interval: tuple[int, ...] = (),
                    anchors: dict[int, torch.Tensor] | None = None, strength: float = 1.0) -> dict:
    """Sample ``ipc`` images per class into ``out_dir/<class folder>/<index>.png``.

    Returns the manifest (also written as ``out_dir/manifest.json``). With ``dist`` the batches
    are dealt to the ranks in turn; a batch holds the same images whatever the number of ranks,
    so the set is byte-identical on any number of processes. Rank 0 writes the manifest once
    every rank is done. ``anchors`` ({class index: (ipc, c, h, w)} in the model's space, e.g.
    ``ddfast.select.cluster_anchors``): image i of a class starts from its class's anchor i,
    noised to ``strength`` of the schedule (``ddfast.diffusion.sample``), instead of noise.
    """
    dist = dist or Dist.single()
    short = [c.name for c in classes
             if anchors is not None and (c.index not in anchors or len(anchors[c.index]) < ipc)]
    if short:
        raise ValueError(f"anchored sampling of {ipc} per class: class {short[0]!r} has fewer "
                         f"than {ipc} anchors")
    jobs = [(c, i) for c in classes for i in range(ipc)]
    todo = [(c, i) for c, i in jobs if not (out_dir / c.folder / f"{i:05d}.png").is_file()]
    todo = dist.broadcast_object(todo)  # one list, read before any rank writes
    model.eval()
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    starts = range(0, len(todo), batch_size)[dist.rank::dist.world]
    for start in bar(starts, enabled=progress and dist.main, desc="sample", unit="batch"):
        chunk = todo[start:start + batch_size]
        labels = torch.tensor([c.cond_label for c, _ in chunk], device=device)
        seeds = [image_seed(seed, c.index, i) for c, i in chunk]
        anchor = (None if anchors is None
                  else torch.stack([anchors[c.index][i] for c, i in chunk]))
        z = sample(model, labels, seeds=seeds, latent_shape=latent_shape, steps=steps,
                   sampler=sampler, guidance_scale=guidance_scale,
                   guidance_channels=guidance_channels, null_label=null_label,
                   diffusion=diffusion, device=device, autocast_dtype=autocast_dtype,
                   guidance_interval=guidance_interval, anchor=anchor, strength=strength)
        images = decode(z, vae, scale)  # (B, C, H, W)
        for (c, i), img in zip(chunk, images, strict=True):
            write_png(out_dir / c.folder / f"{i:05d}.png", to_uint8_image(img))
    manifest = {
        "config_digest": config_digest,
        "ipc": ipc,
        "seed": seed,
        "rule": ("the IPC-k set is the first k files of each class folder in sorted order"
                 if anchors is None else "image i of a class starts from its class's anchor i"),
        **({"anchored": {"strength": strength}} if anchors is not None else {}),
        "sampler": {"name": sampler, "steps": steps, "guidance_scale": guidance_scale,
                    "guidance_channels": guidance_channels,
                    **({"guidance_interval": list(guidance_interval)}
                       if guidance_interval else {})},
        "classes": [{"index": c.index, "name": c.name, "cond_label": c.cond_label,
                     "folder": c.folder} for c in classes],
        "images": [{"file": f"{c.folder}/{i:05d}.png", "class": c.index, "index": i,
                    "seed": image_seed(seed, c.index, i)} for c, i in jobs],
    }
    dist.barrier()
    if dist.main:
        write_json(out_dir / "manifest.json", manifest)
    return manifest


def grid(images: list[np.ndarray], columns: int, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Tile equally sized (H, W[, C]) uint8 images into one array, optionally upscaled."""
    if not images:
        raise ValueError("grid needs at least one image")
    h, w = images[0].shape[:2]
    chans = images[0].shape[2:] if images[0].ndim == 3 else ()
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, *chans), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h,
               pad + c * (w + pad):pad + c * (w + pad) + w] = img
    if upscale > 1:
        canvas = canvas.repeat(upscale, 0).repeat(upscale, 1)
    return canvas


def write_class_grids(out_dir: Path, distilled_dir: Path, classes: list[ClassSpec],
                      real: dict[int, list[np.ndarray]], ipc: int, columns: int = 10) -> list[Path]:
    """One PNG per class: a row of real images above the class's distilled images."""
    from PIL import Image

    paths = []
    for c in classes:
        files = sorted((distilled_dir / c.folder).glob("*.png"))[:ipc]
        fake = [np.asarray(Image.open(f)) for f in files]
        reals = real.get(c.index, [])[:columns]
        tiles = reals + [np.full_like(fake[0], 255)] * (-len(reals) % columns) + fake
        side = fake[0].shape[0]
        upscale = max(1, 64 // side)
        path = out_dir / f"{c.folder}.png"
        write_png(path, grid(tiles, columns, upscale=upscale))
        paths.append(path)
    return paths

