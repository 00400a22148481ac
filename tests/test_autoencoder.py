"""The autoencoder trained here (ddfast.autoencoder) and a run that trains it before its DiT."""

import json
import math
from dataclasses import replace

import pytest
import torch

from ddfast.autoencoder import (
    VaeSpec,
    fit_scaling_factor,
    posterior_means,
    reconstruct,
    reconstruction_error,
    save_vae,
    step_lr,
    train_vae,
)
from ddfast.config import resolve
from ddfast.data import open_source
from ddfast.data.cache import to_model_range
from ddfast.errors import ConfigError, OutputError
from ddfast.models import build_vae, load_vae
from ddfast.train import run, vae_trained_here


@pytest.fixture(scope="module")
def digits():
    train, test = open_source("digits", "train"), open_source("digits", "test")
    return train.images(range(len(train))), test.images(range(len(test)))  # uint8 (N, 1, 8, 8)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    vae = build_vae("small-f4", in_channels=1, sample_size=8)
    spec = VaeSpec(steps=300, batch_size=64, lr=2e-3, kl_weight=1e-6, seed=0, log_every=50)
    last = train_vae(vae, digits[0], spec)
    return vae, last


def test_the_round_trip_beats_the_mean_image_on_unseen_digits(digits, trained):
    """On the test split, the trained round trip must reconstruct far better than the best
    constant image (the training mean), and an untrained autoencoder must not."""
    train_x, test_x = digits
    vae, last = trained
    mean_image = to_model_range(train_x).mean(0)  # (1, 8, 8)
    baseline = (to_model_range(test_x) - mean_image).pow(2).mean().item()
    got = reconstruction_error(vae, test_x)
    assert got["images"] == len(test_x)
    assert got["mse"] < 0.35 * baseline, (got, baseline)
    assert got["psnr"] == pytest.approx(10 * math.log10(4.0 / got["mse"]), rel=1e-9)
    assert last["mse"] < 0.35 * baseline
    torch.manual_seed(0)
    fresh = build_vae("small-f4", in_channels=1, sample_size=8)
    assert reconstruction_error(fresh, test_x)["mse"] > 0.8 * baseline


@pytest.mark.parametrize("preset,channels", [("small-f4", 4), ("small-f4-c8", 8)])
def test_a_factor_4_preset_maps_28_px_to_7x7_latents_of_its_channels(preset, channels):
    torch.manual_seed(0)
    vae = build_vae(preset, in_channels=1, sample_size=28).eval()
    x = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert z.shape == (2, channels, 7, 7)
        assert vae.decode(z).sample.shape == x.shape


def test_scaling_factor_gives_unit_latent_std(digits, trained):
    vae, _ = trained
    scale = fit_scaling_factor(vae, digits[0])
    assert vae.config.scaling_factor == scale
    z = posterior_means(vae, digits[0]) * scale  # (N, 4, 2, 2)
    assert z.shape == (len(digits[0]), 4, 2, 2)
    # 1/std then std of the product: equal to 1 up to float32 rounding over N*16 elements
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)


