"""Prototype selection: k-means checked against its defining fixed point and scikit-learn on real
digits, and the pick against a direct computation."""

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from ddfast.select import cluster_anchors, kmeans, prototype_pick


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float64), torch.tensor(d.target)


def test_kmeans_is_a_lloyd_fixed_point_as_good_as_scikit_learns(digits):
    x, _ = digits
    c = kmeans(x, 10, seed=0)
    assign = torch.cdist(x, c).argmin(dim=1)
    for j in range(10):  # every centre is the mean of the points nearest it
        members = x[assign == j]
        assert members.shape[0] > 0
        # float64 means of at most 1,797 values of 0..16: rounding is far below 1e-9
        torch.testing.assert_close(c[j], members.mean(0), rtol=0, atol=1e-9)
    def inertia(centres):
        return float(((x - centres[torch.cdist(x, centres).argmin(dim=1)]) ** 2).sum())

    # The best of ten seedings against scikit-learn's best of ten: both the lowest of ten local
    # optima of the same objective. scikit-learn's own best of ten moves by about 1e-4 from one
    # random state to another on digits; a wrong update (a centre that is not its points' mean,
    # a bad seeding) lands percents away.
    ours = min(inertia(kmeans(x, 10, seed=s)) for s in range(10))
    ref = KMeans(10, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert abs(ours / ref - 1) <= 0.01
    assert torch.equal(kmeans(x, 10, seed=0), c)  # seeded: the same centres again


def test_kmeans_finds_separated_clusters_and_handles_edge_cases(digits):
    x, y = digits
    blobs = x[:60] / 100.0 + 50.0 * torch.arange(3).repeat_interleave(20)[:, None]
    c = kmeans(blobs, 3, seed=1)
    got = sorted(c[:, 0].tolist())
    want = sorted(blobs.view(3, 20, -1).mean(1)[:, 0].tolist())
    assert got == pytest.approx(want, abs=1e-12)
    # k equal to the number of distinct points: each point is its own centre
    pts = torch.unique(x[y == 0][:15], dim=0)
    c = kmeans(pts, pts.shape[0], seed=0)
    assert (torch.cdist(pts, c).min(dim=0).values == 0).all()
    same = torch.ones(5, 3, dtype=torch.float64)  # duplicates only: no division by zero
    assert torch.equal(kmeans(same, 2), torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="k must lie in 1..5"):
        kmeans(same, 6)
    with pytest.raises(ValueError, match="finite"):
        kmeans(torch.full((4, 2), float("nan")), 2)


def test_one_prototype_is_the_pool_sample_nearest_the_class_mean(digits):
    x, y = digits
    real_f, real_y, pool_f, pool_y = x[:900], y[:900], x[900:], y[900:]
    pick = prototype_pick(pool_f, pool_y, real_f, real_y, 1)
    want = []
    for c in range(10):
        members = (pool_y == c).nonzero().flatten()
        d = torch.cdist(real_f[real_y == c].mean(0, keepdim=True), pool_f[members])
        want.append(int(members[d.argmin()]))
    assert pick.tolist() == want


def test_picks_are_distinct_and_within_class_and_find_real_points_in_the_pool(digits):
    x, y = digits
    pick = prototype_pick(x[900:], y[900:], x[:900], y[:900], 10)
    assert pick.numel() == 100 and pick.unique().numel() == 100
    assert torch.equal(y[900:][pick], torch.arange(10).repeat_interleave(10))
    # a pool that holds each class's real points themselves, shuffled among others: with one
    # prototype per distinct point, the pick is exactly those points
    real = torch.cat([torch.unique(x[y == c][:8], dim=0) for c in range(3)])
    real_y = torch.cat([torch.full((torch.unique(x[y == c][:8], dim=0).shape[0],), c)
                        for c in range(3)])
    counts = torch.bincount(real_y).tolist()
    assert min(counts) >= 2
    k = min(counts)
    keep = torch.cat([(real_y == c).nonzero().flatten()[:k] for c in range(3)])
    real, real_y = real[keep], real_y[keep]
    pool = torch.cat([real, x[1000:1300]])
    pool_y = torch.cat([real_y, y[1000:1300]])
    pool_y = torch.where(pool_y < 3, pool_y, pool_y % 3)
    perm = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))
    pick = prototype_pick(pool[perm], pool_y[perm], real, real_y, k)
    assert sorted(perm[pick].tolist()) == list(range(real.shape[0]))


