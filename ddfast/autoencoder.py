"""A small AutoencoderKL trained here, for a latent DiT on data no published VAE fits.

The latent diffusion recipe (Rombach et al. 2022) trains the autoencoder first, alone, and the
DiT then learns its latents: here the autoencoder of a ``model.vae`` preset (``small``,
``small-f4``) learns the run's own training images (the held-out ones stay out) before the
from-scratch DiT, with a Gaussian reconstruction loss and a small KL pull of the posterior toward
N(0, I), the KL-regularised autoencoder's objective without its perceptual and adversarial terms
(they need a pretrained network, which nothing here may download). Per image,

    loss = mean over pixels of (x_hat - x)^2 + kl_weight * KL(q(z|x) || N(0, I)) / pixels

with z drawn from the posterior (the reparameterisation). Its latents are then scaled to unit
standard deviation, the scaling factor LDM and DiT read from the VAE's config: ``1 / std`` of
the posterior means of the training images, recorded as ``scaling_factor``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ddfast.config import CHOICES
from ddfast.data.cache import to_model_range
from ddfast.errors import ConfigError, OutputError
from ddfast.io import append_jsonl, drop_logged_after
from ddfast.progress import bar
from ddfast.trainer import scheduled_lr


@dataclass(frozen=True)
class VaeSpec:
    steps: int  # optimiser steps
    batch_size: int  # images per step
    lr: float  # AdamW learning rate: throughout, or the first step's under decay "cosine"
    kl_weight: float  # weight of the KL term against the per-pixel squared error, per pixel
    seed: int  # batch order, flips and posterior draws
    hflip: bool = False  # mirror each drawn image half of the time
    log_every: int = 100  # steps between metrics lines
    decay: str = "constant"  # constant | cosine: a half cosine from lr toward 0 over the steps


def step_lr(spec: VaeSpec, step: int) -> float:
    """Learning rate of optimiser step ``step`` (1-based): ``spec.lr`` throughout, or under
    decay "cosine" a half cosine from ``spec.lr`` at step 1 that would reach 0 one step after
    the last (the DiT's schedule, ``ddfast.trainer.scheduled_lr``, without warm-up)."""
    return scheduled_lr(spec.lr, step - 1, spec.steps, 0, spec.decay)


def train_vae(vae, images: torch.Tensor, spec: VaeSpec, *, device: torch.device | str = "cpu",
              metrics_path: Path | None = None, progress: bool = False) -> dict:
    """Train ``vae`` (an AutoencoderKL) in place on uint8 ``images`` (N, C, H, W).

    Logs (and returns) the mean squared error and KL per image over each ``log_every`` steps
    (the returned ones: the last interval's), reading them from the device once per interval;
    a non-finite loss stops training at the end of its interval. Batches are
    drawn with replacement from a generator seeded by ``spec.seed``, so the same inputs give the
    same model on the same machine."""
    if spec.steps < 1 or spec.batch_size < 1:
        raise ConfigError(f"the VAE needs steps and batch size of at least 1, got {spec.steps} "
                          f"and {spec.batch_size}: set --pretrain.vae_steps and "
                          f"--pretrain.vae_batch_size")
    if spec.decay not in CHOICES["pretrain.vae_decay"]:
        raise ConfigError(f"the VAE's learning-rate decay is one of "
                          f"{', '.join(CHOICES['pretrain.vae_decay'])}, got {spec.decay!r}: set "
                          f"--pretrain.vae_decay")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ConfigError(f"train_vae takes uint8 images (N, C, H, W), got {images.dtype} "
                          f"{tuple(images.shape)}")
    if metrics_path is not None:  # a run killed mid-way trains it again from step 1
        drop_logged_after(metrics_path, "vae", 0)
    device = torch.device(device)
    vae = vae.to(device).train()
    gen = torch.Generator().manual_seed(spec.seed)
    noise = torch.Generator(device=device).manual_seed(spec.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.lr, weight_decay=0.0)
    pixels = math.prod(images.shape[1:])
    interval: list[torch.Tensor] = []  # (2,) per step of this log interval: mse, kl
    recent: list[list[float]] = []  # the last interval's [mse, kl] per step
    t0 = time.perf_counter()
    for step in bar(range(1, spec.steps + 1), enabled=progress, desc="vae", unit="step"):
        for group in opt.param_groups:
            group["lr"] = step_lr(spec, step)
        idx = torch.randint(len(images), (spec.batch_size,), generator=gen)  # (B,)
        x = to_model_range(images[idx]).to(device)  # (B, C, H, W) in [-1, 1]
        if spec.hflip:
            flip = torch.rand(spec.batch_size, generator=gen) < 0.5  # (B,)
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=noise, device=device)
        recon = vae.decode(z).sample  # (B, C, H, W)
        mse = (recon - x).pow(2).flatten(1).mean(1)  # (B,)
        kl = post.kl()  # (B,) summed over latent elements
        loss = (mse + spec.kl_weight * kl / pixels).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        interval.append(torch.stack([mse.detach().mean(), kl.detach().mean()]))
        if step % spec.log_every == 0 or step == spec.steps:  # one host sync per interval
            recent = torch.stack(interval).tolist()  # [[mse, kl], ...]
            interval = []
            if not all(math.isfinite(m) and math.isfinite(k) for m, k in recent):
                raise FloatingPointError(f"the VAE's loss is not finite by step {step}; lower "
                                         f"--pretrain.vae_lr (it is {spec.lr})")
            if metrics_path is not None:
                append_jsonl(metrics_path, {"stage": "vae", "step": step,
                                            "mse": sum(m for m, _ in recent) / len(recent),
                                            "kl": sum(k for _, k in recent) / len(recent),
                                            "seconds": round(time.perf_counter() - t0, 2)})
    vae.eval()
    return {"mse": sum(m for m, _ in recent) / len(recent),
            "kl": sum(k for _, k in recent) / len(recent)}


