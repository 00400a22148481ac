"""Generator quality measures against brute-force loops and closed forms."""

import pytest
import torch

import ddfast.eval.quality as Q


def _dist(a, b):
    return float((a.double() - b.double()).norm())


def _radius_loop(f, i, k):
    return sorted(_dist(f[i], f[j]) for j in range(f.shape[0]) if j != i)[k - 1]


def _prc_loop(real, fake, k):
    r_real = [_radius_loop(real, i, k) for i in range(real.shape[0])]
    r_fake = [_radius_loop(fake, j, k) for j in range(fake.shape[0])]
    precision = sum(any(_dist(f, real[i]) <= r_real[i] for i in range(real.shape[0]))
                    for f in fake) / fake.shape[0]
    recall = sum(any(_dist(r, fake[j]) <= r_fake[j] for j in range(fake.shape[0]))
                 for r in real) / real.shape[0]
    coverage = sum(min(_dist(real[i], f) for f in fake) <= r_real[i]
                   for i in range(real.shape[0])) / real.shape[0]
    return precision, recall, coverage


@pytest.mark.parametrize("block", [2048, 7])  # 7: several blocks, one ragged
def test_precision_recall_coverage_match_loops(monkeypatch, block):
    monkeypatch.setattr(Q, "BLOCK", block)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 3, generator=g)
    fake = 0.7 * torch.randn(25, 3, generator=g) + 0.5  # overlaps real, narrower and shifted
    out = Q.precision_recall_coverage(real, fake, k=3)
    want = _prc_loop(real, fake, 3)
    assert (out["precision"], out["recall"], out["coverage"]) == pytest.approx(want, abs=1e-12)
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1  # the case separates the three
    radii = Q.knn_radii(real, 3)
    assert radii.tolist() == pytest.approx([_radius_loop(real, i, 3) for i in range(40)])


def test_precision_recall_coverage_bounds():
    real = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    same = Q.precision_recall_coverage(real, real.clone())
    assert (same["precision"], same["recall"], same["coverage"]) == (1.0, 1.0, 1.0)
    far = Q.precision_recall_coverage(real, real + 1e3)
    assert (far["precision"], far["recall"], far["coverage"]) == (0.0, 0.0, 0.0)
    # One mode repeated: every copy is real-looking (precision 1), the set covers little.
    mode = Q.precision_recall_coverage(real, real[:1].repeat(10, 1))
    assert mode["precision"] == 1.0 and mode["coverage"] < 0.5


def _fd_reference(a, b):
    """The usual formula, tr((S_a S_b)^1/2) from the eigenvalues of the non-symmetric product."""
    a, b = a.double(), b.double()
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    lam = torch.linalg.eigvals(s_a @ s_b)
    cross = lam.sqrt().real.sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


def test_frechet_distance_matches_the_usual_formula_and_closed_forms():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(150, 6, generator=g) * torch.linspace(0.5, 2.0, 6) + 1.0
    fd = Q.frechet_distance(a, b)
    ref = _fd_reference(a, b)
    assert fd == pytest.approx(ref, rel=1e-9)
    # A shift by c moves only the means: FD = |c|^2 exactly.
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], dtype=torch.float64)
    assert Q.frechet_distance(a.double(), a.double() + c) == pytest.approx(float(c @ c), rel=1e-9)
    # A scale by s: S_b = s^2 S_a, so the trace term is (1 - s)^2 tr(S_a), means scale too.
    s = 3.0
    ad = a.double()
    want = float(((1 - s) * ad.mean(0)).square().sum() + (1 - s) ** 2 * torch.cov(ad.T).trace())
    assert Q.frechet_distance(ad, s * ad) == pytest.approx(want, rel=1e-9)
    assert Q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * float(torch.cov(ad.T).trace()))


def test_frechet_distance_with_fewer_items_than_features_stays_finite():
    # Features of 2048 from 100 images: rank-deficient covariances, as in the study.
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 64, generator=g), torch.randn(30, 64, generator=g)
    fd = Q.frechet_distance(a, b)
    assert fd == pytest.approx(_fd_reference(a, b), rel=1e-6)


