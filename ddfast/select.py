"""Prototype selection: which ``ipc`` of a pool of generated samples stand for each class.

The paper's sampler draws one seed per image, so a class's set is whatever its first ``ipc``
seeds give; with classifier-free guidance those are mostly the class's most typical items. This
stage is a departure from that sampler, offered beside it and named as such: draw a pool of
``n > ipc`` samples per class, find ``ipc`` prototypes of the class's *real* training images
(k-means centres in a feature space), and keep, for each prototype, the nearest pool sample not
yet taken. The set then spreads over the class as its training images do (dark items, prints,
odd shapes in their share), while every image in it is still a generated one. D4M (Su et al.,
2024) anchors its generation on k-means prototypes of real latents in the same spirit; here the
prototypes choose among finished samples instead, so any generator and method can be used as is.

The features are the caller's (the study uses its full-data classifier's penultimate layer).
k-means is Lloyd's algorithm from k-means++ seeds (Arthur and Vassilvitskii, 2007), in float64
and seeded, so the same features give the same centres on any machine up to float rounding.
"""

from __future__ import annotations

import torch

from ddfast.eval.quality import nearest_matches

MAX_ITERS = 300


def kmeans(f: torch.Tensor, k: int, *, seed: int = 0, iters: int = MAX_ITERS) -> torch.Tensor:
    """(k, F) float64 centres of the rows of ``f`` (n, F), n >= k: k-means++ seeding, then
    Lloyd's steps until no assignment changes (or ``iters`` steps). A centre left with no point
    keeps its place."""
    if f.dim() != 2 or not torch.isfinite(f).all():
        raise ValueError(f"k-means needs a finite (n, F) matrix, got shape {tuple(f.shape)}")
    if not 1 <= k <= f.shape[0]:
        raise ValueError(f"k-means of {f.shape[0]} points into k={k} clusters: k must lie in "
                         f"1..{f.shape[0]}")
    f = f.double()
    g = torch.Generator().manual_seed(seed)
    centres = [f[int(torch.randint(f.shape[0], (1,), generator=g))]]
    d2 = torch.cdist(f, centres[0][None]).squeeze(1) ** 2
    for _ in range(k - 1):
        # The next seed is a point drawn with probability proportional to its squared distance
        # to the nearest seed so far; a set of duplicates (all at 0) falls back to uniform.
        w = d2 if d2.sum() > 0 else torch.ones_like(d2)
        nxt = f[int(torch.multinomial(w, 1, generator=g))]
        centres.append(nxt)
        d2 = torch.minimum(d2, torch.cdist(f, nxt[None]).squeeze(1) ** 2)
    c = torch.stack(centres)
    assign = None
    for _ in range(iters):
        new = torch.cdist(f, c).argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, f)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None].double()
    return c


def prototype_pick(pool_f: torch.Tensor, pool_y: torch.Tensor, real_f: torch.Tensor,
                   real_y: torch.Tensor, ipc: int, *, seed: int = 0) -> torch.Tensor:
    """Positions into the pool of ``ipc`` samples per class, class by class in increasing
    label order: the k-means centres (k = ipc) of the class's real features ``real_f``, each
    answered by the nearest pool sample of the class not yet taken (greedy, centre by centre;
    ``ddfast.eval.quality.nearest_matches``). Every class of the pool needs at least ``ipc``
    samples and ``ipc`` real images."""
    if pool_f.shape[1] != real_f.shape[1]:
        raise ValueError(f"pool features have {pool_f.shape[1]} dimensions, real ones "
                         f"{real_f.shape[1]}: compute both with the same network")
    classes = torch.unique(pool_y).tolist()
    centres, labels = [], []
    for c in classes:
        members = real_f[real_y == c]
        if members.shape[0] < ipc:
            raise ValueError(f"class {c} has {members.shape[0]} real images, fewer than the "
                             f"{ipc} prototypes asked for")
        centres.append(kmeans(members, ipc, seed=seed))
        labels += [c] * ipc
    return nearest_matches(torch.cat(centres), torch.tensor(labels), pool_f.double(), pool_y)
