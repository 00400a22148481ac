"""Device-side augmentation: crop geometry, flip, jitter, lighting, CutMix, test transform,
reproducibility."""

import math

import pytest
import torch

import ddfast.eval.augment as aug

pytestmark = pytest.mark.usefixtures("one_thread")


def coordinate_image(b: int, size: int) -> torch.Tensor:
    """(B, 3, S, S): channel 0 = column, channel 1 = row, as (index + 0.5) / S, so bilinear
    sampling at source coordinate u (pixels from the left edge) reads exactly u / S."""
    pos = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    x = torch.zeros(b, 3, size, size, dtype=torch.float64)
    x[:, 0] = pos.view(1, 1, size)
    x[:, 1] = pos.view(1, size, 1)
    return x


def plain(out_size: int, *, flip=False, jitter=0.0, lighting=0.0, channels=3,
          **kw) -> aug.Augment:
    """An Augment with the chosen parts only and no normalisation."""
    return aug.Augment(out_size=out_size, flip=flip, jitter=jitter, lighting=lighting,
                       mean=(0.0,) * channels, std=(1.0,) * channels, **kw)


def identity_crop(out_size: int, **kw) -> aug.Augment:
    return plain(out_size, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), **kw)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtype_and_normalised_range(channels, dtype):
    x = torch.rand(9, channels, 20, 24, dtype=dtype)
    mean, std = aug.norm_stats(channels)
    out = aug.Augment(out_size=16, mean=mean, std=std)(x, torch.Generator().manual_seed(0))
    assert out.shape == (9, channels, 16, 16) and out.dtype == dtype
    lo = (0 - torch.tensor(mean, dtype=dtype)) / torch.tensor(std, dtype=dtype)
    hi = (1 - torch.tensor(mean, dtype=dtype)) / torch.tensor(std, dtype=dtype)
    # IDC clamps nowhere: brightness 1.4 pushes pixels past white, and [0, 1] is no bound
    assert out.isfinite().all()
    assert (out.amin((0, 2, 3)) < lo + 0.3).all() and (out.amax((0, 2, 3)) > hi - 0.3).all()
    if channels == 3:
        assert (out.amax((0, 2, 3)) > hi + 1e-3).any()
    assert aug.norm_stats(3) == (aug.IMAGENET_MEAN, aug.IMAGENET_STD)
    assert aug.norm_stats(1) == ((0.5,), (0.5,))
    with pytest.raises(ValueError):
        aug.Augment(out_size=16, mean=mean, std=std)(x.to(torch.uint8))


def test_crop_area_ratio_and_position():
    size, out_size = 256, 32
    x = coordinate_image(512, size)
    out = plain(out_size)(x, torch.Generator().manual_seed(0))  # (B, 3, 32, 32)
    # Output pixel j samples source u = left + (j + 0.5) * cw / out_size (pixels).
    k = (out_size - 1) / out_size
    cw = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) * size / k  # (B,) crop width in pixels
    ch = (out[:, 1, -1, 0] - out[:, 1, 0, 0]) * size / k
    left = out[:, 0, 0, 0] * size - 0.5 * cw / out_size
    top = out[:, 1, 0, 0] * size - 0.5 * ch / out_size
    for v in (cw, ch, left, top):  # torchvision's boxes are whole pixels
        assert (v - v.round()).abs().max() < 1e-6
    area, aspect = cw * ch / size**2, cw / ch
    tol = 0.01  # rounding the sides to pixels (>= 150 px here) moves area / aspect < 0.7 %
    assert area.min() >= 0.5 * (1 - tol) and area.max() <= 1.0 + 1e-9
    assert aspect.min() >= 0.75 * (1 - tol) and aspect.max() <= 4 / 3 * (1 + tol)
    assert (left >= -1e-6).all() and (left + cw <= size + 1e-6).all()
    assert (top >= -1e-6).all() and (top + ch <= size + 1e-6).all()
    # the samples really spread over the allowed ranges
    assert area.min() < 0.55 and area.max() > 0.95
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    assert (left > 0.5).any() and (top > 0.5).any()


