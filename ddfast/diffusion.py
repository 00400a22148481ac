"""Gaussian diffusion as DiT uses it: schedule, q-sample, hybrid loss, respaced samplers.

Everything follows method.md section 2 and 4: 1000 steps, linear betas 1e-4..0.02, epsilon
prediction with a learned variance (the model outputs 2C channels: eps, then v in [-1, 1] that
interpolates the log variance between the posterior's and beta's), loss = MSE(eps) + the
variational bound (whose mean path sees a stop-gradient copy of eps), and sampling with respaced
ancestral DDPM steps or DDIM, with classifier-free guidance in one batched forward.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_LN2 = math.log(2.0)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))  # (B,)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of the standard normal CDF that the DDPM decoder term uses.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)).

    The outermost bins extend to -inf and +inf. Elementwise, in nats.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_hi = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lo = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_hi = torch.log(cdf_hi.clamp(min=1e-12))
    log_one_minus_cdf_lo = torch.log((1.0 - cdf_lo).clamp(min=1e-12))
    log_delta = torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_hi,
                       torch.where(x > 0.999, log_one_minus_cdf_lo, log_delta))


def respaced_timesteps(num_steps: int = 1000, count: int = 50) -> list[int]:
    """``count`` of the ``num_steps`` timesteps, evenly strided, first and last included.

    The stride (num_steps - 1) / (count - 1) is accumulated in floating point and rounded at each
    step, the rule of improved-DDPM's ``space_timesteps(num_steps, str(count))`` that DiT uses.
    """
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot take {count} of {num_steps} timesteps")
    if count == 1:
        return [0]
    stride = (num_steps - 1) / (count - 1)
    taken, cursor = [], 0.0
    for _ in range(count):
        taken.append(round(cursor))
        cursor += stride
    return taken


class Diffusion:
    """The noise schedule as device tensors, with the operations of training and sampling.

    ``timestep_map`` gives, for a respaced process, the original timestep of each of its steps
    (the model is always conditioned on original timesteps).
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 device: torch.device | str | None = None, *, betas: np.ndarray | None = None,
                 timestep_map: Sequence[int] | None = None):
        if betas is None:
            betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
        betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(betas)
        self.device = torch.device(device or "cpu")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        post_log_var = np.log(np.append(post_var[1], post_var[1:]) if len(betas) > 1
                              else np.maximum(post_var, 1e-20))
        tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(betas),
        }
        self.tables64 = tables
        for name, arr in tables.items():
            setattr(self, name, torch.tensor(arr, dtype=torch.float32, device=self.device))
        tmap = list(range(self.num_steps)) if timestep_map is None else list(timestep_map)
        self.timestep_map = torch.tensor(tmap, dtype=torch.int64, device=self.device)

    def respaced(self, timesteps: Sequence[int]) -> Diffusion:
        """The process restricted to ``timesteps`` (sorted original indices), with the betas
        that keep each kept step's alphas_cumprod."""
        kept = sorted(int(t) for t in timesteps)
        betas, last = [], 1.0
        for t in kept:
            a = self.tables64["alphas_cumprod"][t]
            betas.append(1.0 - a / last)
            last = a
        original = self.timestep_map.tolist()
        return Diffusion(betas=np.array(betas), device=self.device,
                         timestep_map=[original[t] for t in kept])

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return table[t].view(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps.  z0, noise: (B, C, H, W); t: (B,)."""
        return (self._at(self.sqrt_alphas_cumprod, t, z0.dim()) * z0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, z0.dim()) * noise)

    def predict_x0(self, z_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), in fp32 (1/sqrt(abar) ~ 157)."""
        z_t, eps = z_t.float(), eps.float()
        return (self._at(self.sqrt_recip_alphas_cumprod, t, z_t.dim()) * z_t
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, z_t.dim()) * eps)

    def q_posterior(self, z0, z_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(z_{t-1} | z_t, z0)."""
        mean = (self._at(self.posterior_mean_coef1, t, z_t.dim()) * z0
                + self._at(self.posterior_mean_coef2, t, z_t.dim()) * z_t)
        log_var = self._at(self.posterior_log_variance_clipped, t, z_t.dim()).expand_as(z_t)
        return mean, log_var

    def p_mean_log_var(self, model_output: torch.Tensor, z_t: torch.Tensor,
                       t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, log variance and x0 prediction of p(z_{t-1} | z_t) from a 2C-channel output.

        No clipping of x0 (DiT samples latents with clip_denoised=False).
        """
        c = z_t.shape[1]
        eps, v = model_output[:, :c].float(), model_output[:, c:].float()
        lo = self._at(self.posterior_log_variance_clipped, t, z_t.dim())
        hi = self._at(self.log_betas, t, z_t.dim())
        frac = (v + 1.0) / 2.0
        log_var = frac * hi + (1.0 - frac) * lo  # (B, C, H, W)
        x0 = self.predict_x0(z_t, t, eps)
        mean, _ = self.q_posterior(x0, z_t.float(), t)
        return mean, log_var, x0

    def training_losses(self, model_output: torch.Tensor, z0: torch.Tensor, z_t: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """DiT's hybrid loss per sample, and the x0 prediction that carries gradient.

        model_output: (B, 2C, H, W); z0, z_t, noise: (B, C, H, W); t: (B,).
        Returns loss, mse, vb (B,) and x0_hat (B, C, H, W) fp32.
        """
        c = z0.shape[1]
        eps = model_output[:, :c].float()
        mse = _mean_flat((noise.float() - eps) ** 2)  # (B,)
        # The bound trains only the variance: its mean path sees eps as a constant.
        frozen = torch.cat([eps.detach(), model_output[:, c:].float()], dim=1)
        mean, log_var, _ = self.p_mean_log_var(frozen, z_t, t)
        true_mean, true_log_var = self.q_posterior(z0.float(), z_t.float(), t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / _LN2
        nll = -_mean_flat(discretized_gaussian_log_likelihood(
            z0.float(), mean, 0.5 * log_var)) / _LN2
        vb = torch.where(t == 0, nll, kl)  # (B,)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "x0_hat": self.predict_x0(z_t, t, eps)}


def image_seed(base_seed: int, class_index: int, index: int) -> int:
    """The seed of one distilled image, a stable hash of (base seed, class, index) in [0, 2^63)."""
    digest = hashlib.sha256(f"ddfast:{base_seed}:{class_index}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dit_model_fn(dit: torch.nn.Module) -> ModelFn:
    """Adapt a diffusers DiTTransformer2DModel to model_fn(x, t, y) -> (B, 2C, H, W)."""
    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dit(x, timestep=t, class_labels=y, return_dict=False)[0]
    return fn


def guided_output(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  null_label: int, scale: float, channels: str) -> torch.Tensor:
    """One batched forward of [x; x] with [y; null] and the guided eps.

    channels: "first3" guides eps channels [:min(3, C)] and keeps the conditional rest, as the
    original DiT does with 4 latent channels; "all" guides every eps channel (diffusers). The
    variance channels always come from the conditional half.
    """
    b, c = x.shape[:2]
    if scale == 1.0:
        return model_fn(x, t, y)
    out = model_fn(torch.cat([x, x]), torch.cat([t, t]),
                   torch.cat([y, torch.full_like(y, null_label)]))  # (2B, 2C, H, W)
    cond, uncond = out[:b], out[b:]
    k = min(3, c) if channels == "first3" else c
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


def _noise(gens: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    # Each image draws from its own CPU generator: identical sets on any device and batch size.
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


@torch.no_grad()
def sample(model: torch.nn.Module | ModelFn, labels: torch.Tensor, *, latent_shape,
           null_label: int, diffusion: Diffusion | None = None,
           seeds: Sequence[int] | None = None, noise: torch.Tensor | None = None,
           steps: int = 50, timesteps: Sequence[int] | None = None,
           sampler: str = "ddpm", guidance_scale: float = 4.0, guidance_channels: str = "first3",
           eta: float = 0.0, device: torch.device | str | None = None,
           autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sample latents for conditioning ``labels`` (B,).

    Randomness: ``seeds`` (one per image; its generator gives the initial noise, then each step's
    ancestral noise) or explicit initial ``noise`` (B, C, H, W) (then steps draw from a generator
    seeded 0). timesteps: explicit original timesteps to visit (default: ``steps`` respaced).
    Returns (B, C, H, W) fp32.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    if guidance_channels not in ("first3", "all"):
        raise ValueError(f"guidance_channels must be first3 or all, got {guidance_channels!r}")
    device = torch.device(device) if device is not None else labels.device
    base = diffusion or Diffusion(device=device)
    proc = base.respaced(timesteps if timesteps is not None
                         else respaced_timesteps(base.num_steps, steps))
    model_fn = dit_model_fn(model) if isinstance(model, torch.nn.Module) else model
    labels = labels.to(device)
    b = labels.shape[0]
    if noise is not None:
        x = noise.to(device=device, dtype=torch.float32)
        gens = [torch.Generator().manual_seed(0)]
        step_noise = lambda: torch.randn(x.shape, generator=gens[0]).to(device)  # noqa: E731
    else:
        if seeds is None or len(seeds) != b:
            raise ValueError("pass one seed per label (or explicit initial noise)")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x = _noise(gens, tuple(latent_shape), device)  # (B, C, H, W)
        step_noise = lambda: _noise(gens, tuple(latent_shape), device)  # noqa: E731
    for i in reversed(range(proc.num_steps)):
        t = torch.full((b,), i, dtype=torch.int64, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = guided_output(model_fn, x, proc.timestep_map[t], labels, null_label,
                                guidance_scale, guidance_channels)
        out = out.float()
        if sampler == "ddpm":
            mean, log_var, _ = proc.p_mean_log_var(out, x, t)
            x = mean + (torch.exp(0.5 * log_var) * step_noise() if i > 0 else 0.0)
        else:
            c = x.shape[1]
            eps = out[:, :c]
            x0 = proc.predict_x0(x, t, eps)
            a = proc._at(proc.alphas_cumprod, t, x.dim())
            a_prev = proc._at(proc.alphas_cumprod_prev, t, x.dim())
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
            x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma ** 2) * eps
            if eta > 0 and i > 0:
                x = x + sigma * step_noise()
    return x
