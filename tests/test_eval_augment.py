"""Device-side augmentation: crop geometry, flip, jitter, lighting, CutMix, reproducibility."""

import math

import torch

import ddfast.eval.augment as aug


def coordinate_image(b: int, size: int) -> torch.Tensor:
    """Channel 0 encodes the column, channel 1 the row (values in [0, 1])."""
    cols = (torch.arange(size).float() + 0.5) / size
    x = torch.zeros(b, 3, size, size)
    x[:, 0] = cols.view(1, 1, size)
    x[:, 1] = cols.view(1, size, 1)
    return x


def plain(out_size: int, flip=False) -> aug.Augment:
    return aug.Augment(out_size=out_size, flip=flip, jitter=0.0, lighting=0.0,
                       mean=(0, 0, 0), std=(1, 1, 1))


def test_crop_area_and_ratio_within_bounds():
    x = coordinate_image(256, 64)
    out = plain(32)(x, torch.Generator().manual_seed(0))
    assert out.shape == (256, 3, 32, 32)
    # the crop's extent in source coordinates, read off the corner pixels
    width = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) * 32 / 31  # fraction of the image width
    height = (out[:, 1, -1, 0] - out[:, 1, 0, 0]) * 32 / 31
    area, ratio = width * height, width / height
    assert area.min() > 0.45 and area.max() < 1.02
    assert ratio.min() > 0.70 and ratio.max() < 1.40
    assert area.std() > 0.05  # the scale really varies


def test_flip_mirrors():
    x = coordinate_image(64, 16)
    g = torch.Generator().manual_seed(1)
    out = plain(16, flip=True)(x, g)
    slope = out[:, 0, 8, -1] - out[:, 0, 8, 0]
    assert (slope < 0).any() and (slope > 0).any()
    assert 0.3 < (slope < 0).float().mean() < 0.7


def test_jitter_bounds_and_lighting_statistics():
    x = torch.full((512, 3, 4, 4), 0.5)
    a = aug.Augment(out_size=4, flip=False, jitter=0.4, lighting=0.0, crop_scale=(1.0, 1.0),
                    ratio=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    out = a(x, torch.Generator().manual_seed(0))
    assert out.min() >= 0.5 * 0.6 - 1e-6 and out.max() <= 0.5 * 1.4 + 1e-6
    assert out.std() > 0.02
    lit = aug.Augment(out_size=4, flip=False, jitter=0.0, lighting=0.1, crop_scale=(1.0, 1.0),
                      ratio=(1.0, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    shift = lit(x, torch.Generator().manual_seed(0))[:, :, 0, 0] - 0.5  # (B, 3)
    vec = torch.tensor(aug._EIGVEC)
    coeff = shift @ vec  # back into the eigenbasis: alpha_k * eigval_k
    std = coeff.std(0) / torch.tensor(aug._EIGVAL)
    assert torch.allclose(std, torch.full((3,), 0.1), rtol=0.2), std


def test_reproducible_and_normalised():
    x = torch.rand(8, 3, 20, 24)
    mean, std = aug.norm_stats(3)
    a = aug.Augment(out_size=16, mean=mean, std=std)
    o1 = a(x, torch.Generator().manual_seed(3))
    o2 = a(x, torch.Generator().manual_seed(3))
    o3 = a(x, torch.Generator().manual_seed(4))
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    lo = (0 - torch.tensor(mean)) / torch.tensor(std) - 0.5
    hi = (1 - torch.tensor(mean)) / torch.tensor(std) + 0.5
    assert (o1.amin((0, 2, 3)) >= lo).all() and (o1.amax((0, 2, 3)) <= hi).all()
    assert aug.norm_stats(1) == ((0.5,), (0.5,))


def test_cutmix_box_labels_and_lambda():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.rand(6, 1, 10, 12)
        y = torch.arange(6)
        mixed, ya, yb, lam = aug.cutmix(x, y, alpha=1.0, generator=g)
        from_perm = (mixed != x).any(1)  # (B, H, W): where the batch differs
        perm = yb  # y is arange, so y[perm] is the permutation itself
        inside = torch.zeros(10, 12, dtype=torch.bool)
        for i in range(6):
            if perm[i] != i:
                inside |= from_perm[i]
        for i in range(6):
            assert torch.equal(mixed[i][:, inside], x[perm[i]][:, inside])
            assert torch.equal(mixed[i][:, ~inside], x[i][:, ~inside])
        assert torch.equal(ya, y)
        assert math.isclose(lam.item(), 1 - inside.float().mean().item(), abs_tol=1e-6)


def test_test_transform_centre_crop():
    x = torch.rand(2, 3, 30, 40)
    out = aug.test_transform(x, out_size=30, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (2, 3, 30, 30)
    assert torch.allclose(out, x[..., 5:35])
