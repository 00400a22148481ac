"""The evaluation protocols: fresh classifiers trained on a few images, tested on real data.

A distilled (or random-real) set of IPC images per class trains a network from scratch; the network
is tested on the real held-out images of the same classes. Three recipes, all SGD with lr 0.01,
momentum 0.9 and weight decay 5e-4:

* ``imagenet-subset`` (IDC / Minimax, method.md section 5): batch 64, lr x0.2 at 2/3 and 5/6 of
  the epochs, device-side augmentation plus CutMix on every batch, epochs by IPC, test accuracy
  every ``max(1, epochs // 100)`` epochs and at the last.
* ``small`` (IDC's recipe for 28-32 px sets, its ``train.py`` with ``argument.py``'s settings
  for MNIST, Fashion-MNIST, SVHN and CIFAR): batch 64, 1000 epochs, lr x0.2 at 2/3 and 5/6,
  IDC's DSA variant (flip and colour on every batch, then one of crop, scale and rotate;
  ``ddfast.eval.dsa`` mode ``idc``), CutMix on half of the batches, tested once at the end.
* ``dc`` (the DC / DSA recipe behind the field's 28-32 px tables, ``evaluate_synset`` of
  VICO-UoE/DatasetCondensation): batch 256, 1001 passes (its ``range(Epoch + 1)`` with Epoch
  1000), lr x0.1 after pass 502 through a new SGD (momentum restarts, as DC rebuilds its
  optimiser), DSA augmentation in its default mode (one group per batch, ``ddfast.eval.dsa``),
  no CutMix, float32 throughout, tested once at the end.

Images are normalised with their dataset's statistics when the dataset is known (``dataset``:
Fashion-MNIST 0.2861 / 0.3530 as DC and IDC, digits its own), and flipped when the dataset's
images may be mirrored (Fashion-MNIST yes, digits no; unknown sets: colour ones only).

Each reports best (max over evaluations; equal to last for ``dc``) and last, mean and std over
repeats.

Accuracies are percentages (0..100). Standard deviations are population std over repeats
(``np.std``, ddof=0), as IDC reports them.

Everything a run touches lives on its device: the train images as float [0, 1], the test set
already resized and normalised (it is deterministic, so it is transformed once). The loop never
calls ``.item()`` per step; it synchronises only when evaluating.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ddfast.data import IMAGE_EXTENSIONS
from ddfast.errors import ConfigError, DataError, DdfastError
from ddfast.io import write_json, write_text
from ddfast.progress import bar

PROTOCOLS = ("small", "imagenet-subset", "dc")
LR, MOMENTUM, WEIGHT_DECAY, LR_GAMMA, CUTMIX_BETA = 0.01, 0.9, 5e-4, 0.2, 1.0
_EVAL_BATCH = 256  # test images per forward pass (224 px ResNet-18 fits easily)


@dataclass(frozen=True)
class Protocol:
    name: str
    resolution: int | None  # side the networks see; None = the train images' own side
    networks: tuple[str, ...]  # default networks
    upscale: bool  # resize smaller train images up to ``resolution`` once, before augmenting
    augment: str = "idc"  # idc (crop, flip, jitter, lighting; ddfast.eval.augment) | dsa
    cutmix: bool = True  # CutMix on every batch
    epochs: int = 0  # fixed training epochs; 0 = by IPC (epochs_for_ipc)
    batch_size: int = 64  # default training batch
    milestones: tuple[tuple[int, int], ...] = ((2, 3), (5, 6))  # lr steps at num/den of epochs
    gamma: float = LR_GAMMA  # lr factor at each milestone
    test_every_percent: bool = True  # test every epochs // 100 epochs, else only at the end
    restart_momentum: bool = False  # a new SGD at each milestone (DC), else MultiStepLR
    bf16: bool = False  # bf16 autocast on CUDA (train and test); False = float32, as IDC and DC
    dsa_mode: str = "S"  # with augment dsa: S (DC), M (all groups) or idc (IDC's variant)
    cutmix_p: float = 1.0  # share of batches CutMix mixes (IDC: 0.5 on small sets)


PROTOCOL_PRESETS = {
    "small": Protocol("small", None, ("convnet3",), upscale=False, augment="dsa", epochs=1000,
                      test_every_percent=False, dsa_mode="idc", cutmix_p=0.5),
    "imagenet-subset": Protocol("imagenet-subset", 224, ("convnet6", "resnetap10", "resnet18"),
                                upscale=True),
    "dc": Protocol("dc", None, ("convnet3",), upscale=False, augment="dsa", cutmix=False,
                   epochs=1001, batch_size=256, milestones=(), gamma=0.1,
                   test_every_percent=False, restart_momentum=True, bf16=False),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOL_PRESETS:
        raise ConfigError(f"unknown evaluation protocol {name!r}: pass one of {list(PROTOCOLS)}")
    return PROTOCOL_PRESETS[name]


def milestones_for(proto: Protocol, epochs: int) -> list[int]:
    """The passes after which the lr drops. DC: one drop after pass ``(epochs - 1) // 2 + 2``
    (its ``ep == Epoch // 2 + 1`` test on 0-based ``ep`` with Epoch = epochs - 1)."""
    if proto.restart_momentum:
        return [(epochs - 1) // 2 + 2]
    return [num * epochs // den for num, den in proto.milestones]


def epochs_for_ipc(ipc: int) -> int:
    """Training epochs by images per class (IDC / Minimax): fewer images, more epochs."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ConfigError(f"IPC must be a positive int, got {ipc!r}")
    for limit, epochs in ((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500)):
        if ipc <= limit:
            return epochs
    return 300


# ----------------------------------------------------------------------------------- loading


def _check_ipc(ipc) -> None:
    if ipc is not None and (isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1):
        raise ConfigError(f"ipc must be a positive int or None (all images), got {ipc!r}")


def first_per_class(labels: torch.Tensor, ipc: int | None, num_classes: int) -> torch.Tensor:
    """Indices of the first ``ipc`` items of each class in the given order (None = all).

    labels: (N,) int. Returns (M,) int64, class-major (class 0's items, then class 1's, ...).
    """
    _check_ipc(ipc)
    picked = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()  # (n_c,) in source order
        if ipc is not None and members.numel() < ipc:
            raise DataError(f"class {c} has only {members.numel()} items, fewer than IPC {ipc}: "
                            f"lower --ipc to at most {members.numel()}")
        if members.numel() == 0:
            raise DataError(f"class {c} has no items: drop the class or add images")
        picked.append(members if ipc is None else members[:ipc])
    return torch.cat(picked)


def load_source_set(source, ipc: int | None = None):
    """The first ``ipc`` items of each class of an ImageSource (the random-real baseline).

    Returns (images (M, C, R, R) uint8, labels (M,) int64, class_names).
    """
    idx = first_per_class(source.labels, ipc, len(source.class_names))
    return source.images(idx), source.labels[idx].clone(), list(source.class_names)


def _class_folders(root: Path) -> list[tuple[str, str]]:
    """(folder, class name) pairs in class order: the manifest's, else sorted folder names."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["classes"]
            entries = sorted(entries, key=lambda e: int(e["index"]))
            pairs = [(str(e["folder"]), str(e["name"])) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read the class list of {manifest} ({exc!r}): restore the "
                            "manifest written by python -m ddfast.train, or delete it so that "
                            "folder names are taken as class names") from None
        missing = [f for f, _ in pairs if not (root / f).is_dir()]
        if missing:
            raise DataError(f"{manifest} names class folders {missing} that {root} lacks: sample "
                            "them again, or delete the manifest")
        return pairs
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(f, f) for f in folders]


def load_folder_set(path, ipc: int | None = None, channels: int | None = None):
    """A class-per-folder image tree: the first ``ipc`` files of each class in sorted order.

    Class order is the manifest's (``manifest.json`` written with a distilled set) when present,
    which also maps sanitised folder names back to class names; else sorted folder names, each
    folder name being its class name. ``channels`` None keeps 1 channel when every image is
    grayscale, else 3. Every image must share one size (nothing is resized here).

    Returns (images (N, C, H, W) uint8, labels (N,) int64, class_names).
    """
    _check_ipc(ipc)
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1, 3 or None, got {channels!r}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image set {root} does not exist or is not a folder: pass a folder laid "
                        "out as <dir>/<class>/<image>")
    pairs = _class_folders(root)
    if not pairs:
        raise DataError(f"{root} has no class folders: lay it out as <dir>/<class>/<image>")
    arrays, labels, gray, first = [], [], True, None
    for label, (folder, _name) in enumerate(pairs):
        files = sorted(p for p in (root / folder).iterdir()
                       if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_EXTENSIONS)
        if ipc is not None and len(files) < ipc:
            raise DataError(f"class folder {root / folder} holds {len(files)} images, fewer than "
                            f"IPC {ipc}: sample more images or lower --ipc")
        if not files:
            raise DataError(f"class folder {root / folder} holds no images: add images or remove "
                            "the folder")
        for f in files[:ipc]:
            try:
                with Image.open(f) as im:
                    gray &= im.mode in ("1", "L", "LA", "I", "I;16", "F")
                    rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
            except (OSError, ValueError, SyntaxError) as exc:
                raise DataError(f"cannot decode image {f}: {exc}; replace or remove it") from None
            if first is None:
                first = (f, rgb.shape)
            elif rgb.shape != first[1]:
                raise DataError(f"images differ in size: {f} is {rgb.shape[1]}x{rgb.shape[0]} but "
                                f"{first[0]} is {first[1][1]}x{first[1][0]}; every image of a "
                                "set must share one size: resize them all to one size")
            arrays.append(rgb)
            labels.append(label)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    if channels == 1 or (channels is None and gray):
        # ITU-R 601 luma, the same conversion Pillow's "L" applies.
        images = torch.from_numpy(np.stack([np.asarray(Image.fromarray(a).convert("L"))
                                            for a in arrays]))[:, None]  # (N, 1, H, W)
    return (images.contiguous(), torch.tensor(labels, dtype=torch.int64),
            [name for _, name in pairs])


def check_classes(train_names: list[str], test_names: list[str]) -> None:
    """DataError unless the train and test sets have the same classes in the same order."""
    if list(train_names) != list(test_names):
        raise DataError(f"the train set's classes {list(train_names)} differ from the test set's "
                        f"{list(test_names)} (or their order): evaluate against the test split "
                        "of the dataset the set was distilled from")


# ---------------------------------------------------------------------------------- training


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}: pass auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available: pass cpu")
    return dev