class _Pick(torch.nn.Module):
    """Logits = the image's pixels: predicts the brightest pixel's index."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.flatten(1) + 0 * self.w


def test_fidelity_counts_agreeing_labels():
    x = torch.zeros(5, 1, 2, 2)
    hot = [0, 3, 1, 1, 2]
    for i, h in enumerate(hot):
        x[i].view(-1)[h] = 1.0
    y = torch.tensor([0, 3, 2, 1, 0])  # 3 of 5 agree
    assert Q.fidelity(_Pick(), x, y, batch_size=2) == pytest.approx(60.0)


def test_bad_features_are_named():
    real = torch.randn(10, 3)
    with pytest.raises(ValueError, match="feature sizes differ"):
        Q.precision_recall_coverage(real, torch.randn(10, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        Q.frechet_distance(real, torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match="more than k=5"):
        Q.precision_recall_coverage(real, real[:5])
    with pytest.raises(ValueError, match="one label per image"):
        Q.fidelity(_Pick(), torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long))


def test_class_means_match_a_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (9000, 1, 4, 4), generator=g, dtype=torch.uint8)  # 3 chunks
    y = torch.randint(0, 3, (9000,), generator=g)
    m = Q.class_means(x, y, 4)
    for c in range(3):
        assert torch.allclose(m[c], x[y == c].double().mean(0), rtol=0, atol=1e-9)
    assert torch.isnan(m[3]).all()  # no images of class 3


def test_mirror_agreement_on_fashion_mnist_shoes():
    """Fashion-MNIST's shoes face one way: the test split agrees with the training split's class
    means, its mirror images disagree, and a half-mirrored set sits near one half."""
    from ddfast.data.sources import open_source

    try:
        train, test = open_source("fashion-mnist", "train"), open_source("fashion-mnist", "test")
    except Exception as exc:  # the data is part of the test environment (.ci/run installs it)
        pytest.fail(f"Fashion-MNIST is needed: {exc}")
    means = Q.class_means(train.images(range(len(train))), train.labels, 10)
    shoes = (test.labels == 5) | (test.labels == 7) | (test.labels == 9)  # sandal, sneaker, boot
    idx = torch.nonzero(shoes).flatten()[:600]
    x, y = test.images(idx), test.labels[idx]
    real = Q.mirror_agreement(x, y, means)
    assert set(real) == {5, 7, 9} and min(real.values()) > 0.9
    mirrored = Q.mirror_agreement(x.flip(-1), y, means)
    for c in real:  # each image's two correlations swap places
        assert mirrored[c] < 0.1
    half = (torch.arange(len(idx)) % 2 == 1).view(-1, 1, 1, 1)
    mixed = Q.mirror_agreement(torch.where(half, x.flip(-1), x), y, means)
    assert all(0.35 < v < 0.65 for v in mixed.values())
    # Brightness does not count: a darker, shifted copy faces the same way.
    assert Q.mirror_agreement(0.5 * x.double() + 40, y, means) == real


def test_mirror_agreement_bad_input():
    x, means = torch.rand(4, 1, 8, 8), torch.rand(1, 1, 8, 8)
    zeros = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="one label per image"):
        Q.mirror_agreement(x, zeros[:3], means)
    with pytest.raises(ValueError, match="image shapes differ"):
        Q.mirror_agreement(x, zeros, torch.rand(1, 1, 6, 6))
    with pytest.raises(ValueError, match="class 1 has no real mean"):
        Q.mirror_agreement(x, zeros + 1, means)


def _matches_loop(query, qy, pool, py):
    taken, out = set(), []
    for q, c in zip(query, qy.tolist(), strict=True):
        free = [j for j in range(pool.shape[0]) if py[j] == c and j not in taken]
        j = min(free, key=lambda j: (_dist(q, pool[j]), j))
        taken.add(j)
        out.append(j)
    return out


def test_nearest_matches_on_real_digits_find_each_image_in_a_shuffled_pool():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32)
    y = torch.as_tensor(d.target)
    query, qy = x[:60], y[:60]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(400, generator=g)
    pool, py = x[:400][order], y[:400][order]  # the query images among 340 others, shuffled
    got = Q.nearest_matches(query, qy, pool, py)
    assert torch.equal(pool[got], query) and torch.equal(py[got], qy)
    # Without the query images themselves: the greedy one-to-one matching of a loop.
    pool, py = x[60:400], y[60:400]
    got = Q.nearest_matches(query, qy, pool, py)
    assert got.tolist() == _matches_loop(query, qy, pool, py)
    assert len(set(got.tolist())) == 60 and torch.equal(py[got], qy)


def test_nearest_matches_take_each_pool_item_once_in_query_order():
    pool = torch.tensor([[0.0], [1.0], [5.0], [0.2]])
    py = torch.tensor([0, 0, 0, 1])
    # Both class-0 queries lie nearest item 0: the first takes it, the second the next nearest;
    # the class-1 query may only take the class-1 item, however far.
    got = Q.nearest_matches(torch.tensor([[0.1], [0.0], [0.0]]), torch.tensor([0, 0, 1]),
                            pool, py)
    assert got.tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="class 1: the pool holds 1 items for 2 queries"):
        Q.nearest_matches(torch.zeros(2, 1), torch.tensor([1, 1]), pool, py)
    with pytest.raises(ValueError, match="feature sizes differ"):
        Q.nearest_matches(torch.zeros(1, 2), torch.tensor([0]), pool, py)
