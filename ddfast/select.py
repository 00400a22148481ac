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

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import torch

from ddfast.errors import DataError, DdfastError
from ddfast.eval.quality import nearest_matches
from ddfast.io import write_bytes, write_json, write_png

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


def cluster_anchors(real_f: torch.Tensor, real_y: torch.Tensor, items, ipc: int, *,
                    seed: int = 0) -> dict[int, torch.Tensor]:
    """Per class, ``ipc`` anchors to start generation from (D4M's prototypes): the k-means
    centres (k = ipc, the same as ``prototype_pick``'s) of the class's real features, each
    answered by the mean of the class's model-space items (pixels in [-1, 1], or latents)
    assigned to it. ``items(c)`` gives class c's items (n_c, C, H, W) in the order of its rows
    of ``real_f``. Returns {class: (ipc, C, H, W) float32}; a centre that k-means left empty
    takes the item nearest it."""
    out = {}
    for c in torch.unique(real_y).tolist():
        f = real_f[real_y == c].double()
        if f.shape[0] < ipc:
            raise ValueError(f"class {c} has {f.shape[0]} real images, fewer than the {ipc} "
                             "anchors asked for")
        x = items(c).float()
        if x.shape[0] != f.shape[0]:
            raise ValueError(f"items({c}) gave {x.shape[0]} items for {f.shape[0]} features")
        centres = kmeans(f, ipc, seed=seed)
        d = torch.cdist(f, centres)  # (n_c, ipc)
        assign = d.argmin(dim=1)
        out[c] = torch.stack([x[assign == j].mean(0) if (assign == j).any()
                              else x[d[:, j].argmin()] for j in range(ipc)])
    return out


def write_selection(pool_dir: Path, out_dir: Path, positions: torch.Tensor) -> dict:
    """Copy the picked samples of a sampled pool (a distilled tree with its manifest, positions
    in ``load_folder_set``'s order: class by class, each class's first ``manifest["ipc"]``
    files) into ``out_dir`` as a set of its own, ``<class folder>/<k>.png`` in pick order, with a
    manifest naming each image's pool file and seed. The images are the pool's bytes; every file
    is written atomically, so a killed copy is simply made again."""
    pool_dir, out_dir = Path(pool_dir), Path(out_dir)
    path = pool_dir / "manifest.json"
    if not path.is_file():
        raise DataError(f"{pool_dir} holds no manifest.json: pass a folder sampled by ddfast")
    pool = json.loads(path.read_text())
    images = pool["images"]
    if len(images) != len(pool["classes"]) * pool["ipc"]:
        raise DataError(f"{path} lists {len(images)} images for {len(pool['classes'])} classes "
                        f"of {pool['ipc']}: the pool is not a complete sampled set")
    outside = [p for p in positions.tolist() if not 0 <= p < len(images)]
    if outside:
        raise IndexError(f"position {outside[0]} lies outside the pool of {len(images)} images")
    counts = Counter(images[p]["class"] for p in positions.tolist())
    if len(set(counts.values())) != 1:  # checked before anything is written
        raise ValueError(f"the picks hold {sorted(counts.items())} (class, images): a set needs "
                         "the same number of each class")
    taken: dict[int, int] = {}
    picked = []
    folders = {c["index"]: c["folder"] for c in pool["classes"]}
    for p in positions.tolist():
        src = images[p]
        k = taken.get(src["class"], 0)
        taken[src["class"]] = k + 1
        file = f"{folders[src['class']]}/{k:05d}.png"
        write_bytes(out_dir / file, (pool_dir / src["file"]).read_bytes())
        picked.append({"file": file, "class": src["class"], "index": k,
                       "pool_file": src["file"], "seed": src["seed"]})
    manifest = {"ipc": next(iter(counts.values())), "pool_ipc": pool["ipc"],
                "pool_config_digest": pool.get("config_digest", ""),
                "sampler": pool.get("sampler"),
                "rule": "the images a pool's selection picked, in pick order per class",
                "classes": pool["classes"], "images": picked}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def write_real_selection(out_dir: Path, images: torch.Tensor, labels: torch.Tensor,
                         train_index: torch.Tensor, class_names: list[str]) -> dict:
    """Write picked real images (N, C, H, W) uint8, class by class, as a set folder laid out as
    a sampled one (``<class folder>/<k>.png``, a manifest naming each image's index in the
    training split), so that real and generated picks are read and shown alike."""
    from ddfast.sample import class_specs

    specs = class_specs(list(class_names), list(range(len(class_names))))
    taken: dict[int, int] = {}
    picked = []
    for img, c, t in zip(images, labels.tolist(), train_index.tolist(), strict=True):
        k = taken.get(c, 0)
        taken[c] = k + 1
        file = f"{specs[c].folder}/{k:05d}.png"
        arr = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        write_png(out_dir / file, arr.contiguous().numpy())
        picked.append({"file": file, "class": c, "index": k, "train_index": t})
    manifest = {"ipc": max(taken.values()),
                "rule": "the training images a selection picked, in pick order per class",
                "classes": [{"index": s.index, "name": s.name, "cond_label": s.cond_label,
                             "folder": s.folder} for s in specs],
                "images": picked}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


# --------------------------------------------------------------- the training job's stage
# ``python -m ddfast.train --sample.select prototypes``: the job draws a pool per class beside
# its distilled set, trains (or reads from the cache) a ConvNet on every training image as the
# feature space, and writes one selected set per IPC. Measured on Fashion-MNIST, the feature
# space matters: the same pick in pixel space lost to random real images where the full-data
# classifier's features beat them (README, "Prototype selection").

