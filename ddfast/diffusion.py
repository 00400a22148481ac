"""Gaussian diffusion as DiT uses it: schedule, q-sample, hybrid loss, respaced samplers.

method.md sections 2 and 4: 1000 steps, linear betas 1e-4..0.02, epsilon prediction with a learned
variance (the model outputs 2C channels: eps, then v in [-1, 1] interpolating the log variance
between the clipped posterior's and beta's), loss = MSE(eps) + the variational bound whose mean path
sees a stop-gradient copy of eps, and sampling with respaced ancestral DDPM or DDIM steps under
classifier-free guidance computed in one batched forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]
SAMPLERS = ("ddpm", "ddim")
GUIDANCE_CHANNELS = ("first3", "all")  # original DiT, diffusers
_LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    ratio = torch.exp(logvar1 - logvar2)
    return 0.5 * (logvar2 - logvar1 + ratio - 1.0 + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) by the tanh approximation; DiT's decoder term uses it, so the loss values agree."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) for data in [-1, 1] quantised into 256 bins of width 2/255, elementwise, in nats.

    The two outermost bins reach to -inf and +inf, so every value has a bin. x, mean, log_scale
    broadcast together, e.g. (B, C, H, W).
    """
    inv_std = torch.exp(-log_scale)
    centred = x - mean
    cdf_upper = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    # The clamps keep log finite (and its gradient zero) where a tail probability underflows.
    log_below = torch.log(cdf_upper.clamp(min=1e-12))
    log_above = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, log_bin))


def respaced_timesteps(num_steps: int = 1000, count: int = 50) -> list[int]:
    """``count`` of ``num_steps`` timesteps, evenly strided, both ends included, ascending.

    improved-DDPM's ``space_timesteps(num_steps, str(count))`` (used by DiT): the float stride
    (num_steps - 1) / (count - 1) is accumulated and each position rounded.
    """
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot keep {count} of {num_steps} timesteps")
    if count == 1:
        return [0]
    stride = (num_steps - 1) / (count - 1)
    kept, pos = [], 0.0
    for _ in range(count):
        kept.append(round(pos))
        pos += stride
    return kept