def test_enlarged_crop_equals_crop_then_resize():
    """Upsampling a crop (32 px images, boxes of 16-32 px, back to 32 px) reads only the box, as
    torchvision's crop-then-resize does: the outermost samples repeat the edge pixels."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(16, 3, 32, 32, generator=g, dtype=torch.float64)
    out = plain(32)(x, torch.Generator().manual_seed(1))
    top, left, ch, cw = aug.crop_boxes(16, 32, 32, scale=(0.5, 1.0),
                                       generator=torch.Generator().manual_seed(1))
    assert (cw < 32).any()  # some crops are enlarged
    for i in range(16):
        t, lf, hh, ww = (int(v[i]) for v in (top, left, ch, cw))
        want = torch.nn.functional.interpolate(x[i:i + 1, :, t:t + hh, lf:lf + ww], size=(32, 32),
                                               mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i:i + 1], want, rtol=0, atol=1e-12)


def test_crop_fallback_is_central():
    # A 4 x 100 strip: no box with area >= 90 % fits the aspect bounds, so every image takes
    # the central crop with the aspect clamped to 4/3: 4 x round(5.33) = 4 x 5 at column 47.
    top, left, ch, cw = aug.crop_boxes(16, 4, 100, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                                       generator=torch.Generator().manual_seed(0))
    assert (ch == 4).all() and (cw == 5).all() and (top == 0).all() and (left == 47).all()


def test_flip_mirrors():
    x = torch.rand(64, 3, 16, 16)
    out = identity_crop(16, flip=True)(x, torch.Generator().manual_seed(1))
    same = (out - x).abs().amax((1, 2, 3)) < 1e-5  # (B,)
    mirrored = (out - torch.flip(x, dims=[-1])).abs().amax((1, 2, 3)) < 1e-5
    assert (same ^ mirrored).all()  # each image is exactly one of the two
    assert 0.25 < mirrored.float().mean() < 0.75
    unflipped = identity_crop(16, flip=False)(x, torch.Generator().manual_seed(1))
    assert torch.allclose(unflipped, x, atol=1e-5)


def test_brightness_factors_within_bounds():
    # On a grey constant image contrast and saturation are no-ops, so only brightness shows.
    x = torch.full((4000, 3, 4, 4), 0.5)
    out = identity_crop(4, jitter=0.4)(x, torch.Generator().manual_seed(0))
    assert out.std((1, 2, 3)).max() < 1e-6  # still one grey level per image
    level = out[:, 0, 0, 0]
    assert level.min() >= 0.5 * 0.6 - 1e-6 and level.max() <= 0.5 * 1.4 + 1e-6
    assert level.min() < 0.5 * 0.62 and level.max() > 0.5 * 1.38  # the full range is used
    assert abs(level.mean().item() - 0.5) < 0.01  # factors centred on 1


def test_jitter_ops_per_image():
    # Split each image into grey level and chroma (x - grey). Brightness scales both, contrast
    # scales the grey level about its mean and the chroma, saturation only the chroma; so in
    # any order chroma ends x (f_b f_c f_s) and the grey deviation x (f_b f_c): their ratio is
    # the saturation factor alone. Inputs stay in a narrow band, so nothing is clamped.
    g = torch.Generator().manual_seed(2)
    x = (0.45 + 0.1 * torch.rand(2000, 3, 8, 8, generator=g)).double()
    out = identity_crop(8, jitter=0.4)(x, g)
    assert out.min() > 0 and out.max() < 1

    def parts(im):
        grey = (im * torch.tensor(aug._LUMA, dtype=im.dtype).view(1, 3, 1, 1)).sum(1, True)
        chroma = (im - grey).std((1, 2, 3))
        spread = (grey - grey.mean((2, 3), keepdim=True)).std((1, 2, 3))
        return chroma, spread  # (B,), (B,)

    (c_in, s_in), (c_out, s_out) = parts(x), parts(out)
    sat = (c_out / c_in) / (s_out / s_in)  # (B,) the saturation factors
    bri_con = s_out / s_in  # (B,) brightness x contrast factors
    assert sat.min() > 0.6 - 1e-6 and sat.max() < 1.4 + 1e-6
    assert sat.min() < 0.62 and sat.max() > 1.38
    assert bri_con.min() > 0.36 - 1e-6 and bri_con.max() < 1.96 + 1e-6
    assert bri_con.min() < 0.45 and bri_con.max() > 1.7
    one = identity_crop(8, jitter=0.4, channels=1)(x[:, :1], g)
    assert one.shape == (2000, 1, 8, 8) and not torch.allclose(one, x[:, :1])


def test_lighting_statistics():
    n = 4000
    x = torch.full((n, 3, 2, 2), 0.5, dtype=torch.float64)
    out = identity_crop(2, lighting=0.1)(x, torch.Generator().manual_seed(0))
    shift = out[:, :, 0, 0] - 0.5  # (B, 3)
    assert (out - out[:, :, :1, :1]).abs().max() < 1e-12  # one shift per image
    vec = torch.tensor(aug.IMAGENET_EIGVEC, dtype=torch.float64)
    val = torch.tensor(aug.IMAGENET_EIGVAL, dtype=torch.float64)
    coeff = shift @ vec  # (B, 3): back in the eigenbasis, alpha_k * eigval_k
    ratio = coeff.std(0) / val
    assert torch.allclose(ratio, torch.full((3,), 0.1, dtype=torch.float64), rtol=0.1), ratio
    assert (coeff.mean(0).abs() < 4 * 0.1 * val / math.sqrt(n)).all()
    grey = identity_crop(2, lighting=0.1, channels=1)(x[:, :1], torch.Generator().manual_seed(0))
    assert torch.equal(grey, x[:, :1])  # lighting is RGB-only


def test_reproducible_with_generator():
    x = torch.rand(8, 3, 20, 24)
    mean, std = aug.norm_stats(3)
    a = aug.Augment(out_size=16, mean=mean, std=std)
    o1 = a(x, torch.Generator().manual_seed(3))
    o2 = a(x, torch.Generator().manual_seed(3))
    o3 = a(x, torch.Generator().manual_seed(4))
    assert torch.equal(o1, o2) and not torch.allclose(o1, o3)
    assert a(x).shape == o1.shape  # the global generator works too
    y = torch.arange(8)
    c1 = aug.cutmix(x, y, generator=torch.Generator().manual_seed(5))
    c2 = aug.cutmix(x, y, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(c1, c2, strict=True))


def test_cutmix_box_labels_and_lambda():
    g = torch.Generator().manual_seed(0)
    seen = 0
    for _ in range(40):
        b, h, w = 6, 10, 12
        x = torch.rand(b, 2, h, w)
        y = torch.randint(0, 100, (b,))
        mixed, ya, yb, lam = aug.cutmix(x, y, alpha=1.0, generator=g)
        assert mixed.shape == x.shape and lam.ndim == 0 and torch.equal(ya, y)
        box = (mixed != x).any(1).any(0)  # (H, W): where any image changed
        if not box.any():  # an empty box (lam = 1) or the identity permutation
            assert torch.equal(mixed, x)
            continue
        seen += 1
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :])  # one rectangle
        perm = []
        for i in range(b):  # which image was pasted into image i
            match = [j for j in range(b) if torch.equal(mixed[i][:, box], x[j][:, box])]
            assert len(match) == 1
            perm.append(match[0])
            assert torch.equal(mixed[i][:, ~box], x[i][:, ~box])
        assert sorted(perm) == list(range(b))
        assert torch.equal(yb, y[torch.tensor(perm)])
        assert math.isclose(lam.item(), 1 - box.sum().item() / (h * w), abs_tol=1e-6)
    assert seen >= 25


def test_beta_draws():
    g = torch.Generator().manual_seed(0)
    for alpha in (1.0, 0.5):
        lam = torch.stack([aug.sample_beta(alpha, generator=g) for _ in range(3000)])
        var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
        assert abs(lam.mean().item() - 0.5) < 0.03
        assert abs(lam.var().item() - var) < 0.15 * var
        assert lam.min() >= 0 and lam.max() <= 1
    with pytest.raises(ValueError):
        aug.sample_beta(0.0)


def test_test_transform_resize_and_centre_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 30, 40, generator=g)
    out = aug.test_transform(x, out_size=30, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (2, 3, 30, 30) and torch.equal(out, x[..., 5:35])
    noise = torch.rand(2, 3, 60, 90, generator=g)
    down = aug.test_transform(noise, out_size=30, mean=(0, 0, 0), std=(1, 1, 1))
    assert down.shape == (2, 3, 30, 30)
    # antialiased: each output pixel averages several inputs, so noise shrinks (bilinear
    # without antialias would keep it)
    assert down.std() < 0.7 * noise.std()
    # a smooth image resized 2x down and centre-cropped: 45 -> 30 columns from column 8
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 9, generator=g), size=(60, 90),
                                             mode="bilinear", align_corners=False)
    down = aug.test_transform(smooth, out_size=30, mean=(0, 0, 0), std=(1, 1, 1))
    centre = torch.nn.functional.avg_pool2d(smooth, 2)[..., 8:38]  # (2, 3, 30, 30)
    # (the antialias filter spans 4 inputs, not 2: they differ slightly where the ramps bend)
    assert (down - centre).abs().mean() < 0.004
    shifted = torch.nn.functional.avg_pool2d(smooth, 2)[..., 7:37]  # off by one column
    assert (down - shifted).abs().mean() > 0.01
    up = aug.test_transform(torch.full((1, 1, 8, 8), 0.75), out_size=32, mean=(0.5,), std=(0.5,))
    assert up.shape == (1, 1, 32, 32) and torch.allclose(up, torch.full_like(up, 0.5))


def test_jitter_ops_commute_without_clamps():
    # Why Augment applies a fixed order: without intermediate clamps every order is the same.
    import itertools

    x = torch.rand(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fb, fc, fs = 0.7, 1.3, 0.8
    ops = [lambda v: fb * v,
           lambda v: fc * v + (1 - fc) * aug._gray(v).mean((2, 3), keepdim=True),
           lambda v: fs * v + (1 - fs) * aug._gray(v)]
    outs = []
    for order in itertools.permutations(ops):
        v = x
        for op in order:
            v = op(v)
        outs.append(v)
    assert all(torch.allclose(o, outs[0], atol=1e-12) for o in outs)