POOL_FACTOR = 20  # pool per class = 20 x the largest IPC unless sample.pool says otherwise
# Anchored sampling's default start (sample.strength 0): the Fashion-MNIST study's choice on its
# held-out images, the best of 0.2, 0.3, 0.5 and 0.7 (README, "Prototype selection").
ANCHOR_STRENGTH = 0.2
FEATURE_IMAGES = 192_000  # the feature network sees about this many images unless told
# The feature network's recipe: the study's full-data classifier's (DC/DSA augmentation at
# batch 64), whatever recipe evaluates the sets. On Fashion-MNIST the IDC recipe's network
# (CutMix on half the batches) reached 88.7 % against 91.1 %, and its picks scored 74.3
# against 76.5 (IPC 10, the same pool, one run each).
FEATURE_RECIPE, FEATURE_BATCH = "dc", 64


def pool_size(setting: int, largest_ipc: int) -> int:
    """Samples per class in the pool: ``setting``, or POOL_FACTOR x the largest IPC for 0."""
    n = setting or POOL_FACTOR * largest_ipc
    if n < largest_ipc:
        raise ValueError(f"sample.pool={n} is smaller than the largest IPC {largest_ipc}: a "
                         f"pool needs at least as many samples per class as the set it feeds")
    return n


def feature_epochs(setting: int, num_images: int) -> int:
    """Epochs of the feature network: ``setting``, or enough to see about FEATURE_IMAGES."""
    return setting or max(1, math.ceil(FEATURE_IMAGES / num_images))


def feature_network_name(networks) -> str:
    """The evaluation's first ConvNet (its features are the classifier's input), else
    ConvNet-3: a ResNet has no single feature layer here."""
    return next((n for n in networks if n.startswith("convnet")), "convnet3")


def feature_network(source, indices: torch.Tensor, test_source, *, network: str, epochs: int,
                    seed: int, device: torch.device, dataset: str | None, cache_dir: Path,
                    protocol: str = FEATURE_RECIPE, batch_size: int = FEATURE_BATCH,
                    progress: bool = False):
    """(model, normalise, record): a ``network`` trained by ``protocol``'s recipe at
    ``batch_size`` for ``epochs`` on the training images ``indices`` of ``source`` (never the
    held-out ones), with its accuracy on the test split in the record. Cached per data set and
    setting under ``cache_dir/features`` (weights and record, written atomically), so every run
    on the same data reuses it."""
    from ddfast.eval.augment import norm_stats, normalize
    from ddfast.eval.networks import build_network
    from ddfast.eval.protocol import train_classifier
    from ddfast.io import load_tensors, save_tensors
    from ddfast.progress import log

    key = {"source": source.fingerprint(), "test": test_source.fingerprint(),
           "indices": hashlib.sha256(indices.numpy().tobytes()).hexdigest(),
           "network": network, "protocol": protocol, "epochs": epochs, "seed": seed,
           "batch_size": batch_size, "dataset": dataset,
           "device": device.type}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "features"
    w_path = folder / f"{network}-{digest}.safetensors"
    rec_path = w_path.with_suffix(".json")
    mean, std = norm_stats(source.channels, dataset)
    model = build_network(network, num_classes=len(source.class_names),
                          channels=source.channels, resolution=source.resolution)
    record = None
    if w_path.is_file() and rec_path.is_file():
        try:
            record = json.loads(rec_path.read_text())
            model.load_state_dict(load_tensors(w_path)[0])
        except (OSError, ValueError, RuntimeError) as exc:  # damaged: train it again
            log(f"[select] the cached feature network {w_path} is unreadable ({exc}); "
                "training it again")
            record = None
    if record is not None and record.get("key") == key:
        log(f"[select] feature network from {w_path} ({record['accuracy']:.2f} % on the test "
            "split)")
        model = model.to(device).eval()
    else:
        log(f"[select] feature network: {network} on {len(indices)} training images, {epochs} "
            f"epochs at batch {batch_size} ({protocol} recipe), cached afterwards in {folder}")
        x = source.images(indices.tolist())
        test_x = test_source.images(range(len(test_source)))
        run, model, _ = train_classifier(x, source.labels[indices], test_x, test_source.labels,
                                         network=network, protocol=protocol, epochs=epochs,
                                         batch_size=batch_size, seed=seed, device=device,
                                         progress=progress, dataset=dataset)
        record = {"key": key, "accuracy": run["last"], "best": run["best"], "epochs": epochs}
        try:
            save_tensors(w_path, model.state_dict(), {"network": network})
            write_json(rec_path, record)
        except DdfastError as exc:  # a read-only cache costs a retraining, not the run
            log(f"[select] could not cache the feature network ({exc})")
        log(f"[select] feature network: {record['accuracy']:.2f} % on the test split")

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return normalize(x.to(device).float() / 255.0, mean, std)

    return model, normalise, record


def image_features(model, normalise, images, batch: int = 2000) -> torch.Tensor:
    """(N, F) float32 features, on the CPU, of uint8 images (N, C, H, W): a tensor, or a pair
    ``(N, load)`` whose ``load(start, stop)`` reads them a batch at a time."""
    from ddfast.eval.diversity import features

    if torch.is_tensor(images):
        n, load = images.shape[0], lambda a, b: images[a:b]
    else:
        n, load = images
    with torch.no_grad():
        return torch.cat([features(model, normalise(load(a, min(a + batch, n)))).cpu()
                          for a in range(0, n, batch)])
