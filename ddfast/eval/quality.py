"""How good is a generator? Sample quality measured in the features of a full-data classifier.

A distilled set can only be as good as the model it is sampled from, so the study reports the
generator's quality beside the accuracies, and the same measures for the same number of real
images drawn from the training split (the bar a generator is held to). All are computed in the
penultimate features of the full-data classifier (``ddfast.eval.diversity.features``), against
the real test images, pooled over classes:

* ``fidelity``: the classifier's accuracy on the images, read against their labels (%): does a
  sample of class c look like class c?
* ``fd``: the Fréchet distance between Gaussians fitted to the two feature sets (as FID, in this
  classifier's features instead of Inception's). Biased upward at small sample sizes, so only
  sets of equal size are compared.
* ``precision`` / ``recall`` (Kynkäänniemi et al. 2019, "Improved precision and recall metric"):
  the fraction of generated images inside the union of the real images' k-nearest-neighbour
  balls, and the fraction of real images inside the union of the generated images' balls.
* ``coverage`` (Naeem et al. 2020): the fraction of real images whose own k-NN ball holds at
  least one generated image.

One more measure is read in pixels, not features: ``mirror_agreement``, which way a class's
items face. Some data sets have a side (Fashion-MNIST's shoes all point their toes the same
way); a generator trained on mirrored copies draws half of them the other way round, which the
feature measures above barely see.

Balls are Euclidean, the radius of a point being the distance to its k-th nearest other point of
its own set, k = 5 (Naeem et al.'s choice, used for all three). Distances are computed in float64
in blocks, so 10,000 real images need no 10,000 x 10,000 matrix.
"""

from __future__ import annotations

import torch

K_NEIGHBOURS = 5
BLOCK = 2048  # rows of a distance block


def _check(name: str, f: torch.Tensor) -> None:
    if f.dim() != 2 or f.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, F) feature matrix, got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} holds NaN or inf features: check the images and the network")


def knn_radii(f: torch.Tensor, k: int = K_NEIGHBOURS) -> torch.Tensor:
    """(n,) distance from each row of f (n, F) to its k-th nearest other row; needs n > k."""
    _check("features", f)
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} items, got {n}")
    f = f.double()
    out = []
    for i in range(0, n, BLOCK):
        d = torch.cdist(f[i:i + BLOCK], f)  # (b, n)
        # The k+1 smallest include the point itself (distance 0); its k-th other neighbour is
        # the last of them. A duplicate point also sits at 0, which is right: it is a neighbour.
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor,
                     radii: torch.Tensor) -> torch.Tensor:
    """(p,) bool: is each point within radius of at least one centre?"""
    points, centres = points.double(), centres.double()
    hit = []
    for i in range(0, points.shape[0], BLOCK):
        d = torch.cdist(points[i:i + BLOCK], centres)  # (b, c)
        hit.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hit)