@torch.no_grad()
def posterior_means(vae, images: torch.Tensor, *, device: torch.device | str = "cpu",
                    batch_size: int = 500) -> torch.Tensor:
    """Posterior means (N, c, h, w) float32 of uint8 images (N, C, H, W), unscaled."""
    vae = vae.to(device).eval()
    out = [vae.encode(to_model_range(images[i:i + batch_size]).to(device)).latent_dist.mean
           .float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def fit_scaling_factor(vae, images: torch.Tensor, *, device: torch.device | str = "cpu") -> float:
    """``1 / std`` of the posterior means of ``images`` over every element (LDM's rule), written
    into the VAE's config as ``scaling_factor`` and returned."""
    std = posterior_means(vae, images, device=device).std().item()
    if not math.isfinite(std) or std <= 0:
        raise FloatingPointError(f"the VAE's latents have standard deviation {std}; it did not "
                                 f"train: raise --pretrain.vae_steps or lower --pretrain.vae_lr")
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, *, device: torch.device | str = "cpu",
                batch_size: int = 500) -> torch.Tensor:
    """uint8 images (N, C, H, W) decoded from their posterior means, as a sample is written."""
    vae = vae.to(device).eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_range(images[i:i + batch_size]).to(device)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu()
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))  # as PNGs are written
    return torch.cat(out)


def reconstruction_error(vae, images: torch.Tensor, *,
                         device: torch.device | str = "cpu") -> dict:
    """Mean squared error (in [-1, 1] units) and PSNR (dB, peak 255) of the uint8 round trip."""
    back = reconstruct(vae, images, device=device)
    err = (back.float() - images.float()).pow(2).mean().item()  # in grey levels squared
    mse = err / 127.5 ** 2
    psnr = 10 * math.log10(255.0 ** 2 / err) if err > 0 else math.inf
    return {"mse": mse, "psnr": psnr, "images": len(images)}


def save_vae(out_dir: str | Path, vae) -> Path:
    """Write ``vae`` as a diffusers model folder, atomically: ``out_dir`` is either absent or
    complete. An existing folder is never replaced."""
    out = Path(out_dir)
    if out.exists():
        raise OutputError(f"{out} exists; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
