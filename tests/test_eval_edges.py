"""Edge strength, and sets moved to another set's edge strength, on real images."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from ddfast.data import open_source
from ddfast.eval.edges import blur, blur_to, edge_strength, gaussian_blur, sharpen_to, unsharp
from ddfast.eval.protocol import load_source_set


@pytest.fixture(scope="module")
def images():
    """The first ten Fashion-MNIST training images of each class, uint8 (100, 1, 28, 28)."""
    x, _, _ = load_source_set(open_source("fashion-mnist", "train"), 10)
    assert x.dtype == torch.uint8 and x.shape == (100, 1, 28, 28)
    return x


def test_edge_strength_of_a_step_is_its_height_over_the_neighbour_pairs():
    img = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    img[..., 2:] = 100  # one vertical edge of 100 in each row: 1 of a row's 3 pairs
    assert edge_strength(img) == pytest.approx(100 / 3)
    assert edge_strength(img.transpose(2, 3)) == pytest.approx(100 / 3)
    assert edge_strength(torch.full((2, 1, 5, 5), 7, dtype=torch.uint8)) == 0


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_blur_is_scipys_with_edges_replicated(images, sigma):
    """scipy truncates at int(3 sigma + 0.5) pixels, as ceil(3 sigma) here for these sigmas."""
    got = gaussian_blur(images, sigma).numpy()
    want = np.stack([ndimage.gaussian_filter(im[0].astype(np.float64), sigma, mode="nearest",
                                             truncate=3.0)[None] for im in images.numpy()])
    # float32 taps and sums of at most 13 x 13 products of values up to 255
    assert np.abs(got - want).max() < 255 * 1e-5


def test_sharpening_and_blurring_move_real_images_to_a_target_strength(images):
    start = edge_strength(images)
    assert torch.equal(unsharp(images, 0.0), images)
    up, amount = sharpen_to(images, start * 1.15)
    down, sigma = blur_to(images, start * 0.85)
    assert amount > 0 and sigma > 0
    # uint8 rounding makes the strength a step function of the parameter: the bisection ends
    # at a step, where one pixel moving one grey level shifts the mean by 2 / (100 * 28 * 27)
    assert edge_strength(up) == pytest.approx(start * 1.15, abs=0.01)
    assert edge_strength(down) == pytest.approx(start * 0.85, abs=0.01)
    assert torch.equal(down, blur(images, sigma))
    # A blur keeps each image's mean, up to rounding and the replicated border. A sharpening
    # would too, but its undershoot beside bright items on a black ground is clipped at 0.
    mean = images.float().mean((1, 2, 3))
    assert (down.float().mean((1, 2, 3)) - mean).abs().max() < 0.5
    assert (up.float().mean((1, 2, 3)) - mean).min() > -0.5
    assert (up.float() - images.float()).abs().mean() > 1
