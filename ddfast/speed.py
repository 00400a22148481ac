"""The workloads of the speed benchmark (bench/bench_train.py): ddfast's path and a reference
path that does what the published code does, on the same model and data.

ddfast's fine-tuning step: latents encoded once and cached on the device, bf16 autocast with the
similarity maths in float32, memories as preallocated tensors behind the fused ops, fused AdamW, a
foreach EMA of the trainable parameters, the loss (DiT, diffusion and memory terms) optionally
compiled, nothing waiting for the device. Its sampler: every image of a batch in one guided
forward, bf16, compiled, one batched decode.

The reference step: float32 eager (TF32 matmuls allowed, as the published code runs on Ampere and
later), the VAE encoder run on every batch, the memories as Python lists visited class by class
with one similarity matrix each, a per-parameter EMA loop. The reference sampler: one image at a
time, float32 eager. ``reference_memory_terms`` equals ``ddfast.ref.minimax_terms_ref`` on the
same memory contents (a test holds it to that), so both paths optimise the same objective.

FLOP floors (per image; a DiT-XL/2 forward at 256 px is about 237 GFLOP, a VAE encode about 273
and a decode about 622): fine-tuning costs a forward plus a backward through the activations
(about one more forward) plus the weight gradients of the trainable fraction; sampling costs two
forwards per step (guidance doubles the batch) and a decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddfast import perf
from ddfast.diffusion import Diffusion, image_seed, sample
from ddfast.memory import MemoryBank
from ddfast.models import EMA, build_dit, build_vae, set_trainable
from ddfast.ref import MinimaxTerms
from ddfast.trainer import objective, train_step

__all__ = ["SIZES", "Workload", "build_workload", "reference_memory_terms", "ListMemory"]

# name -> (DiT preset, image size, VAE preset, GFLOP per DiT forward, VAE encode, VAE decode).
SIZES = {
    "xl": ("XL/2", 256, "sd", 237.0, 273.0, 622.0),
    "tiny": ("micro", 32, "small", None, None, None),  # the CPU check of the code paths
}


@dataclass
class Workload:
    dit: torch.nn.Module
    vae: torch.nn.Module
    diffusion: Diffusion
    device: torch.device
    image_size: int
    latent_shape: tuple[int, int, int]
    num_classes: int
    gflop_forward: float | None
    gflop_encode: float | None
    gflop_decode: float | None

    def images(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random images (B, 3, H, W) in [-1, 1] and labels (B,) on the device."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(batch, 3, self.image_size, self.image_size, generator=gen) * 2 - 1
        y = torch.randint(0, self.num_classes, (batch,), generator=gen)
        return x.to(self.device), y.to(self.device)

    def finetune_gflop(self) -> float | None:
        """GFLOP per image of one fine-tuning step (see the module docstring)."""
        if self.gflop_forward is None:
            return None
        params = list(self.dit.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        frac = trainable / sum(p.numel() for p in params)
        return self.gflop_forward * (2.0 + frac)

    def sample_gflop(self, steps: int) -> float | None:
        """GFLOP per image of guided sampling with ``steps`` steps and a decode."""
        if self.gflop_forward is None:
            return None
        return self.gflop_forward * 2 * steps + self.gflop_decode


def build_workload(size: str, device: torch.device | str, num_classes: int = 1000) -> Workload:
    """Random-weight DiT (DiffFit trainable set) and VAE of a named size, on ``device``."""
    preset, image_size, vae_preset, fwd, enc, dec = SIZES[size]
    torch.manual_seed(0)
    latent = image_size // 8 if vae_preset == "sd" else image_size // 2
    dit = build_dit(preset, in_channels=4, sample_size=latent, num_classes=num_classes)
    set_trainable(dit, "difffit")
    vae = build_vae(vae_preset, sample_size=image_size).eval().requires_grad_(False)
    device = torch.device(device)
    return Workload(dit.to(device), vae.to(device), Diffusion(device=device), device, image_size,
                    (4, latent, latent), num_classes, fwd, enc, dec)


# ---------------------------------------------------------------- the reference path


class ListMemory:
    """Per-class memories as Python lists of tensors with first-in-first-out replacement, as the
    published code keeps them."""

    def __init__(self, num_classes: int, capacity: int) -> None:
        self.capacity = capacity
        self.items: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]

    def insert(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        for row, c in zip(x.detach(), labels.tolist(), strict=True):
            self.items[c].append(row.clone())
            if len(self.items[c]) > self.capacity:
                self.items[c].pop(0)


def reference_memory_terms(x0_hat: torch.Tensor, labels: torch.Tensor, real: ListMemory,
                           gen: ListMemory, *, lambda_r: float, lambda_g: float) -> MinimaxTerms:
    """The memory terms computed class by class, one similarity matrix per class and memory."""
    num_classes = len(real.items)
    rep = torch.zeros(num_classes, device=x0_hat.device)
    div = torch.zeros(num_classes, device=x0_hat.device)
    present = sorted(set(labels.tolist()))
    for c in present:
        if not gen.items[c]:
            continue
        x = x0_hat[labels == c]  # (b_c, D)
        g = torch.stack(gen.items[c])  # (n, D)
        sim = F.cosine_similarity(x.unsqueeze(1), g.unsqueeze(0), dim=-1, eps=1e-8)
        div[c] = lambda_g / len(present) * sim.max()
        if real.items[c]:
            r = torch.stack(real.items[c])
            sim = F.cosine_similarity(x.unsqueeze(1), r.unsqueeze(0), dim=-1, eps=1e-8)
            rep[c] = lambda_r / len(present) * (1.0 - sim.min())
    return MinimaxTerms(rep.sum() + div.sum(), rep, div)


def reference_finetune_step(w: Workload, batch: int, capacity: int = 64):
    """A closure running one reference fine-tuning step on a fixed batch of images."""
    images, labels = w.images(batch)
    params = [p for p in w.dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    shadow = [p.detach().clone() for p in params]
    real, gen = ListMemory(w.num_classes, capacity), ListMemory(w.num_classes, capacity)
    scale = getattr(w.vae.config, "scaling_factor", 1.0)

    def step() -> torch.Tensor:
        with torch.no_grad():
            z0 = w.vae.encode(images).latent_dist.sample() * scale  # every step, as published
        t = torch.randint(0, w.diffusion.num_steps, (batch,), device=w.device)
        noise = torch.randn_like(z0)
        z_t = w.diffusion.q_sample(z0, t, noise)
        out = w.dit(z_t, timestep=t, class_labels=labels, return_dict=False)[0]
        terms = w.diffusion.training_losses(out, z0, z_t, t, noise)
        x0 = terms["x0_hat"].flatten(1)
        mm = reference_memory_terms(x0, labels, real, gen, lambda_r=0.002, lambda_g=0.008)
        loss = terms["loss"].mean() + mm.total
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for s, p in zip(shadow, params, strict=True):
                s.mul_(0.9999).add_(p.detach(), alpha=1e-4)
        real.insert(z0.flatten(1), labels)
        gen.insert(x0, labels)
        return loss.detach()

    return step


def reference_sample(w: Workload, steps: int = 50, guidance: float = 4.0):
    """A closure sampling and decoding ONE image, float32 eager."""
    def run(label: int = 0, index: int = 0) -> torch.Tensor:
        labels = torch.tensor([label], device=w.device)
        z = sample(w.dit, labels, seeds=[image_seed(0, label, index)], latent_shape=w.latent_shape,
                   steps=steps, guidance_scale=guidance, null_label=w.num_classes,
                   diffusion=w.diffusion, device=w.device)
        with torch.no_grad():
            return w.vae.decode(z / getattr(w.vae.config, "scaling_factor", 1.0)).sample

    return run


# ---------------------------------------------------------------- ddfast's path


def ddfast_finetune_step(w: Workload, batch: int, capacity: int = 64, compile: bool = True):
    """A closure running one ddfast fine-tuning step on latents encoded once."""
    images, labels = w.images(batch)
    scale = getattr(w.vae.config, "scaling_factor", 1.0)
    with torch.no_grad():
        z0 = w.vae.encode(images).latent_dist.sample() * scale  # cached: encoded once
    params = [p for p in w.dit.parameters() if p.requires_grad]
    cuda = w.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda or None,
                            foreach=not cuda)
    ema = EMA(params, decay=0.9999)
    dim = int(z0[0].numel())
    bank = MemoryBank(w.num_classes, dim, real_capacity=capacity, gen_capacity=capacity,
                      device=w.device)
    loss_fn = perf.compile(objective) if compile else objective
    gen = torch.Generator(device=w.device).manual_seed(0)
    precision = "bf16" if cuda else "fp32"

    def step() -> torch.Tensor:
        t = torch.randint(0, w.diffusion.num_steps, (batch,), device=w.device, generator=gen)
        noise = torch.randn(z0.shape, device=w.device, generator=gen)
        return train_step(w.dit, opt, ema, w.diffusion, z0, t, noise, labels, labels,
                          bank=bank, lambda_r=0.002, lambda_g=0.008, precision=precision,
                          loss_fn=loss_fn)

    return step


def ddfast_sample(w: Workload, steps: int = 50, guidance: float = 4.0, compile: bool = True):
    """A closure sampling and decoding a batch of images in one pass per step."""
    cuda = w.device.type == "cuda"
    forward = w.dit
    if compile:  # CUDA graphs on a GPU: the batch shape is static
        forward = perf.compile(w.dit, mode="reduce-overhead" if cuda else "default")

    def run(num: int, label: int = 0) -> torch.Tensor:
        labels = torch.full((num,), label, device=w.device)
        z = sample(forward, labels, seeds=[image_seed(0, label, i) for i in range(num)],
                   latent_shape=w.latent_shape, steps=steps, guidance_scale=guidance,
                   null_label=w.num_classes, diffusion=w.diffusion, device=w.device,
                   autocast_dtype=torch.bfloat16 if cuda else None)
        with torch.no_grad(), torch.autocast(w.device.type, dtype=torch.bfloat16,
                                             enabled=cuda):
            return w.vae.decode(z / getattr(w.vae.config, "scaling_factor", 1.0)).sample

    return run