def test_training_is_a_function_of_the_seed(digits):
    def once(seed):
        torch.manual_seed(0)
        vae = build_vae("small-f4", in_channels=1, sample_size=8)
        train_vae(vae, digits[0][:200], VaeSpec(steps=5, batch_size=16, lr=1e-3,
                                                 kl_weight=1e-6, seed=seed, hflip=True))
        return vae.state_dict()

    a, b, c = once(3), once(3), once(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cosine_decay_falls_from_the_rate_toward_zero_and_changes_the_model(digits):
    spec = VaeSpec(steps=100, batch_size=16, lr=2e-3, kl_weight=1e-6, seed=0, decay="cosine")
    assert step_lr(spec, 1) == 2e-3
    assert step_lr(spec, 51) == pytest.approx(1e-3, rel=1e-12)  # half way: half the rate
    assert 0 < step_lr(spec, 100) < 2e-3 * 1e-3  # 0.5 * (1 + cos(0.99 pi)) = 2.5e-4
    assert all(step_lr(spec, i) > step_lr(spec, i + 1) for i in range(1, 100))
    assert {step_lr(replace(spec, decay="constant"), i) for i in (1, 50, 100)} == {2e-3}

    def once(decay, steps):
        torch.manual_seed(0)
        vae = build_vae("small-f4", in_channels=1, sample_size=8)
        train_vae(vae, digits[0][:200], VaeSpec(steps=steps, batch_size=16, lr=1e-3,
                                                 kl_weight=1e-6, seed=0, decay=decay))
        return vae.state_dict()

    # The first step runs at the full rate under both; by the third the rates differ.
    a, b = once("constant", 1), once("cosine", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = once("constant", 3), once("cosine", 3)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_training_again_replaces_the_autoencoders_log_lines_and_keeps_the_others(digits,
                                                                               tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    other = {"stage": "data", "seconds": 1.0}
    stale = {"stage": "vae", "step": 2, "mse": 9.0, "kl": 9.0}  # a killed first try's
    metrics.write_text(json.dumps(other) + "\n" + json.dumps(stale) + "\n")
    torch.manual_seed(0)
    vae = build_vae("small-f4", in_channels=1, sample_size=8)
    train_vae(vae, digits[0][:100], VaeSpec(steps=4, batch_size=8, lr=1e-3, kl_weight=1e-6,
                                            seed=0, log_every=2), metrics_path=metrics)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[0] == other
    assert [r["step"] for r in rows[1:]] == [2, 4] and all(r["stage"] == "vae" for r in rows[1:])
    assert rows[1]["mse"] != 9.0


def test_bad_arguments_and_an_existing_folder_are_refused(digits, trained, tmp_path):
    vae, _ = trained
    with pytest.raises(ConfigError, match="pretrain.vae_steps"):
        train_vae(vae, digits[0], VaeSpec(0, 8, 1e-3, 1e-6, 0))
    with pytest.raises(ConfigError, match="pretrain.vae_decay"):
        train_vae(vae, digits[0], VaeSpec(1, 8, 1e-3, 1e-6, 0, decay="linear"))
    with pytest.raises(ConfigError, match="uint8"):
        train_vae(vae, digits[0].float(), VaeSpec(1, 8, 1e-3, 1e-6, 0))
    save_vae(tmp_path / "vae", vae)
    back = load_vae(tmp_path / "vae")
    assert torch.equal(reconstruct(back, digits[1][:20]), reconstruct(vae, digits[1][:20]))
    with pytest.raises(OutputError, match="exists"):
        save_vae(tmp_path / "vae", vae)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_trains_its_autoencoder_first_and_resumes_without_retraining(tmp_path):
    over = {"run.out": str(tmp_path / "a"), "run.progress": "off", "model.vae": "small-f4",
            "model.patch_size": "1", "pretrain.vae_steps": "40", "data.holdout": "5",
            "data.cache_dir": str(tmp_path / "cache"), "eval.enabled": "false"}
    cfg = resolve("smoke", over)
    assert vae_trained_here(cfg)
    summary = run(cfg)
    out = tmp_path / "a"
    report = json.loads((out / "vae.json").read_text())
    assert summary["vae"] == report and "vae" not in summary["reused"]
    # the autoencoder's time is its own stage, not the data's
    seconds = [r["seconds"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                         .splitlines()) if r["stage"] == "vae"]
    assert summary["timings_s"]["vae"] >= seconds[-1]
    # reading 1,800 digits takes a small fraction of 40 training steps, a scaling pass and a
    # held-out round trip; counted inside the data's time, the VAE's would exceed it
    assert summary["timings_s"]["data"] < summary["timings_s"]["vae"]
    assert report["latent_shape"] == [4, 2, 2] and report["preset"] == "small-f4"
    assert report["held_out_reconstruction"]["images"] == 5 * 10
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "vae"] == [10, 20, 30, 40]
    # the DiT's pipeline carries the autoencoder its latents came from
    vae = load_vae(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-6)
    piped = load_vae(out / "pretrained")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(),
                                                 piped.state_dict().values(), strict=True))
    # a DiT folder with model.vae a preset reads the autoencoder trained with it
    follow = resolve("smoke", {**over, "run.out": str(tmp_path / "b"),
                               "model.dit": str(out / "pretrained"), "objective.method": "dit"})
    assert not vae_trained_here(follow)
    run(follow)
    assert not (tmp_path / "b" / "vae").exists()
    # a finished run resumed: the autoencoder is read back, not trained again
    before = (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    again = run(cfg, resume=True)
    assert "vae" in again["reused"]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_a_vae_preset_without_a_dit_to_train_with_is_refused(tmp_path):
    cfg = resolve("smoke", {"run.out": str(tmp_path / "a"), "model.vae": "small-f4",
                            "model.dit": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="architecture to train here"):
        run(cfg)
    assert not (tmp_path / "a").exists()