def _as_unit(x: torch.Tensor, what: str, device: torch.device) -> torch.Tensor:
    """uint8 0..255 or float 0..1 images (N, C, H, W) to float32 [0, 1] on ``device``."""
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[0] == 0:
        raise DataError(f"{what} images must be a non-empty (N, C, H, W) tensor, got "
                        f"{tuple(x.shape) if torch.is_tensor(x) else type(x)}")
    x = x.to(device)  # uint8 travels: a quarter of the bytes of float32
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _seed_for(seed: int, net_index: int, repeat: int) -> int:
    # SeedSequence spreads (seed, network, repeat) apart, so runs never share a stream.
    return int(np.random.SeedSequence([seed, net_index, repeat]).generate_state(1)[0])


def summarize_curve(curve: list[dict]) -> dict:
    """best (max over evaluations, earliest on ties), its epoch, and last (final evaluation)."""
    accs = [p["acc"] for p in curve]
    best_i = int(np.argmax(accs))
    return {"best": accs[best_i], "best_epoch": curve[best_i]["epoch"], "last": accs[-1]}


def mean_std(values) -> tuple[float, float]:
    """Mean and population std (ddof=0, IDC's np.std) of a list of accuracies."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def _accuracy(model, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> float:
    """Top-1 accuracy in percent over the prepared test set; the run's only sync point."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, x.shape[0], _EVAL_BATCH):
            logits = model(x[start:start + _EVAL_BATCH])  # (b, K)
            correct += (logits.argmax(1) == y[start:start + _EVAL_BATCH]).sum()
    model.train()
    return 100.0 * correct.item() / x.shape[0]