class Diffusion:
    """The noise schedule as fp32 tensors on ``device``, with the training and sampling maths.

    Tables are computed in float64 (numpy, kept in ``tables64``) and stored as float32 attributes:
    betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2, log_betas; all (T,).
    A respaced process (``respaced``) has its own betas; ``timestep_map`` (T,) int64 gives the
    original timestep of each of its steps, which is what the model is conditioned on.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 device: torch.device | str | None = None, *, betas: Sequence[float] | None = None,
                 timestep_map: Sequence[int] | None = None):
        b = (np.linspace(beta_start, beta_end, num_steps, dtype=np.float64) if betas is None
             else np.asarray(betas, dtype=np.float64))
        if b.ndim != 1 or len(b) == 0 or not np.all((b > 0) & (b <= 1)):
            raise ValueError("betas must be a non-empty 1-D sequence in (0, 1]")
        self.num_steps = len(b)
        self.device = torch.device(device if device is not None else "cpu")
        ac = np.cumprod(1.0 - b)
        ac_prev = np.concatenate([[1.0], ac[:-1]])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        # post_var[0] is 0; the log takes the value of step 1 there (a one-step process has no
        # step 1 and never uses the variance of its only, final, step).
        clipped = np.concatenate([post_var[1:2], post_var[1:]]) if len(b) > 1 else post_var
        self.tables64 = {
            "betas": b,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt((1.0 - ac) / ac),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.maximum(clipped, 1e-20)),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            "log_betas": np.log(b),
        }
        for name, table in self.tables64.items():
            setattr(self, name, torch.tensor(table, dtype=torch.float32, device=self.device))
        # A host copy avoids a device sync whenever a respaced process is derived.
        self.timestep_list = (list(range(self.num_steps)) if timestep_map is None
                              else [int(t) for t in timestep_map])
        if len(self.timestep_list) != self.num_steps:
            raise ValueError("timestep_map needs one entry per step")
        self.timestep_map = torch.tensor(self.timestep_list, dtype=torch.int64, device=self.device)
        self._respaced: dict[tuple[int, ...], Diffusion] = {}

    def respaced(self, timesteps: Sequence[int]) -> Diffusion:
        """The process visiting only ``timesteps`` (indices into this one, any order).

        Its betas keep each kept step's alphas_cumprod: beta_i = 1 - abar[k_i] / abar[k_{i-1}].
        Cached per timestep set.
        """
        kept = tuple(sorted({int(t) for t in timesteps}))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_steps:
            raise ValueError(f"timesteps must lie in [0, {self.num_steps})")
        if kept not in self._respaced:
            ac = self.tables64["alphas_cumprod"][list(kept)]
            betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
            self._respaced[kept] = Diffusion(betas=betas, device=self.device,
                                             timestep_map=[self.timestep_list[k] for k in kept])
        return self._respaced[kept]

    @staticmethod
    def _at(table: Tensor, t: Tensor, ndim: int) -> Tensor:
        # Gathers on the device: no host sync whatever t holds.
        return table[t].view(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)

    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise.

        z0, noise: (B, C, H, W); t: (B,) int64 on this device. Returns (B, C, H, W).
        """
        return (self._at(self.sqrt_alphas_cumprod, t, z0.dim()) * z0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, z0.dim()) * noise)

    def predict_x0(self, z_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), differentiable.

        z_t, eps: (B, C, H, W) in any float dtype; t: (B,). Returns (B, C, H, W) fp32: the factor
        1/sqrt(abar_t) reaches ~157 at t = 999, too much for bf16.
        """
        z_t, eps = z_t.float(), eps.float()
        return (self._at(self.sqrt_recip_alphas_cumprod, t, z_t.dim()) * z_t
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, z_t.dim()) * eps)

    def q_posterior(self, z0: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (B, C, H, W) and clipped log variance (B, 1, 1, 1) of q(z_{t-1} | z_t, z0)."""
        mean = (self._at(self.posterior_mean_coef1, t, z_t.dim()) * z0
                + self._at(self.posterior_mean_coef2, t, z_t.dim()) * z_t)
        return mean, self._at(self.posterior_log_variance_clipped, t, z_t.dim())

    def p_mean_log_var(self, model_output: Tensor, z_t: Tensor,
                       t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, log variance and x0 prediction of p(z_{t-1} | z_t), all (B, C, H, W) fp32.

        model_output: (B, 2C, H, W), eps then v in [-1, 1]; the log variance is
        frac * log(beta_t) + (1 - frac) * posterior_log_variance_clipped_t, frac = (v + 1) / 2.
        x0 is not clipped (DiT samples latents with clip_denoised=False).
        """
        c = z_t.shape[1]
        eps, v = model_output[:, :c].float(), model_output[:, c:].float()
        frac = (v + 1.0) / 2.0
        log_var = (frac * self._at(self.log_betas, t, z_t.dim())
                   + (1.0 - frac) * self._at(self.posterior_log_variance_clipped, t, z_t.dim()))
        x0 = self.predict_x0(z_t, t, eps)
        mean, _ = self.q_posterior(x0, z_t.float(), t)
        return mean, log_var, x0

    def training_losses(self, model_output: Tensor, z0: Tensor, z_t: Tensor, t: Tensor,
                        noise: Tensor) -> dict[str, Tensor]:
        """DiT's hybrid loss per sample, and the x0 prediction that carries gradient.

        model_output: (B, 2C, H, W); z0, z_t, noise: (B, C, H, W); t: (B,) int64.
        Returns ``mse``, ``vb`` (in bits), ``loss`` = mse + vb, all (B,) fp32, and ``x0_hat``
        (B, C, H, W) fp32 with gradient through eps. vb is the KL to the true posterior, or at
        t = 0 the discretised decoder NLL; its mean uses a detached eps, so it trains only v.
        """
        c = z0.shape[1]
        eps = model_output[:, :c].float()
        mse = mean_flat((noise.float() - eps) ** 2)  # (B,)
        frozen = torch.cat([eps.detach(), model_output[:, c:].float()], dim=1)  # (B, 2C, H, W)
        mean, log_var, _ = self.p_mean_log_var(frozen, z_t, t)
        true_mean, true_log_var = self.q_posterior(z0.float(), z_t.float(), t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / _LN2  # (B,)
        nll = -mean_flat(discretized_gaussian_log_likelihood(z0.float(), mean,
                                                             0.5 * log_var)) / _LN2  # (B,)
        vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "x0_hat": self.predict_x0(z_t, t, eps)}

    def ddpm_step(self, model_output: Tensor, x: Tensor, t: Tensor,
                  noise: Tensor | None) -> Tensor:
        """One ancestral step z_t -> z_{t-1} with the learned variance; fp32.

        t: (B,) indices of this process (respaced); pass ``noise=None`` at the final step.
        """
        mean, log_var, _ = self.p_mean_log_var(model_output, x, t)
        return mean if noise is None else mean + torch.exp(0.5 * log_var) * noise

    def ddim_step(self, model_output: Tensor, x: Tensor, t: Tensor, eta: float = 0.0,
                  noise: Tensor | None = None) -> Tensor:
        """One DDIM step from eps only (the variance channels are ignored); fp32.

        With eta > 0 pass ``noise`` (B, C, H, W); at the final step abar_prev = 1, sigma = 0.
        """
        c = x.shape[1]
        eps = model_output[:, :c].float()
        x0 = self.predict_x0(x, t, eps)
        a = self._at(self.alphas_cumprod, t, x.dim())
        a_prev = self._at(self.alphas_cumprod_prev, t, x.dim())
        sigma = eta * torch.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
        out = torch.sqrt(a_prev) * x0 + torch.sqrt(1.0 - a_prev - sigma ** 2) * eps
        return out if noise is None or eta == 0 else out + sigma * noise


def image_seed(base_seed: int, class_index: int, index: int) -> int:
    """The seed of one distilled image: a stable hash of (base seed, class, index) in [0, 2^63).

    Python's ``hash`` is salted per process; sha256 gives the same seed on every run and machine.
    """
    # The key format and byte order are those of ddfast's first release: manifests record seeds.
    key = f"ddfast:{int(base_seed)}:{int(class_index)}:{int(index)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def dit_model_fn(dit: torch.nn.Module) -> ModelFn:
    """model_fn(x, t, y) -> (B, 2C, H, W) for a diffusers DiTTransformer2DModel."""

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return dit(x, timestep=t, class_labels=y, return_dict=False)[0]

    return model_fn


def guided_output(model_fn: ModelFn, x: Tensor, t: Tensor, y: Tensor, null_label: int,
                  scale: float, channels: str = "first3") -> Tensor:
    """Classifier-free guided model output from ONE forward of [x; x] with labels [y; null].

    x: (B, C, H, W); t, y: (B,). Returns (B, 2C, H, W). Guided eps = uncond + scale * (cond -
    uncond) on eps channels [:3] ("first3", DiT's forward_with_cfg; the 4th eps channel stays
    conditional) or on all C eps channels ("all", diffusers' DiTPipeline). Variance channels are
    always the conditional ones. scale == 1 is no guidance: one forward of x alone.
    """
    if channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance channels must be one of {GUIDANCE_CHANNELS}, got {channels!r}")
    if scale == 1.0:
        return model_fn(x, t, y)
    b, c = x.shape[:2]
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([y, torch.full_like(y, null_label)]))  # (2B, 2C, H, W)
    cond, uncond = out[:b], out[b:]
    k = min(3, c) if channels == "first3" else c
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])  # (B, k, H, W)
    return torch.cat([guided, cond[:, k:]], dim=1)


def _draw(gens: list[torch.Generator], shape: Sequence[int], device: torch.device) -> Tensor:
    # One CPU generator per image: its numbers do not depend on batch size or device.
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)


@torch.no_grad()
def sample(model_fn: ModelFn | torch.nn.Module, labels: Tensor, *, latent_shape: Sequence[int],
           null_label: int, seeds: Sequence[int] | None = None, noise: Tensor | None = None,
           steps: int = 50, timesteps: Sequence[int] | None = None, sampler: str = "ddpm",
           guidance_scale: float = 4.0, guidance_channels: str = "first3", eta: float = 0.0,
           diffusion: Diffusion | None = None, device: torch.device | str | None = None,
           autocast_dtype: torch.dtype | None = None,
           guidance_interval: Sequence[int] | None = None, anchor: Tensor | None = None,
           strength: float = 1.0) -> Tensor:
    """Sample latents conditioned on ``labels`` (B,); returns (B, C, H, W) fp32 on ``device``.

    model_fn(x, t, y) -> (B, 2C, H, W), or a DiTTransformer2DModel (wrapped by dit_model_fn); it
    is called with the ORIGINAL timestep values. latent_shape: (C, H, W).
    Randomness: ``seeds`` (one per image, see image_seed): image k's CPU generator draws its initial
    noise, then its noise of each stochastic step, so a set is the same whatever the batching.
    ``noise`` (B, C, H, W) replaces the initial draw (the seeds then give only the step noise);
    without seeds it suffices for deterministic DDIM.
    timesteps: original timesteps to visit (any order), e.g. a diffusers scheduler's; default
    ``respaced_timesteps(T, steps)``. sampler: "ddpm" (ancestral, learned variance, no noise at
    the last step) or "ddim" (eps only; eta 0 is deterministic). guidance: see guided_output.
    guidance_interval: (lo, hi) original timesteps, inclusive: guidance only at the steps whose
    timestep lies inside, one conditional forward elsewhere (Kynkaanniemi et al. 2024, "Applying
    guidance in a limited interval"); None or empty: every step.
    autocast_dtype: e.g. torch.bfloat16 for the model forward; the updates stay fp32.
    anchor (B, C, H, W): start from it instead of pure noise (SDEdit, Meng et al. 2022; D4M,
    Su et al. 2024, starts from k-means prototypes of real latents): the process visits only
    the timesteps at or below ``strength * (T - 1)`` and starts at the largest of them, t0,
    from sqrt(abar[t0]) * anchor + sqrt(1 - abar[t0]) * noise, the noise drawn as the initial
    draw (strength 1 with any anchor is the plain sampler up to abar[T - 1]'s residue).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if guidance_channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance_channels must be one of {GUIDANCE_CHANNELS}, "
                         f"got {guidance_channels!r}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be (B,), got {tuple(labels.shape)}")
    dev = torch.device(device) if device is not None else labels.device
    b, shape = labels.shape[0], tuple(int(s) for s in latent_shape)
    stochastic = sampler == "ddpm" or eta > 0
    if seeds is not None and len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} labels")
    if seeds is None and (noise is None or stochastic):
        raise ValueError("pass one seed per image (explicit noise alone suffices for DDIM eta=0)")
    if noise is not None and tuple(noise.shape) != (b, *shape):
        raise ValueError(f"noise must be {(b, *shape)}, got {tuple(noise.shape)}")
    base = diffusion if diffusion is not None else Diffusion(device=dev)
    visit = (list(timesteps) if timesteps is not None
             else respaced_timesteps(base.num_steps, steps))
    if anchor is not None:
        if tuple(anchor.shape) != (b, *shape):
            raise ValueError(f"anchor must be {(b, *shape)}, got {tuple(anchor.shape)}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        top = strength * (base.num_steps - 1)
        visit = [t for t in visit if t <= top + 1e-9]
        if not visit:
            raise ValueError(f"strength {strength} lies below every sampled timestep: raise it "
                             "or sample more steps")
    proc = base.respaced(visit)
    if isinstance(model_fn, torch.nn.Module):
        model_fn = dit_model_fn(model_fn)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds] if seeds is not None else []
    x = (_draw(gens, shape, dev) if noise is None
         else noise.to(device=dev, dtype=torch.float32))  # (B, C, H, W)
    if anchor is not None:  # q(x_t0 | anchor), t0 the first step visited
        ab = float(base.tables64["alphas_cumprod"][max(int(t) for t in visit)])
        x = math.sqrt(ab) * anchor.to(device=dev, dtype=torch.float32) + math.sqrt(1.0 - ab) * x
    labels = labels.to(dev)
    if guidance_interval:
        lo, hi = (int(v) for v in guidance_interval)
    for i in reversed(range(proc.num_steps)):
        t = torch.full((b,), i, dtype=torch.int64, device=dev)  # respaced index
        scale = guidance_scale  # the original timestep is read from the host-side list
        if guidance_interval and not lo <= proc.timestep_list[i] <= hi:
            scale = 1.0
        with (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None
              else contextlib.nullcontext()):
            out = guided_output(model_fn, x, proc.timestep_map[t], labels, null_label,
                                scale, guidance_channels)
        out = out.float()  # (B, 2C, H, W)
        step_noise = _draw(gens, shape, dev) if stochastic and i > 0 else None
        if sampler == "ddpm":
            x = proc.ddpm_step(out, x, t, step_noise)
        else:
            x = proc.ddim_step(out, x, t, eta, step_noise)
    return x
