"""Diffusion: schedule and VB against float64, samplers, guidance, seeds, diffusers parity."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
)

from ddfast.diffusion import Diffusion, guided_output, image_seed, respaced_timesteps, sample

BETAS = np.linspace(1e-4, 0.02, 1000)  # float64, the reference schedule


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(classes: int = 1000, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=classes, norm_num_groups=1)
    # diffusers zero-initialises the output layers; perturbed weights make the checks meaningful
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dit.eval()


def abar_of(t: int) -> float:
    return math.prod(1.0 - BETAS[s] for s in range(t + 1)) if t >= 0 else 1.0


def test_schedule_against_float64_formulas():
    d = Diffusion()
    assert d.alphas_cumprod.dtype == torch.float32 and d.num_steps == 1000
    for t in (0, 1, 2, 10, 500, 998, 999):
        a, a_prev, beta = abar_of(t), abar_of(t - 1), BETAS[t]
        var = beta * (1 - a_prev) / (1 - a)
        # the log variance is clipped to step 1's value at t = 0, where the variance is 0
        log_var = math.log(var if t > 0 else BETAS[1] * (1 - abar_of(0)) / (1 - abar_of(1)))
        want = {"alphas_cumprod": a, "alphas_cumprod_prev": a_prev, "posterior_variance": var,
                "posterior_log_variance_clipped": log_var, "log_betas": math.log(beta),
                "posterior_mean_coef1": math.sqrt(a_prev) * beta / (1 - a),
                "posterior_mean_coef2": math.sqrt(1 - beta) * (1 - a_prev) / (1 - a),
                "sqrt_recip_alphas_cumprod": a ** -0.5,
                "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / a - 1)}
        for name, value in want.items():
            got = getattr(d, name)[t].item()
            assert math.isclose(got, value, rel_tol=2e-6, abs_tol=1e-30), (name, t, got, value)
    assert 150 < d.sqrt_recip_alphas_cumprod[999].item() < 160  # method.md's ~157


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_q_sample_and_predict_x0_round_trip(t):
    d = Diffusion()
    z0 = torch.randn(8, 4, 8, 8)
    noise = torch.randn_like(z0)
    tt = torch.full((8,), t)
    z_t = d.q_sample(z0, tt, noise)
    a = abar_of(t)
    want_zt = math.sqrt(a) * z0.double() + math.sqrt(1 - a) * noise.double()
    torch.testing.assert_close(z_t.double(), want_zt, rtol=0, atol=1e-6)
    x0 = d.predict_x0(z_t, tt, noise)
    assert x0.dtype == torch.float32
    # fp32 rounding of z_t and of the products, amplified by 1/sqrt(abar) (~157 at t = 999)
    bound = 8 * 2.0 ** -23 * (z_t.abs() + noise.abs() + z0.abs()) / math.sqrt(a)
    err = (x0.double() - z0.double()).abs()
    assert torch.all(err <= bound), (t, err.max().item(), bound.min().item())
    assert t < 999 or err.max() > 0  # the fp32 path is really fp32, not float64


def _vb_reference(eps, v, z0, z_t, t, exact_cdf=False):
    """Float64 VB in bits for one sample (numpy arrays (C, H, W)), written from the formulas."""
    a, a_prev, beta = abar_of(t), abar_of(t - 1), BETAS[t]
    s = max(t, 1)  # the posterior variance is 0 at t = 0; its log is clipped to step 1's
    var_post = BETAS[s] * (1 - abar_of(s - 1)) / (1 - abar_of(s))
    frac = (v + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(var_post)
    x0 = (z_t - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def posterior_mean(x_start):
        return (math.sqrt(a_prev) * beta * x_start + math.sqrt(1 - beta) * (1 - a_prev) * z_t) / (
            1 - a)

    mean, std = posterior_mean(x0), np.exp(0.5 * log_var)
    if t > 0:  # KL between Gaussians with standard deviations s1 (true) and s2 (model)
        s1, s2 = math.sqrt(var_post), std
        kl = np.log(s2 / s1) + (s1 ** 2 + (posterior_mean(z0) - mean) ** 2) / (2 * s2 ** 2) - 0.5
        return kl.mean() / math.log(2)
    if exact_cdf:
        def cdf(u):
            return 0.5 * (1 + np.vectorize(math.erf)(u / math.sqrt(2)))
    else:  # DiT's tanh approximation of the CDF, written independently
        def cdf(u):
            return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    upper = np.where(z0 > 0.999, 1.0, cdf((z0 + 1 / 255 - mean) / std))
    lower = np.where(z0 < -0.999, 0.0, cdf((z0 - 1 / 255 - mean) / std))
    return -np.log(np.maximum(upper - lower, 1e-12)).mean() / math.log(2)


def _loss_inputs(t, seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    d = Diffusion()
    z0 = torch.rand(b, 4, 4, 4, generator=g) * 2 - 1
    z0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the open-ended edge bins
    noise = torch.randn(z0.shape, generator=g)
    tt = torch.as_tensor(t).expand(b).clone() if isinstance(t, int) else torch.tensor(t)
    z_t = d.q_sample(z0, tt, noise)
    eps = noise + 0.3 * torch.randn(z0.shape, generator=g)
    out = torch.cat([eps, torch.rand(z0.shape, generator=g) * 2 - 1], 1).requires_grad_(True)
    return d, out, z0, z_t, tt, noise


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_vb_term_against_float64(t):
    d, out, z0, z_t, tt, noise = _loss_inputs(t, seed=t)
    losses = d.training_losses(out, z0, z_t, tt, noise)
    for i in range(out.shape[0]):
        args = [x.detach().double().numpy() for x in (out[i, :4], out[i, 4:], z0[i], z_t[i])]
        want = _vb_reference(*args, t)
        got = losses["vb"][i].item()
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6), (t, i, got, want)
        if t == 0:  # the approximation is close to the exact likelihood (sanity of the formula)
            exact = _vb_reference(*args, t, exact_cdf=True)
            assert math.isclose(got, exact, rel_tol=2e-2), (got, exact)
        want_mse = ((args[0] - noise[i].double().numpy()) ** 2).mean()
        assert math.isclose(losses["mse"][i].item(), want_mse, rel_tol=1e-5)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_vb_trains_only_the_variance_and_mse_only_eps():
    d, out, z0, z_t, tt, noise = _loss_inputs([0, 300, 999], seed=1)
    losses = d.training_losses(out, z0, z_t, tt, noise)
    (g_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :4].abs().max() == 0  # the mean path is detached
    assert torch.all(g_vb[:, 4:].flatten(1).abs().amax(1) > 0)  # every t, t = 0 included
    (g_mse,) = torch.autograd.grad(losses["mse"].sum(), out, retain_graph=True)
    torch.testing.assert_close(g_mse[:, :4], 2 * (out[:, :4] - noise) / (4 * 4 * 4))
    assert g_mse[:, 4:].abs().max() == 0
    (g_x0,) = torch.autograd.grad(losses["x0_hat"].sum(), out)
    want = -d.sqrt_recipm1_alphas_cumprod[tt].view(-1, 1, 1, 1).expand(-1, 4, 4, 4)
    torch.testing.assert_close(g_x0[:, :4], want)  # x0_hat carries gradient through eps
    assert losses["x0_hat"].dtype == torch.float32


def test_respacing_rule_and_betas():
    got = respaced_timesteps(1000, 50)
    # improved-DDPM's space_timesteps for one section: frac_stride = (size - 1) / (count - 1)
    want = [int(round(k * 999 / 49)) for k in range(50)]
    assert got == want and got[0] == 0 and got[-1] == 999 and len(set(got)) == 50
    assert respaced_timesteps(1000, 1000) == list(range(1000))
    base = Diffusion()
    sub = base.respaced(got)
    assert sub.num_steps == 50 and sub.timestep_map.tolist() == got
    kept = np.array([abar_of(t) for t in got])
    assert np.allclose(np.cumprod(1 - sub.tables64["betas"]), kept, rtol=1e-12, atol=0)
    torch.testing.assert_close(sub.alphas_cumprod, torch.tensor(kept, dtype=torch.float32))
    assert math.isclose(sub.tables64["betas"][1], 1 - abar_of(got[1]) / abar_of(got[0]))
    assert base.respaced(reversed(got)) is sub  # order does not matter; cached
    with pytest.raises(ValueError):
        respaced_timesteps(1000, 0)


def _fake_model(calls, null=99):
    # eps channel j of the conditional half holds (1 + y) * (j + 1); the unconditional half 0;
    # variance channels hold 0.1 * (1 + y) conditionally and -0.5 unconditionally
    def fn(x, t, y):
        calls.append(x.shape[0])
        cond = (y != null).float().view(-1, 1, 1, 1)
        scale = cond * (1.0 + y.float().view(-1, 1, 1, 1))
        eps = scale * torch.arange(1.0, 5.0).view(1, 4, 1, 1).expand(x.shape[0], 4, *x.shape[2:])
        var = cond * 0.1 * scale + (1 - cond) * -0.5
        return torch.cat([eps, var.expand_as(eps)], dim=1) + 0 * x.sum()
    return fn


def test_guidance_conventions():
    calls = []
    x, y, t = torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int64)
    first3 = guided_output(_fake_model(calls), x, t, y, 99, 4.0, "first3")
    every = guided_output(_fake_model(calls), x, t, y, 99, 4.0, "all")
    assert calls == [4, 4]  # [x; x] in one forward
    for i, c in enumerate((2.0, 3.0)):
        for j in range(4):
            assert torch.all(first3[i, j] == (4 * c if j < 3 else c) * (j + 1))
            assert torch.all(every[i, j] == 4 * c * (j + 1))
        assert torch.all(first3[i, 4:] == 0.1 * c) and torch.all(every[i, 4:] == 0.1 * c)
    plain = guided_output(_fake_model(calls), x, t, y, 99, 1.0, "first3")
    assert calls[-1] == 2 and torch.all(plain[:, 0] == torch.tensor([2.0, 3.0]).view(2, 1, 1))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_calls_one_batched_forward_per_step(sampler):
    calls = []
    kw = dict(latent_shape=(4, 2, 2), null_label=99, steps=7, sampler=sampler,
              seeds=[1, 2, 3])
    z = sample(_fake_model(calls), torch.tensor([0, 1, 2]), guidance_scale=2.0, **kw)
    assert calls == [6] * 7 and z.shape == (3, 4, 2, 2) and z.dtype == torch.float32
    calls.clear()
    sample(_fake_model(calls), torch.tensor([0, 1, 2]), guidance_scale=1.0, **kw)
    assert calls == [3] * 7


def test_guidance_interval_guides_only_inside_it():
    seen = []

    def model(x, t, y):  # records (batch, original timestep) of every forward
        seen.append((x.shape[0], int(t[0])))
        return _elementwise(x, t, y)

    labels = torch.tensor([0, 1, 2])
    kw = dict(latent_shape=(4, 2, 2), null_label=99, steps=10, sampler="ddpm", seeds=[1, 2, 3],
              guidance_scale=3.0)
    sample(model, labels, guidance_interval=(200, 600), **kw)
    visited = [t for _, t in seen]
    assert visited == sorted(respaced_timesteps(1000, 10), reverse=True)
    assert [b for b, _ in seen] == [6 if 200 <= t <= 600 else 3 for t in visited]
    assert 0 < sum(b == 6 for b, _ in seen) < 10
    # The whole range is plain guidance; a range that holds no step is no guidance at all.
    full = sample(_elementwise, labels, guidance_interval=(0, 999), **kw)
    assert torch.equal(full, sample(_elementwise, labels, **kw))
    none = sample(_elementwise, labels, guidance_interval=(2000, 3000), **kw)
    assert torch.equal(none, sample(_elementwise, labels, **{**kw, "guidance_scale": 1.0}))


def _elementwise(x, t, y):  # batch-invariant: the seeds alone decide the result
    return torch.cat([torch.tanh(x + y.view(-1, 1, 1, 1)), torch.sin(x + t.view(-1, 1, 1, 1))], 1)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_per_image_seeds_make_the_set_batch_size_independent(sampler, eta):
    jobs = [(c, i) for c in (0, 3, 7) for i in range(2)]
    labels = torch.tensor([c for c, _ in jobs])
    seeds = [image_seed(5, c, i) for c, i in jobs]
    kw = dict(latent_shape=(4, 8, 8), null_label=10, steps=5, sampler=sampler, eta=eta)
    for model, exact in ((_elementwise, True), (tiny_dit(classes=11), False)):
        runs = [torch.cat([sample(model, labels[k:k + n], seeds=seeds[k:k + n], **kw)
                           for k in range(0, 6, n)]) for n in (6, 3, 1)]
        for other in runs[1:]:
            if exact:
                assert torch.equal(runs[0], other)
            else:
                # a real network's batched matmuls round differently per batch size (~1e-7 per
                # forward, then amplified by 1/sqrt(abar)); the noise is identical, so the sets
                # agree up to that rounding
                torch.testing.assert_close(runs[0], other, rtol=1e-4, atol=1e-3)
        assert not torch.equal(runs[0][0], runs[0][1])


def test_image_seed_is_stable_and_distinct():
    seeds = {image_seed(b, c, i) for b in (0, 1) for c in range(10) for i in range(10)}
    assert len(seeds) == 200 and all(0 <= s < 2 ** 63 for s in seeds)
    assert image_seed(5, 3, 1) != image_seed(5, 1, 3)
    # pinned: manifests record these seeds, so the hash must never change
    assert image_seed(0, 0, 0) == 374908360987256956


def test_explicit_noise_and_argument_checks():
    labels, seeds = torch.tensor([1, 2]), [11, 12]
    noise = torch.stack([torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    kw = dict(latent_shape=(4, 2, 2), null_label=99, steps=4, sampler="ddim")
    assert torch.equal(sample(_elementwise, labels, noise=noise, **kw),
                       sample(_elementwise, labels, seeds=seeds, **kw))
    with pytest.raises(ValueError):  # ancestral steps need per-image generators
        sample(_elementwise, labels, noise=noise, **{**kw, "sampler": "ddpm"})
    with pytest.raises(ValueError):
        sample(_elementwise, labels, seeds=seeds, **{**kw, "sampler": "euler"})
    with pytest.raises(ValueError):
        sample(_elementwise, labels, seeds=seeds, guidance_channels="last", **kw)
    with pytest.raises(ValueError):
        sample(_elementwise, labels, seeds=[1], **kw)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("strength", [0.3, 0.55, 1.0])
def test_an_anchored_start_noises_the_anchor_to_the_first_visited_timestep(sampler, strength):
    labels, seeds = torch.tensor([1, 2]), [11, 12]
    anchor = torch.linspace(-1, 1, 2 * 16).reshape(2, 4, 2, 2)
    seen = []

    def point_mass(x, t, y):  # predicts the noise exactly for data that is the anchor alone
        ab = torch.tensor([abar_of(int(v)) for v in t], dtype=torch.float64).view(-1, 1, 1, 1)
        seen.append((int(t[0]), x.clone()))
        eps = (x.double() - ab.sqrt() * anchor) / (1 - ab).sqrt()
        return torch.cat([eps.float(), torch.zeros_like(x)], 1)

    z = sample(point_mass, labels, latent_shape=(4, 2, 2), null_label=99, steps=20,
               sampler=sampler, seeds=seeds, anchor=anchor, strength=strength,
               guidance_scale=1.0)
    visited = [t for t, _ in seen]
    want = [t for t in respaced_timesteps(1000, 20) if t <= strength * 999]
    assert visited == sorted(want, reverse=True)
    # The start: q(x_t0 | anchor), its noise each image's first draw from its seed.
    t0, x0 = seen[0]
    noise = torch.stack([torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    start = math.sqrt(abar_of(t0)) * anchor.double() + math.sqrt(1 - abar_of(t0)) * noise.double()
    torch.testing.assert_close(x0.double(), start, rtol=0, atol=1e-6)  # fp32 of O(1) values
    # Every step then predicts the anchor, and the last step returns it.
    torch.testing.assert_close(z, anchor, rtol=0, atol=1e-4)


def test_anchored_start_argument_checks():
    labels, seeds = torch.tensor([1, 2]), [11, 12]
    kw = dict(latent_shape=(4, 2, 2), null_label=99, steps=4, seeds=seeds)
    with pytest.raises(ValueError, match="anchor must be"):
        sample(_elementwise, labels, anchor=torch.zeros(2, 4, 2, 3), **kw)
    with pytest.raises(ValueError, match="strength must lie in"):
        sample(_elementwise, labels, anchor=torch.zeros(2, 4, 2, 2), strength=0.0, **kw)
    with pytest.raises(ValueError, match="below every sampled timestep"):
        sample(_elementwise, labels, anchor=torch.zeros(2, 4, 2, 2), strength=0.0001,
               **{**kw, "timesteps": [500, 999]})


def test_autocast_runs_the_forward_in_bf16_and_updates_in_fp32():
    seen = []
    lin = torch.nn.Linear(4, 8)

    def fn(x, t, y):
        out = lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 8, H, W)
        seen.append(out.dtype)
        return torch.tanh(out)

    kw = dict(latent_shape=(4, 2, 2), null_label=9, steps=3, seeds=[1, 2], guidance_scale=2.0)
    z16 = sample(fn, torch.tensor([0, 1]), autocast_dtype=torch.bfloat16, **kw)
    assert set(seen) == {torch.bfloat16} and z16.dtype == torch.float32
    seen.clear()
    z32 = sample(fn, torch.tensor([0, 1]), **kw)
    assert set(seen) == {torch.float32}
    # bf16 rounds the output to ~0.4 %, then 1/sqrt(abar) ~ 157 amplifies it in x0
    torch.testing.assert_close(z16, z32, rtol=5e-2, atol=1e-2)
    assert not torch.equal(z16, z32)


def test_ddpm_reproduces_diffusers_learned_range_scheduler():
    dit = tiny_dit(classes=1000)
    labels, seeds, scale = [3, 207], [21, 22], 3.0
    kept = respaced_timesteps(1000, 10)
    mine = sample(dit, torch.tensor(labels), seeds=seeds, latent_shape=(4, 8, 8),
                  null_label=1000, steps=10, sampler="ddpm", guidance_scale=scale,
                  guidance_channels="all")

    def diffusers_loop(model, dtype):
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, variance_type="learned_range", clip_sample=False)
        sched.set_timesteps(timesteps=kept[::-1])
        out_all = []
        for y, s in zip(labels, seeds, strict=True):
            gen = torch.Generator().manual_seed(s)
            lat = torch.randn((1, 4, 8, 8), generator=gen)
            for t in sched.timesteps:
                with torch.no_grad():
                    out = model(torch.cat([lat, lat]).to(dtype), timestep=t.expand(2),
                                class_labels=torch.tensor([y, 1000]), return_dict=False)[0]
                out = out.float()
                eps = out[1:, :4] + scale * (out[:1, :4] - out[1:, :4])
                lat = sched.step(torch.cat([eps, out[:1, 4:]], 1), t, lat,
                                 generator=gen).prev_sample
            out_all.append(lat)
        return torch.cat(out_all)  # (B, 4, 8, 8)

    ref = diffusers_loop(dit, torch.float32)
    # The rounding noise of this computation, measured: the same loop with the DiT evaluated in
    # float64 (then rounded to float32) is an equally valid float32 result. Ten guided steps of
    # this random DiT reach |x| ~ 1e3, so absolute differences of a few 1e-4 are float32
    # rounding (1e-7 relative), on any CPU and thread count.
    noise = (diffusers_loop(copy.deepcopy(dit).double(), torch.float64) - ref).abs().max()
    tol = 4 * noise + 8 * 2.0 ** -23 * ref.abs().max()
    err = (mine - ref).abs()
    assert err.max() <= tol, (err.max().item(), tol.item(), err.argmax().item())
    assert mine.std() > 0.1


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_reproduces_diffusers_dit_pipeline(spacing):
    dit = tiny_dit(classes=1000)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        sample_size=8).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                          beta_end=0.02, clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing=spacing)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 207, 999]
    got = pipe(class_labels=labels, guidance_scale=3.0, num_inference_steps=10,
               generator=torch.Generator().manual_seed(7), output_type="np").images
    # DiTPipeline draws all latents at once from its generator; its scheduler's timesteps
    # (leading: 900, 800, ..., 0) are not the improved-DDPM respacing, so pass them explicitly.
    noise = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    sched.set_timesteps(10)
    z = sample(dit, torch.tensor(labels), noise=noise, latent_shape=(4, 8, 8), null_label=1000,
               timesteps=sched.timesteps.tolist(), sampler="ddim", guidance_scale=3.0,
               guidance_channels="all")
    with torch.no_grad():
        mine = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    mine = mine.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(mine, got, rtol=1e-5, atol=1e-5)
    assert mine.std() > 0.01