def _build(network: str, num_classes: int, channels: int, resolution: int, seed: int):
    """The network initialised from ``seed``, on the CPU, leaving the global RNG untouched."""
    from ddfast.eval.networks import build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return build_network(network, num_classes=num_classes, channels=channels,
                                 resolution=resolution)
        except DdfastError:
            raise
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"cannot build network {network!r} ({exc}): pass one of convnet3, "
                              "convnet6, resnetap10, resnet18") from None


def _train_one(train_x, train_y, test_x, test_y, *, network, num_classes, epochs, augment,
               device, seed, batch_size, progress, proto: Protocol, keep_model=False):
    """One network from scratch. train_x (N, C, H, W) float [0, 1] and test_x (M, C, S, S)
    normalised, both on ``device``. Returns the run's record (curve, best, last, lrs)."""
    from ddfast.eval.augment import cutmix

    cuda = device.type == "cuda"
    bf16 = cuda and proto.bf16
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    group_gen = torch.Generator().manual_seed(seed + 2)  # DSA's group per batch, on the host
    model = _build(network, num_classes, test_x.shape[1], test_x.shape[-1], seed).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    milestones = milestones_for(proto, epochs)
    sched = None if proto.restart_momentum else torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=milestones, gamma=proto.gamma)
    every = max(1, epochs // 100) if proto.test_every_percent else epochs
    n = train_x.shape[0]
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no per-step sync
    steps, curve, lrs = 0, [], []
    model.train()
    for epoch in bar(range(epochs), enabled=progress, desc=f"{network} seed {seed}",
                     unit="epoch"):
        lrs.append(opt.param_groups[0]["lr"])
        order = torch.randperm(n, generator=shuffle_gen).to(device, non_blocking=True)  # (N,)
        for start in range(0, n, batch_size):  # the last partial batch is kept
            idx = order[start:start + batch_size]  # (b,)
            x = augment(train_x[idx], aug_gen, group_gen)  # (b, C, S, S) normalised
            # IDC's coin per batch (a host draw, so no step waits for the device).
            mix = proto.cutmix and (proto.cutmix_p >= 1.0 or
                                    float(torch.rand(1, generator=group_gen)) < proto.cutmix_p)
            if mix:
                x, y_a, y_b, lam = cutmix(x, train_y[idx], alpha=CUTMIX_BETA, generator=aug_gen)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x).float()  # (b, K)
            if mix:
                loss = (lam * F.cross_entropy(logits, y_a)
                        + (1 - lam) * F.cross_entropy(logits, y_b))
            else:
                loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            steps += 1
        if sched is not None:
            sched.step()
        elif epoch + 1 in milestones:  # DC: a new optimiser at the lower lr, momentum reset
            opt = torch.optim.SGD(model.parameters(), lr=opt.param_groups[0]["lr"] * proto.gamma,
                                  momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            acc = _accuracy(model, test_x, test_y, bf16)
            curve.append({"epoch": epoch + 1, "acc": acc, "train_loss": loss_sum.item() / steps})
            loss_sum.zero_()
            steps = 0
    record = {"network": network, "seed": seed, "epochs": epochs, "curve": curve, "lrs": lrs,
              **summarize_curve(curve)}
    return (record, model) if keep_model else record


def _prepare(train_x, test_x, proto: Protocol, device, flip: bool | None = None,
             dataset: str | None = None, dsa_mode: str | None = None):
    """Move both sets to the device; returns (train [0, 1], test normalised, augment, size,
    flip), ``flip`` being the flip in force (``None``: the dataset's rule, else RGB sets only).
    ``augment(x, generator, group_generator)`` maps a [0, 1] batch to a normalised one."""
    from ddfast.eval.augment import Augment, default_flip, norm_stats, test_transform

    train = _as_unit(train_x, "train", device)  # (N, C, H, W)
    test = _as_unit(test_x, "test", device)  # (M, C, h, w)
    channels = train.shape[1]
    if test.shape[1] != channels:
        raise DataError(f"the train images have {channels} channels but the test images "
                        f"{test.shape[1]}: load the test set with channels={channels}")
    size = proto.resolution or min(train.shape[-2:])
    if proto.upscale and min(train.shape[-2:]) < size:
        # Smaller images (e.g. 128 px) are brought up to the protocol's size once, so the random
        # crops see the same scale range as for full-size images.
        scale = size / min(train.shape[-2:])
        hw = (math.ceil(train.shape[-2] * scale), math.ceil(train.shape[-1] * scale))
        train = F.interpolate(train, size=hw, mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1)  # (N, C, >=S, >=S)
    mean, std = norm_stats(channels, dataset)
    test = test_transform(test, out_size=size, mean=mean, std=std)  # (M, C, S, S)
    if device.type == "cuda":
        test = test.contiguous(memory_format=torch.channels_last)  # the layout the convs prefer
    # Colour noise assumes natural RGB photos; grey glyphs (digits) also have handedness, while
    # grey Fashion-MNIST items may be mirrored: the dataset's rule decides the flip.
    rgb = channels == 3
    flip = default_flip(channels, dataset) if flip is None else bool(flip)
    if proto.augment == "dsa":
        from ddfast.eval.augment import normalize
        from ddfast.eval.dsa import DSAugment

        dsa = DSAugment(flip=flip, mode=dsa_mode or proto.dsa_mode)

        def augment(x, gen, group_gen):
            return dsa(normalize(x, mean, std), gen, group_gen)
    else:
        idc = Augment(out_size=size, flip=flip, jitter=0.4 if rgb else 0.0,
                      lighting=0.1 if rgb else 0.0, mean=mean, std=std)

        def augment(x, gen, group_gen):
            return idc(x, gen)
    return train, test, augment, size, flip


def evaluate(train_x, train_y, test_x, test_y, *, networks, repeats: int, epochs: int,
             protocol: str, device, seed: int, batch_size: int | None = None,
             progress: bool = False, flip: bool | None = None, dist=None,
             dataset: str | None = None, dsa_mode: str | None = None) -> dict:
    """Train every network ``repeats`` times on (train_x, train_y); test on (test_x, test_y).

    train_x: (N, C, H, W) uint8 or float [0, 1]; train_y: (N,) int; test likewise. ``epochs``
    0 takes the protocol's (``dc``: 1001 passes) or, for the IDC protocols, the epochs by IPC
    (the smallest class count of the train set); ``batch_size`` None takes the protocol's;
    ``dataset`` (``digits``, ``fashion-mnist``, ``mnist``; None = unknown) picks normalisation
    and the flip rule; ``flip`` overrides that rule; ``dsa_mode`` None takes the protocol's
    (``dc``: ``S``, one DSA group per batch; ``small``: ``idc``), ``M`` applies all groups.
    Every (network, repeat)
    gets its own seed derived from ``seed``.
    Returns a JSON-ready dict: per network ``best_mean/best_std/last_mean/last_std`` (percent,
    population std) and every run's curve. ``dist`` (a ``ddfast.distributed.Dist``) deals the
    (network, repeat) runs to the ranks in turn and gathers them: every rank returns the result.
    """
    proto = get_protocol(protocol)
    dsa_mode = dsa_mode or proto.dsa_mode
    networks = (networks,) if isinstance(networks, str) else tuple(networks)
    networks = networks or proto.networks
    batch_size = proto.batch_size if batch_size is None else batch_size
    for name, value, low in (("repeats", repeats, 1), ("batch_size", batch_size, 1),
                             ("epochs", epochs, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low} (epochs: 0 = by IPC), got "
                              f"{value!r}")
    dev = resolve_device(device)
    train_y = torch.as_tensor(train_y, dtype=torch.int64)
    test_y = torch.as_tensor(test_y, dtype=torch.int64)
    if train_y.shape[0] != train_x.shape[0] or test_y.shape[0] != test_x.shape[0]:
        raise DataError("images and labels differ in count: pass one label per image")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    counts = torch.bincount(train_y, minlength=num_classes)
    ipc = int(counts.min())
    if ipc == 0:
        raise DataError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no train "
                        "images: every test class needs train images")
    epochs = epochs or proto.epochs or epochs_for_ipc(ipc)
    start = time.perf_counter()
    train, test, augment, size, flip = _prepare(train_x, test_x, proto, dev, flip, dataset,
                                                dsa_mode)
    for net in networks:  # an unknown name fails now, not after hours of the first network
        _build(net, num_classes, test.shape[1], size, seed)
    train_y, test_y = train_y.to(dev), test_y.to(dev)
    out = {"protocol": protocol, "epochs": epochs, "batch_size": batch_size, "seed": seed,
           "device": str(dev), "ipc": ipc, "num_train": int(train.shape[0]),
           "num_test": int(test.shape[0]), "num_classes": num_classes, "resolution": size,
           "std": "population (ddof=0, as IDC)", "accuracy": "percent", "augment": proto.augment,
           "flip": flip, "dataset": dataset,
           "dsa_mode": dsa_mode if proto.augment == "dsa" else None,
           "networks": {}}
    jobs = [(k, r) for k in range(len(networks)) for r in range(repeats)]
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    mine = {job: _train_one(train, train_y, test, test_y, network=networks[job[0]],
                            num_classes=num_classes, epochs=epochs, augment=augment, device=dev,
                            seed=_seed_for(seed, *job), batch_size=batch_size,
                            progress=progress and rank == 0, proto=proto)
            for job in jobs[rank::world]}
    done = {job: run for part in (dist.gather_objects(mine) if world > 1 else [mine])
            for job, run in part.items()}
    for k, net in enumerate(networks):
        runs = [done[k, r] for r in range(repeats)]
        best_mean, best_std = mean_std(r["best"] for r in runs)
        last_mean, last_std = mean_std(r["last"] for r in runs)
        out["networks"][net] = {"best_mean": best_mean, "best_std": best_std,
                                "last_mean": last_mean, "last_std": last_std, "runs": runs}
    out["seconds"] = time.perf_counter() - start
    out["torch"] = torch.__version__
    return out