def _nearest(points: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """(p,) distance from each point to its nearest row of ``others``."""
    points, others = points.double(), others.double()
    return torch.cat([torch.cdist(points[i:i + BLOCK], others).min(dim=1).values
                      for i in range(0, points.shape[0], BLOCK)])


def precision_recall_coverage(real: torch.Tensor, fake: torch.Tensor,
                              k: int = K_NEIGHBOURS) -> dict:
    """Precision, recall and coverage of ``fake`` (m, F) against ``real`` (n, F); n, m > k."""
    _check("real features", real)
    _check("generated features", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, generated {fake.shape[1]}")
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    precision = _inside_any_ball(fake, real, r_real).double().mean()
    recall = _inside_any_ball(real, fake, r_fake).double().mean()
    coverage = (_nearest(real, fake) <= r_real).double().mean()
    return {"precision": float(precision), "recall": float(recall),
            "coverage": float(coverage), "k": k}


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (float64)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the rows of a (n, F) and b (m, F).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, covariances with
    the n - 1 divisor. The trace term is the sum of the square roots of the eigenvalues of the
    symmetric matrix S_a^1/2 S_b S_a^1/2, which equals tr((S_a S_b)^1/2) without the
    non-symmetric square root (and its complex round-off) of the usual formula.
    """
    _check("first features", a)
    _check("second features", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("a Fréchet distance needs at least 2 items on each side")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(s_a)
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross
    return float(fd.clamp(min=0))


@torch.no_grad()
def fidelity(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             batch_size: int = 512) -> float:
    """Accuracy (%) of ``model`` on x (N, C, H, W, normalised as it was trained) against y."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need one label per image and at least one image, got {x.shape[0]} "
                         f"images and {y.shape[0]} labels")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    right = 0
    for i in range(0, x.shape[0], batch_size):
        pred = model(x[i:i + batch_size].to(dev)).argmax(dim=1).cpu()
        right += int((pred == y[i:i + batch_size].cpu()).sum())
    model.train(was_training)
    return 100.0 * right / x.shape[0]


def quality(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            test_features: torch.Tensor, *, k: int = K_NEIGHBOURS) -> dict:
    """Every measure of the images x (N, C, H, W, normalised) with labels y against the real
    test images' features (n, F), in ``model``'s penultimate features. The measures are
    computed on the CPU, wherever the model and the reference features live."""
    from ddfast.eval.diversity import features

    f, test_features = features(model, x).cpu(), test_features.cpu()
    return {"n": int(x.shape[0]), "fidelity": fidelity(model, x, y),
            "fd": frechet_distance(f, test_features),
            **precision_recall_coverage(test_features, f, k)}


def class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, C, H, W) float64 mean image of each class of x (N, C, H, W), labels y (N,);
    a class without images is NaN. Accumulated in chunks: the images stay in their dtype."""
    sums = torch.zeros(num_classes, *x.shape[1:], dtype=torch.float64)
    for i in range(0, x.shape[0], 4096):
        sums.index_add_(0, y[i:i + 4096].long(), x[i:i + 4096].double())
    count = torch.bincount(y.long(), minlength=num_classes).double()
    return sums / count.view(-1, *([1] * (x.dim() - 1)))


def mirror_agreement(x: torch.Tensor, y: torch.Tensor, means: torch.Tensor) -> dict[int, float]:
    """Per class c of y: the fraction of the images x (N, C, H, W) of class c that correlate
    better with the real class mean ``means[c]`` (see ``class_means``) than with that mean
    mirrored left to right. Correlations are centred (each image and the mean less their own
    average), so brightness does not count.

    Real images of a class with a side score near 1 (Fashion-MNIST's sandals, sneakers and ankle
    boots: 0.93 to 1.00), their mirror images near 0, and a set drawn facing either way at random
    about 0.5. For a class that is symmetric on average the two correlations nearly tie and the
    fraction says little.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"need one label per image, got {x.shape[0]} images and "
                         f"{y.shape[0]} labels")
    if x.shape[1:] != means.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(x.shape[1:])} and the class means' "
                         f"{tuple(means.shape[1:])}")
    out = {}
    for c in sorted(int(v) for v in torch.unique(y)):
        if c >= means.shape[0] or not torch.isfinite(means[c]).all():
            raise ValueError(f"class {c} has no real mean image")
        m = means[c].double() - means[c].double().mean()
        a = x[y == c].double().flatten(1)
        a = a - a.mean(1, keepdim=True)  # (n, C*H*W)
        same, mirrored = a @ m.flatten(), a @ m.flip(-1).flatten()
        out[c] = float((same > mirrored).double().mean())
    return out


def nearest_matches(query: torch.Tensor, query_y: torch.Tensor, pool: torch.Tensor,
                    pool_y: torch.Tensor) -> torch.Tensor:
    """(q,) index into ``pool`` (p, F), labels ``pool_y``, of each row of ``query`` (q, F),
    labels ``query_y``, taken in order: the nearest (Euclidean) pool row of the same class that
    no earlier query row has taken. A greedy one-to-one matching: the set of pool items that
    stands closest, item by item, to a given set."""
    _check("query features", query)
    _check("pool features", pool)
    if query.shape[1] != pool.shape[1]:
        raise ValueError(f"feature sizes differ: query {query.shape[1]}, pool {pool.shape[1]}")
    if query.shape[0] != query_y.shape[0] or pool.shape[0] != pool_y.shape[0]:
        raise ValueError("need one label per feature row, for the query and for the pool")
    out = torch.empty(query.shape[0], dtype=torch.long)
    for c in torch.unique(query_y).tolist():
        rows = (query_y == c).nonzero().flatten()
        members = (pool_y == c).nonzero().flatten()
        if members.numel() < rows.numel():
            raise ValueError(f"class {c}: the pool holds {members.numel()} items for "
                             f"{rows.numel()} queries; draw a larger pool")
        d = torch.cdist(query[rows].double(), pool[members].double())  # (q_c, p_c)
        for i in range(rows.numel()):
            j = int(d[i].argmin())
            out[rows[i]] = members[j]
            d[:, j] = float("inf")
    return out
