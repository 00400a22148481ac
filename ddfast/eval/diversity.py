"""How diverse is a distilled set? Measured in the feature space of a classifier of the real data.

Accuracy alone does not say whether a set covers its classes or repeats one mode. Two measures,
computed per class in the penultimate features of a network trained on the full training set,
then averaged over classes:

* ``pairwise``: the mean cosine distance ``1 - cos(f_i, f_j)`` over all pairs i != j of the
  class's distilled images (0 when every image is the same; needs 2 images per class, so it is
  reported as None at IPC 1).
* ``coverage`` (Naeem et al. 2020, "Reliable fidelity and diversity metrics"): the fraction of
  the class's real images whose k-nearest-neighbour ball among the real images (Euclidean, k = 5,
  the point itself excluded) contains at least one distilled image. 1 means the distilled images
  reach every region the real images occupy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

K_NEIGHBOURS = 5


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features of a ConvNet / ResNet from ``ddfast.eval.networks``.

    x: (N, C, H, W) normalised as the model was trained. Returns (N, F) float32.
    """
    if not (hasattr(model, "features") and hasattr(model, "classifier")):
        raise ValueError(f"{type(model).__name__} has no features/classifier split; use a ConvNet")

    def body(inp):
        return model.features(inp).flatten(1)  # the classifier's input

    was_training = model.training
    model.eval()
    out = [body(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out)


def pairwise_cosine_distance(f: torch.Tensor) -> float | None:
    """Mean of ``1 - cos`` over ordered pairs i != j of the rows of f (n, F); None if n < 2."""
    n = f.shape[0]
    if n < 2:
        return None
    u = torch.nn.functional.normalize(f.double(), dim=1)
    sim = u @ u.T  # (n, n)
    off = sim.sum() - sim.diagonal().sum()
    return float(1.0 - off / (n * (n - 1)))


def coverage(real: torch.Tensor, fake: torch.Tensor, k: int = K_NEIGHBOURS) -> float:
    """Naeem et al.'s coverage of ``real`` (n, F) by ``fake`` (m, F); needs n > k."""
    from ddfast.eval.quality import _nearest, knn_radii

    n = real.shape[0]
    if n <= k:
        raise ValueError(f"coverage needs more than k={k} real items, got {n}")
    return float((_nearest(real, fake) <= knn_radii(real, k)).double().mean())


def set_diversity(real_f: torch.Tensor, real_y: torch.Tensor, fake_f: torch.Tensor,
                  fake_y: torch.Tensor, *, k: int = K_NEIGHBOURS) -> dict:
    """Per-class pairwise distance and coverage, and their means over classes.

    real_f (n, F) / real_y (n,): features and labels of real images; fake_f (m, F) / fake_y (m,):
    of the distilled set. Every class of the distilled set must have real images.
    """
    classes = sorted(set(fake_y.tolist()))
    per_class = []
    for c in classes:
        r = real_f[real_y == c]
        f = fake_f[fake_y == c]
        per_class.append({"class": int(c), "pairwise": pairwise_cosine_distance(f),
                          "coverage": coverage(r, f, k)})
    pw = [p["pairwise"] for p in per_class if p["pairwise"] is not None]
    return {"pairwise": sum(pw) / len(pw) if pw else None,
            "coverage": sum(p["coverage"] for p in per_class) / len(per_class),
            "k": k, "per_class": per_class}