def train_classifier(train_x, train_y, test_x, test_y, *, network: str = "convnet3",
                     protocol: str = "dc", epochs: int, seed: int = 0, device="auto",
                     batch_size: int | None = None, flip: bool | None = None,
                     progress: bool = False, dataset: str | None = None):
    """One network trained by ``protocol``'s recipe for ``epochs`` on any number of images (the
    full training set, say). Returns (record, model in eval mode on the device, normalise), where
    ``normalise(x_uint8_or_unit)`` prepares images as the model saw them at test time."""
    from ddfast.eval.augment import norm_stats, normalize

    proto = get_protocol(protocol)
    dev = resolve_device(device)
    train_y = torch.as_tensor(train_y, dtype=torch.int64).to(dev)
    test_y = torch.as_tensor(test_y, dtype=torch.int64).to(dev)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train, test, augment, _, _ = _prepare(train_x, test_x, proto, dev, flip, dataset)
    record, model = _train_one(
        train, train_y, test, test_y, network=network, num_classes=num_classes, epochs=epochs,
        augment=augment, device=dev, seed=seed, batch_size=batch_size or proto.batch_size,
        progress=progress, proto=proto, keep_model=True)
    mean, std = norm_stats(train.shape[1], dataset)
    model.eval()
    return record, model, lambda x: normalize(_as_unit(x, "input", dev), mean, std)


