"""The latent cache: encoded once, reused on the next run, drawn on the device."""

import torch
from diffusers import AutoencoderKL

from ddfast.data import cache as cache_mod
from ddfast.data import open_source
from ddfast.data.cache import build_latents, encode_images, to_model_range


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=1, out_channels=1,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
                         scaling_factor=0.5).eval()


def digits_subset():
    source = open_source("digits", "train")
    return source, torch.arange(0, 60, 3)


def test_pixel_space_latents_are_the_images(tmp_path):
    source, idx = digits_subset()
    lat = build_latents(source, None, indices=idx, cache_dir=tmp_path)
    assert lat.mean is None and lat.images.dtype == torch.uint8
    assert torch.equal(lat.labels, source.labels[idx])
    gen = torch.Generator().manual_seed(0)
    z = lat.draw(torch.arange(len(idx)), gen)
    want = to_model_range(source.images(idx))
    # each drawn latent is the image or its mirror image, and both occur
    same = (z == want).flatten(1).all(1)
    mirrored = (z == want.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool(mirrored.any()) and not bool(mirrored.all())
    assert list(tmp_path.iterdir()) == []  # pixel space stores nothing on disk


def test_vae_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    source, idx = digits_subset()
    vae = tiny_vae()
    calls = []
    real_encode = cache_mod.encode_images
    monkeypatch.setattr(cache_mod, "encode_images",
                        lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    first = build_latents(source, vae, indices=idx, cache_dir=tmp_path, batch_size=8)
    n_first = len(calls)
    assert n_first == 3  # 20 images in batches of 8
    files = list(tmp_path.glob("latents-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    second = build_latents(source, vae, indices=idx, cache_dir=tmp_path, batch_size=8)
    assert len(calls) == n_first, "the second run encoded again instead of using the cache"
    assert torch.equal(first.mean, second.mean) and torch.equal(first.std, second.std)
    assert first.key == second.key

    # the stored mean/std are the VAE posterior of the image and of its flip
    mean, std = encode_images(vae, source.images(idx[:4]), torch.device("cpu"))
    torch.testing.assert_close(first.mean[:4], mean)
    x = to_model_range(source.images(idx[:4])).flip(-1)
    with torch.no_grad():
        flip_mean = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(first.mean[:4, 1], flip_mean, rtol=1e-5, atol=1e-5)
    assert first.mean.shape == (20, 2, 4, 4, 4) and first.scale == 0.5


def test_cache_key_changes_with_vae_weights_and_selection(tmp_path):
    source, idx = digits_subset()
    a = build_latents(source, tiny_vae(0), indices=idx, cache_dir=tmp_path)
    b = build_latents(source, tiny_vae(1), indices=idx, cache_dir=tmp_path)
    c = build_latents(source, tiny_vae(0), indices=idx[:10], cache_dir=tmp_path)
    assert len({a.key, b.key, c.key}) == 3
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 3


def test_draw_uses_mean_std_and_scale(tmp_path):
    source, idx = digits_subset()
    lat = build_latents(source, tiny_vae(), indices=idx, cache_dir=tmp_path)
    gen = torch.Generator().manual_seed(3)
    pick = torch.tensor([0, 5, 7])
    z = lat.draw(pick, gen)
    # replay the generator: flips first, then the noise
    gen2 = torch.Generator().manual_seed(3)
    flip = torch.randint(0, 2, (3,), generator=gen2)
    eps = torch.randn((3, 4, 4, 4), generator=gen2)
    want = (lat.mean[pick, flip] + lat.std[pick, flip] * eps) * 0.5
    torch.testing.assert_close(z, want)


def test_damaged_cache_file_is_rebuilt(tmp_path):
    source, idx = digits_subset()
    vae = tiny_vae()
    first = build_latents(source, vae, indices=idx, cache_dir=tmp_path)
    (path,) = tmp_path.glob("latents-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    again = build_latents(source, vae, indices=idx, cache_dir=tmp_path)
    assert torch.equal(first.mean, again.mean)
    assert path.stat().st_size > 100


def test_flip_can_be_switched_off(tmp_path):
    source, idx = digits_subset()
    lat = build_latents(source, None, indices=idx, cache_dir=tmp_path, hflip=False)
    z = lat.draw(torch.arange(len(idx)), torch.Generator().manual_seed(0))
    assert torch.equal(z, to_model_range(source.images(idx)))