def test_bad_inputs_name_the_problem(digits):
    x, y = digits
    with pytest.raises(ValueError, match="same network"):
        prototype_pick(x[:, :10], y, x, y, 1)
    with pytest.raises(ValueError, match="fewer than the 10 prototypes"):
        prototype_pick(x, y, x[:50], y[:50], 10)
    with pytest.raises(ValueError, match="draw a larger pool"):
        prototype_pick(x[:30], y[:30], x, y, 10)


def test_write_selection_copies_the_picked_pool_files_and_refuses_uneven_picks(tmp_path, digits):
    import json

    import numpy as np

    from ddfast.io import write_json, write_png
    from ddfast.select import write_selection

    x, _ = digits
    pool, classes, images = tmp_path / "pool", [], []
    for c in range(2):
        classes.append({"index": c, "name": f"c{c}", "cond_label": c, "folder": f"c{c}"})
        for i in range(3):
            file = f"c{c}/{i:05d}.png"
            write_png(pool / file, (x[3 * c + i].view(8, 8) * 15).numpy().astype(np.uint8))
            images.append({"file": file, "class": c, "index": i, "seed": 100 * c + i})
    write_json(pool / "manifest.json", {"ipc": 3, "classes": classes, "images": images})
    out = tmp_path / "set"
    manifest = write_selection(pool, out, torch.tensor([2, 0, 4, 3]))
    assert [m["pool_file"] for m in manifest["images"]] == [
        "c0/00002.png", "c0/00000.png", "c1/00001.png", "c1/00000.png"]
    assert [m["seed"] for m in manifest["images"]] == [2, 0, 101, 100]
    for m in manifest["images"]:
        assert (out / m["file"]).read_bytes() == (pool / m["pool_file"]).read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == manifest and manifest["ipc"] == 2
    with pytest.raises(ValueError, match="same number of each class"):
        write_selection(pool, tmp_path / "uneven", torch.tensor([0, 1, 3]))
    with pytest.raises(IndexError, match="outside the pool of 6"):
        write_selection(pool, tmp_path / "outside", torch.tensor([0, 6]))
    assert not (tmp_path / "uneven").exists() and not (tmp_path / "outside").exists()


def test_cluster_anchors_are_the_mean_items_of_each_prototypes_cluster(digits):
    x, y = digits
    feats = x.float() * 0.5 + 1.0  # features and items differ; the clusters come from features
    images = x.reshape(-1, 1, 8, 8) / 8.0 - 1.0  # the items, in the model's [-1, 1]

    def items(c):
        return images[y == c]

    anchors = cluster_anchors(feats, y, items, 3, seed=0)
    assert sorted(anchors) == list(range(10))
    for c in (0, 7):
        f = feats[y == c].double()
        centres = kmeans(f, 3, seed=0)  # the centres prototype_pick would answer
        assign = torch.cdist(f, centres).argmin(dim=1)
        want = torch.stack([items(c)[assign == j].float().mean(0) for j in range(3)])
        assert anchors[c].shape == (3, 1, 8, 8) and anchors[c].dtype == torch.float32
        torch.testing.assert_close(anchors[c], want, rtol=0, atol=0)
    # With the features as items, each anchor is its centre (k-means' fixed point).
    one = cluster_anchors(x, y, lambda c: x[y == c], 4, seed=0)
    torch.testing.assert_close(one[3].double(), kmeans(x[y == 3], 4, seed=0),
                               rtol=0, atol=1e-5)  # fp32 anchors of values up to 16
    with pytest.raises(ValueError, match="fewer than the 200 anchors"):
        cluster_anchors(x, y, items, 200)
    with pytest.raises(ValueError, match="items"):
        cluster_anchors(x, y, lambda c: images[:5], 2)