# ----------------------------------------------------------------------------------- results


def _cell(net: dict) -> str:
    return (f"{net['best_mean']:.2f} ± {net['best_std']:.2f} "
            f"({net['last_mean']:.2f} ± {net['last_std']:.2f})")


def merge_tables(results_list: list[dict]) -> str:
    """One markdown table from several records (each carrying ``method`` and ``ipc``).

    Rows: method x IPC in the given order; columns: networks in first-seen order; cells
    "best mean ± std (last mean ± std)", percent; "-" where a row lacks a network.
    """
    nets: list[str] = []
    for r in results_list:
        nets += [n for n in r["networks"] if n not in nets]
    lines = ["| Method | IPC | " + " | ".join(nets) + " |",
             "|---|---:|" + "---:|" * len(nets)]
    for r in results_list:
        cells = [_cell(r["networks"][n]) if n in r["networks"] else "-" for n in nets]
        lines.append(f"| {r['method']} | {r['ipc']} | " + " | ".join(cells) + " |")
    note = ("Top-1 test accuracy (%), best over training (last in parentheses), mean ± "
            "population std over repeats.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_results(out_dir, results: dict, *, method: str, ipc) -> dict:
    """Write ``results.json`` and ``results.md`` into ``out_dir`` atomically.

    ``ipc`` is the row label (an int, or e.g. "full"). Returns the record written (the results
    plus ``method`` and ``ipc``), ready for :func:`merge_tables`.
    """
    record = {**results, "method": method, "ipc": ipc}
    out = Path(out_dir)
    write_json(out / "results.json", record)
    write_text(out / "results.md", merge_tables([record]))
    return record
