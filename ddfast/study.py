"""``python -m ddfast.study``: the results study on real data that installs offline.

    python -m ddfast.study --dataset digits --scale cpu --out results/digits
    python -m ddfast.study --dataset fashion-mnist --scale cpu-latent \\
        --out results/fashion-mnist-latent
    python -m ddfast.study --dataset fashion-mnist --scale full --out results/fashion-mnist-full

One class-conditional DiT is trained from scratch on the training split (in pixels, or on the
latents of an autoencoder trained first where the scale's settings name one), and from
that same model come the distilled sets of every method: ``random`` (the first IPC real images of
each class), ``dit`` (the model sampled without fine-tuning), ``minimax`` (fifo memories) and
``ours`` (adaptive memories, updated every step as the released code, or per epoch as the paper's
figure says). Each set trains fresh ConvNet-3 classifiers under the DC/DSA recipe (``dc``) and,
where the scale asks, the IDC recipe (``small``); the full training set gives the upper bound and
the feature space in which the diversity of each set is measured (``ddfast.eval.diversity``).
Ablations sweep lambda_r, lambda_g and the two memory capacities around their defaults at IPC 10.

A repeat ``r`` fine-tunes with ``run.seed=r``, samples with ``sample.seed=r`` and seeds the
classifier with ``r``; ``random`` varies only the classifier. Every cell (a run, an evaluation)
is written when it finishes and skipped when found, so a killed study resumes by rerunning the
same command; ``--report`` rebuilds the table and plots from the cells on disk. Nothing is tuned
on the test split: the settings are the method's defaults, and where a scale chooses its sampling
setting it chooses on training images held out of every run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from ddfast.config import Config, resolve
from ddfast.errors import ConfigError, DdfastError
from ddfast.io import load_tensors, read_jsonl, save_tensors, write_json, write_text
from ddfast.models import VAE_PRESETS
from ddfast.progress import log

METHODS = ("random", "dit", "minimax", "ours-step", "ours-epoch")
# Fashion-MNIST, ConvNet-3, IPC 1 / 10 / 50, as published (DC/DSA evaluation).
PUBLISHED = {
    "fashion-mnist": {"DC": (70.5, 82.3, 83.6), "DSA": (70.6, 84.6, 88.7),
                      "IDC": (81.0, 86.0, 86.2), "KIP (trained with a net)": (73.8, 86.8, 87.8)},
}
PUBLISHED_IPC = (1, 10, 50)


@dataclass(frozen=True)
class Scale:
    """How much of the study to run."""

    ipc: tuple[int, ...]
    repeats: int
    protocols: tuple[str, ...]  # dc and/or small (IDC)
    full_epochs: int  # epochs of the full-data classifier
    ablations: bool
    eval_epochs: int = 0  # 0 = the protocol's own
    base: dict = field(default_factory=dict)  # ddfast.train overrides of every run
    sweep: tuple[float, ...] = (0.25, 4.0)  # ablation factors around each default
    small_repeats: int = 0  # repeats under the IDC recipe (``small``); 0 = ``repeats``
    small_ipc: tuple[int, ...] = ()  # IPCs evaluated under the IDC recipe; () = every IPC
    ablation_repeats: int = 0  # repeats of each ablation point; 0 = ``repeats``
    quality_per_class: int = 100  # generator quality: images per class sampled and measured
    full_batch: int = 0  # batch of the full-data classifier; 0 = the recipe's
    holdout: int = 0  # validation images per class, held out of every run (data.holdout)
    # Sampling settings to choose from on the validation split: (guidance scale, sampler,
    # steps), or (guidance scale, sampler, steps, "lo,hi") for guidance only inside timesteps
    # lo..hi. Empty: the preset's settings, no choice made.
    sampling_grid: tuple[tuple, ...] = ()
    # How the grid's point is chosen, both on the held-out images: "fd", the lowest Fréchet
    # distance of the setting's samples to them; "accuracy", the highest accuracy on them of a
    # ConvNet-3 trained (DC/DSA recipe) on the setting's first 10 samples per class, what the
    # distilled sets are for (the two disagree: Fréchet distance rewards recall, the sets
    # fidelity).
    sampling_criterion: str = "fd"
    val_per_class: int = 50  # images per class sampled for each candidate setting
    # lambda_g at these multiples of its default (ours, per step, repeat 0, IPC 10): how strong
    # must the diversity term be before it visibly changes the samples?
    lambda_g_factors: tuple[float, ...] = ()
    # IPCs measured once (repeat 0): each set is sampled by a run of its own from the model of
    # the method's repeat-0 run, so that run, and the cells of the other IPCs, keep their
    # settings when a larger IPC is added.
    ipc_once: tuple[int, ...] = ()
    # ours-epoch refreshes its memories this many times over fine-tuning, evenly spaced, where
    # fine-tuning is shorter than that many passes over the data (0: at each pass's end). The
    # paper fine-tunes 8 epochs; a few hundred steps on Fashion-MNIST are a fraction of one.
    epoch_refreshes: int = 0
    # The exact-generator reference at IPC 10 (DC/DSA recipe, computed with ``random``): real
    # training images drawn as a generator that matched its training data exactly would draw
    # them under classifier-free guidance g, ``exact_draws`` sets each (inf: one set, each
    # class's most confident images). What the best generator sampled this way can score.
    exact_guidance: tuple[float, ...] = ()
    exact_draws: int = 3
    # The same draws (``exact_draws`` at each of these guidance scales, a classifier seed per
    # draw) under the IDC recipe too: whether its augmentation leaves a perfect generator the
    # margin the DC/DSA recipe gives it.
    exact_small: tuple[float, ...] = ()
    # Latent scales: the exact generator's draws at these guidance scales, encoded and decoded
    # (posterior mean) by the study's own autoencoder, under each of the study's recipes at IPC
    # 10: what a DiT that matched its training latents exactly would score, the autoencoder's
    # loss included.
    exact_roundtrip: tuple[float, ...] = ()
    # The generator's closest samples at IPC 10 (DC/DSA recipe, computed with ``dit``): from a
    # pool of ``matched_pool`` samples per class of the from-scratch model (the chosen sampling
    # setting, repeat 0's seeds), for each image of the random-real set the nearest sample not
    # yet taken (full-data classifier features). A set chosen with the real images' help, so a
    # measurement, not a method: what this generator's samples can score when they stand as
    # close as they can to real images, against what real images score. 0: not computed.
    matched_pool: int = 0
    # Prototype selection (``ddfast.select``), a departure from the paper's sampler (one seed
    # per image) measured beside it: from a pool of ``select_pool`` samples per class of each
    # method's model (repeat r's seeds, the chosen sampling setting), the sample nearest each of
    # IPC k-means centres of the class's training images (the full-data classifier's
    # features), at ``select_ipc`` under the recipes ``select_protocols`` (those of
    # ``protocols``, each with its repeats and IPCs); with ``random``, the real training
    # images nearest the same centres (one set, a classifier seed per repeat), the coreset such
    # a pick competes with. 0: not computed.
    select_pool: int = 0
    select_ipc: tuple[int, ...] = (1, 10)
    select_protocols: tuple[str, ...] = ("dc",)
    # Larger pools (sizes above ``select_pool``) picked from the same way, at
    # ``larger_pool_ipc`` (those of ``select_ipc``) under the same recipes and repeats, for
    # every generated method: how much nearer each prototype a sample can be found when more
    # are drawn. A pool of n draws the same seeds on, so it holds every smaller pool's samples
    # (the one-to-one pick can still place a single item farther).
    larger_pools: tuple[int, ...] = ()
    larger_pool_ipc: tuple[int, ...] = (10,)
    # Anchored generation (D4M's route, ``ddfast.select.cluster_anchors``), measured beside
    # prototype selection at its IPCs and recipes: each method's model starts image i of a class
    # from the mean training image of the class's i-th k-means prototype, noised to a strength
    # chosen from ``anchor_grid`` on the held-out images (the from-scratch model's IPC-10 set,
    # highest held-out accuracy under the DC/DSA recipe; ties to the higher strength, the more
    # generated). Empty: not computed.
    anchor_grid: tuple[float, ...] = ()
    # Candidate generators (name -> overrides of ``base``), each trained from scratch in a study
    # of its own under ``<out>/generators/<name>`` and judged by this study's measures: its
    # samples at the chosen sampling setting against the held-out images, and its IPC-10 set
    # (seed 0, no fine-tuning) under the DC/DSA recipe, beside the exact generator. Computed only
    # when asked for (``--generators``): each costs a generator's training.
    generators: dict = field(default_factory=dict)
    # Sampling settings off the chosen one, (tag, overrides) each, at which every generator of
    # the candidates' table (this study's too) also draws its IPC-10 set (seed 0) for the
    # DC/DSA recipe. Measured on the test split, so never chosen from: they show how far
    # sampling alone moves a generator, and are computed only with ``--generators``.
    generator_probes: tuple[tuple[str, dict], ...] = ()

    def __post_init__(self):
        if self.exact_small and "small" not in self.protocols:
            raise ValueError("Scale.exact_small evaluates under the IDC recipe, which this scale's "
                             "protocols lack; add \"small\" to protocols or drop exact_small")
        if self.exact_roundtrip and self.base.get("model.vae", "none") == "none":
            raise ValueError("Scale.exact_roundtrip goes through the study's autoencoder, and this "
                             "scale's generator has none (base model.vae); drop exact_roundtrip "
                             "or give the scale a latent generator")
        # A pool at or below select_pool holds no sample the selection pool lacks (the same
        # seeds drawn on), so its row could not show what more samples buy; an IPC outside
        # select_ipc has no pool-of-select_pool row to stand beside.
        if self.larger_pools and not self.select_pool:
            raise ValueError("Scale.larger_pools needs select_pool: the larger pools repeat "
                             "prototype selection; set select_pool or drop larger_pools")
        small = [n for n in self.larger_pools if n <= self.select_pool]
        if small:
            raise ValueError(f"Scale.larger_pools {small} are not above select_pool "
                             f"({self.select_pool}); give sizes above it")
        if self.larger_pools and not set(self.larger_pool_ipc) <= set(self.select_ipc):
            raise ValueError(f"Scale.larger_pool_ipc {self.larger_pool_ipc} names IPCs that "
                             f"select_ipc {self.select_ipc} does not select at; take them from "
                             "select_ipc")

    def repeats_of(self, protocol: str) -> int:
        return (self.small_repeats or self.repeats) if protocol == "small" else self.repeats

    def evaluates(self, protocol: str, ipc: int) -> bool:
        """Whether cells of ``ipc`` are evaluated under ``protocol``."""
        return protocol != "small" or not self.small_ipc or ipc in self.small_ipc


def _candidate(dit: str, patch: int, batch: int, lr: str, steps: int) -> dict:
    """A candidate generator's overrides: a DiT preset, its patch size and its pretraining, in
    bf16 autocast."""
    return {"model.dit": dit, "model.patch_size": str(patch), "run.precision": "bf16",
            "pretrain.batch_size": str(batch), "pretrain.lr": lr, "pretrain.steps": str(steps)}


NOFLIP = {"data.hflip": "false"}  # overrides the committed cpu study's flips (its base)
# The cpu study's runs (Fashion-MNIST); they trained on mirrored images, the preset's default then.
FMNIST_CPU_BASE = {"data.hflip": "true",
                   "model.dit": "micro", "model.patch_size": "4", "pretrain.steps": "8000",
                   "pretrain.lr": "2e-3", "pretrain.batch_size": "128", "pretrain.warmup": "500",
                   "pretrain.ema_decay": "0.999", "optim.steps": "300", "sample.batch_size": "500"}
# The cells of both Fashion-MNIST cpu studies (pixel and latent generator), the extras aside.
FMNIST_CPU_CELLS = dict(ipc=(1, 10), repeats=3, protocols=("dc", "small"), small_repeats=3,
                        small_ipc=(1, 10), full_epochs=4, full_batch=64, ablations=False,
                        holdout=500, val_per_class=50, ipc_once=(50,),
                        lambda_g_factors=(25.0, 250.0), epoch_refreshes=8)
# Latent space: a factor-4 autoencoder trained first (28 px to 7x7x4, ddfast.autoencoder), then
# the DiT on its latents with 1x1 patches (the same 49 tokens, each a 4x4-pixel patch's code).
LATENT_F4 = {"model.vae": "small-f4", "model.patch_size": "1", **NOFLIP}


# By scale, then dataset. ``base`` holds the ddfast.train overrides of every run of the study.
SCALES = {
    "full": {
        "digits": Scale(ipc=(1, 10, 50), repeats=3, protocols=("dc", "small"), full_epochs=300,
                        ablations=True),
        "fashion-mnist": Scale(ipc=(1, 10, 50), repeats=3, protocols=("dc", "small"),
                               full_epochs=50, ablations=True, epoch_refreshes=8,
                               select_pool=200),
    },
    # Sized for 2 CPU cores: digits complete at IPC 1 and 10 (the IDC recipe, 1000 epochs,
    # once per method; ablation points twice). Fashion-MNIST: a micro DiT with 4x4 patches
    # (49 tokens; 7x7 patches, 16 tokens, sampled smudges: a token of 49 pixels is too much for
    # a hidden size of 128) trained for 8,000 steps of 128 (17 epochs, about 80 min of one
    # core); 500 training images per class held out to choose the sampling settings; the
    # full-data classifier 4 epochs at batch 64 (91.1 % on the test split, 18 min); the DC/DSA
    # recipe (about 12 min of one core per IPC-10 evaluation) with 3 repeats at IPC 1 and 10, and
    # the IDC recipe beside it, also 3 repeats at IPC 1 and 10 (2,000 steps with CutMix at IPC
    # 10, 12 to 17 min); the exact-generator reference at IPC 10 (guidance 1, 2, 4: three
    # draws each; inf: one set; 10 DC evaluations, about 2 h of one core), the draws at
    # guidance 2 and 4 under the IDC recipe too (6 evaluations); no ablations.
    "cpu": {
        "digits": Scale(ipc=(1, 10), repeats=3, protocols=("dc", "small"), full_epochs=100,
                        ablations=True, small_repeats=1, ablation_repeats=2,
                        lambda_g_factors=(0.0, 25.0, 250.0, 2500.0)),
        "fashion-mnist": Scale(
            **FMNIST_CPU_CELLS,
            exact_guidance=(1.0, 2.0, 4.0, math.inf), exact_draws=3, exact_small=(2.0, 4.0),
            matched_pool=200, select_pool=200, select_protocols=("dc", "small"),
            larger_pools=(1000,),
            anchor_grid=(0.1, 0.2, 0.3, 0.5, 0.7),
            sampling_grid=((1.0, "ddpm", 50), (2.0, "ddpm", 50), (3.0, "ddpm", 50),
                           (4.0, "ddpm", 50), (6.0, "ddpm", 50), (2.0, "ddim", 50),
                           (4.0, "ddim", 50), (2.0, "ddpm", 25), (2.0, "ddpm", 100)),
            # Candidate generators at about this one's training time (80 to 95 min of one core,
            # bf16 autocast): 4x the width, or 2x2 patches (196 tokens).
            generators={
                "mini": _candidate("mini", 4, 64, "1e-3", 7000),
                "micro-p2": _candidate("micro", 2, 64, "1e-3", 4500),
                # A GPU's minutes (bench/gpu-generators.sh), each several times the images
                # the study's generator saw: the mini width on 3.1 M images, and DiT-S's depth
                # and width (12 x 384) with 4x4 patches on 2 M.
                "mini-gpu": _candidate("mini", 4, 512, "1e-3", 6000),
                "s-gpu": _candidate("S/2", 4, 512, "5e-4", 4000),
                # Neither moved the IPC-10 set by a point (71.9, 72.0 against 71.2): the next
                # are finer patches (196 tokens of 4 pixels; DiT's own finding: patch size buys
                # more than width) and twice mini-gpu's images (6.1 M, about 5 min of an H200).
                # Both without mirrored images, as micro-noflip below found better.
                "mini-p2-gpu": {**_candidate("mini", 2, 512, "1e-3", 4000), **NOFLIP},
                "mini-gpu-long": {**_candidate("mini", 4, 512, "1e-3", 12000), **NOFLIP},
                # This study's generator without mirrored training images: Fashion-MNIST's
                # shoes all face one way (93-100 % of sandals, sneakers and ankle boots agree
                # with their class mean over its mirror image), and a generator trained on
                # flips draws half of them mirrored.
                "micro-noflip": NOFLIP,
                # Latent space (LATENT_F4; the autoencoder takes about 12 min of one core).
                "latent-f4": LATENT_F4,
                # Its autoencoder trained twice as long, the rate falling to 0 on a half cosine:
                # the round trip costs latent-f4's sets a point, and its loss still fell.
                "latent-f4-cosine": {**LATENT_F4, "pretrain.vae_steps": "6000",
                                     "pretrain.vae_decay": "cosine"},
                # Its round trip scored as latent-f4's (74.8 against 74.9): the next is twice
                # the latent channels, so guided on all of them (the original DiT's first 3 of
                # 4 would leave 5 of 8 unguided).
                "latent-f4-c8": {**LATENT_F4, "model.vae": "small-f4-c8",
                                 "pretrain.vae_steps": "6000", "pretrain.vae_decay": "cosine",
                                 "sample.guidance_channels": "all"},
                # Neither sharper autoencoder moved the sets: the next is latent-f4's DiT
                # trained twice as long (its loss still fell at 8,000 steps). The rate is
                # constant after warm-up, so the first 8,000 steps are latent-f4's run.
                "latent-f4-long": {**LATENT_F4, "pretrain.steps": "16000"},
                # It did not either (75.3 against 75.4), nor did the sampling setting or a
                # decoder fine-tuned on the frozen encoder: what is left is capacity and images.
                # A GPU's minutes: latent-f4's settings (its autoencoder, trained first in the
                # run as there) with the mini width (4x micro's) on six times its images
                # (12,000 steps of 512).
                "latent-mini-gpu": {**LATENT_F4, **_candidate("mini", 1, 512, "1e-3", 12000)}},
            # Guidance 6 inside timesteps 80-580 only (sigma in about 0.28 to 5.4).
            generator_probes=(("-g6-interval80-580", {"sample.guidance_scale": "6",
                                                       "sample.guidance_interval": "80,580"}),),
            base=FMNIST_CPU_BASE),
    },
    # The cpu study again with the latent generator its candidates found best (``latent-f4``:
    # the same DiT on a factor-4 autoencoder's latents, trained without mirrored images), its
    # sampling setting chosen on the held-out images by the accuracy of a classifier trained on
    # each setting's IPC-10 set (the criterion the cpu study's measurements argue for). The
    # measurements that do not depend on the generator (exact generator, candidates) stay the
    # cpu study's, but for the exact generator's draws at guidance 2 and 4 through this study's
    # autoencoder under both recipes (the pixel study's draws, the same classifier and pool;
    # 12 evaluations): what a DiT that matched these latents exactly would score. IPC 50 once
    # per method, as there.
    "cpu-latent": {
        "fashion-mnist": Scale(
            **FMNIST_CPU_CELLS, sampling_criterion="accuracy",
            exact_roundtrip=(2.0, 4.0),
            sampling_grid=((1.0, "ddpm", 50), (1.5, "ddpm", 50), (2.0, "ddpm", 50),
                           (3.0, "ddpm", 50), (2.0, "ddim", 50),
                           (4.0, "ddpm", 50, "80,580"), (6.0, "ddpm", 50, "80,580")),
            base={**FMNIST_CPU_BASE, **LATENT_F4}),
    },
    # Seconds, for tests: everything tiny.
    "smoke": {
        "digits": Scale(ipc=(1, 10), repeats=1, protocols=("dc",), full_epochs=1,
                        ablations=True, eval_epochs=2, sweep=(4.0,), quality_per_class=8,
                        ipc_once=(20,), epoch_refreshes=2,
                        holdout=5, val_per_class=6, lambda_g_factors=(0.0, 100.0),
                        exact_guidance=(2.0, math.inf), exact_draws=2, matched_pool=12,
                        select_pool=12, larger_pools=(24,), anchor_grid=(0.3, 0.6),
                        sampling_grid=((1.0, "ddpm", 5), (2.0, "ddim", 5)),
                        generators={"longer": {"pretrain.steps": "40"},
                                    "latent": {"model.vae": "small-f4", "model.patch_size": "1",
                                               "pretrain.vae_steps": "20"}},
                        generator_probes=(("-g4-interval0-500",
                                           {"sample.guidance_scale": "4",
                                            "sample.guidance_interval": "0,500"}),), base={
                            "data.max_per_class": "40", "pretrain.steps": "30",
                            "optim.steps": "10", "sample.steps": "5",
                            "memory.real_capacity": "4", "memory.gen_capacity": "4"}),
    },
}
DATASETS = {"digits": {"preset": "digits", "flip": False},
            "fashion-mnist": {"preset": "fashion-mnist", "flip": True}}
ABLATED = ("objective.lambda_r", "objective.lambda_g", "memory.real_capacity",
           "memory.gen_capacity")
REAL_PER_CLASS = 1000  # real images per class in the diversity reference


EXACT_IPC = 10  # the IPC of the exact-generator reference
ROUNDTRIP = "roundtrip"  # cells of real images through a latent generator's autoencoder


class ExactPoint(NamedTuple):
    """One exact-generator cell: draw ``draw`` at ``guidance``, under ``protocol``, through the
    autoencoder or not (``roundtrip``), cached as ``evals/<key>.json``."""
    guidance: float
    draw: int
    protocol: str
    roundtrip: bool
    key: str


def exact_draw(own: torch.Tensor, labels: torch.Tensor, ipc: int, guidance: float, draw: int,
               num_classes: int) -> torch.Tensor:
    """Positions of ``ipc`` pool items per class, class by class, drawn without replacement as
    classifier-free guidance ``guidance`` on an exact model of the pool would draw them.

    Guidance g samples p(x|c) p(c|x)^(g-1): within class c's items (p(x|c) uniform over them),
    item i has weight own[i]^(g-1), own (N,) = p(labels[i] | x_i). g = 1 is a uniform draw;
    g = inf takes the ``ipc`` items of highest own (ties by position). Draw ``draw`` of class c
    uses a generator seeded 1000 * draw + c, so a set does not depend on the other classes.
    """
    picks = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel() < ipc:
            raise ConfigError(f"class {c} has {members.numel()} pool images, fewer than IPC {ipc}")
        weight = own[members].double()
        if math.isinf(guidance):
            order = torch.sort(weight, descending=True, stable=True).indices
            picks.append(members[order[:ipc]])
        else:
            gen = torch.Generator().manual_seed(1000 * draw + c)
            chosen = torch.multinomial(weight ** (guidance - 1), ipc, replacement=False,
                                       generator=gen)
            picks.append(members[chosen])
    return torch.cat(picks)


SAMPLING_CRITERIA = ("fd", "accuracy")


def _grid_point(entry) -> tuple[float, str, int, str]:
    """A sampling-grid entry as (guidance, sampler, steps, interval), interval "" for none."""
    guidance, sampler, steps, *rest = entry
    return float(guidance), sampler, int(steps), rest[0] if rest else ""


def _grid_key(point: dict) -> tuple[float, str, int, str]:
    """The grid entry a point of ``sampling.json`` measured (older files have no interval)."""
    return (float(point["guidance_scale"]), point["sampler"], int(point["steps"]),
            point.get("interval", ""))


def method_overrides(method: str) -> dict:
    if method == "dit":
        return {"objective.method": "dit"}
    if method == "minimax":
        return {"objective.method": "minimax"}
    return {"objective.method": "ours", "memory.timing": method.split("-")[1]}


class Study:
    def __init__(self, dataset: str, scale: str, out: Path, device: str = "auto",
                 root: str | None = None, progress: bool = False, repeats: int = 0,
                 compile: bool = False):
        if dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {dataset!r}: pass one of {', '.join(DATASETS)}")
        if dataset not in SCALES.get(scale, {}):
            known = [f"{s}/{d}" for s, by in SCALES.items() for d in by]
            raise ConfigError(f"no scale {scale!r} for {dataset}: pass one of {', '.join(known)}")
        self.dataset, self.scale_name, self.scale = dataset, scale, SCALES[scale][dataset]
        if repeats:  # the first ``repeats`` of every recipe
            self.scale = replace(self.scale, repeats=repeats,
                                 small_repeats=min(self.scale.repeats_of("small"), repeats))
        self.out, self.work = Path(out), Path(out) / "work"
        self.device, self.root, self.progress = device, root, progress
        self.flip = DATASETS[dataset]["flip"]
        if self.scale.ablations and 10 not in self.scale.ipc:
            raise ConfigError("the ablations run at IPC 10: include 10 in the scale's IPCs")
        self.base = dict(self.scale.base)
        if self.scale.holdout:
            self.base["data.holdout"] = str(self.scale.holdout)
        if self.scale.sampling_grid and not self.scale.holdout:
            raise ConfigError("a sampling grid is chosen on held-out images: set the scale's "
                              "holdout")
        if root:
            self.base["data.root"] = root
        if device != "auto":
            self.base["run.device"] = device
        self.compile = compile
        if compile:  # like the device, not a setting that decides results (Config.digest)
            self.base["run.compile"] = "true"
        self.base["run.progress"] = "on" if progress else "off"
        self._data = self._real = self._full = self._test_f = self._val = self._means = None
        self._pool = self._train_f = self._vae = None
        self._anchors: dict[int, dict] = {}
        self._sampling = None
        # Compute runs, not evaluations (``--runs-only``): the classifier cells and the test-split
        # quality cells are left for wherever the sets are evaluated.
        self.runs_only = False

    # ------------------------------------------------------------------------------ runs
    def config(self, name: str, overrides: dict, pretrain_only: bool = False):
        base = {k: v for k, v in self.base.items()
                if not (pretrain_only and k.startswith(("optim.", "memory.")))}
        o = {**base, "eval.enabled": "false", "run.out": str(self.work / name), **overrides}
        return resolve(DATASETS[self.dataset]["preset"], o)

    def train_run(self, name: str, overrides: dict, pretrain_only: bool = False,
                  needs: str = "distilled") -> Path:
        """A ddfast.train run, skipped when its summary exists with the same settings and the
        output the study reads from it (``needs``: a file or folder of the run) is on disk.

        A clean checkout holds each run's summary, config and log but only the outputs that are
        committed (the from-scratch DiT, the distilled sets): a run whose output is missing is
        computed again, and its new log is checked against the committed one."""
        from ddfast.train import run

        cfg = self.config(name, overrides, pretrain_only)
        folder = Path(cfg.run.out)
        committed = None
        if self.finished(name, overrides, pretrain_only, needs):
            return folder
        if (folder / "summary.json").is_file():
            log(f"[study] run {name}: its {needs} is not on disk; computing the run again")
            committed = read_jsonl(folder / "metrics.jsonl")
        else:
            log(f"[study] run {name}")
        run(cfg, resume=folder.is_dir())  # its summary.json records the time of each stage
        if committed:
            _compare_logs(name, committed, read_jsonl(folder / "metrics.jsonl"))
        return folder

    def finished(self, name: str, overrides: dict, pretrain_only: bool = False,
                 needs: str = "distilled") -> bool:
        """Whether run ``name`` finished with these settings and its ``needs`` is on disk; a
        finished run of other settings is refused."""
        cfg = self.config(name, overrides, pretrain_only)
        folder = Path(cfg.run.out)
        summary = folder / "summary.json"
        if not summary.is_file():
            return False
        digest = json.loads(summary.read_text())["config_digest"]
        if digest != cfg.digest():
            stored = folder / "config.json"
            old = json.loads(stored.read_text()) if stored.is_file() else None
            if old is None or Config.from_dict(old).digest() != digest \
                    or _in_study(old) != _in_study(cfg.to_dict()):
                raise ConfigError(f"{folder} holds a run with other settings (digest {digest}, "
                                  f"expected {cfg.digest()}): delete it or use another --out")
            # The same settings in a study that moved (a clone, another --out path): its paths
            # into the study's own folder are written anew so that the run resumes here.
            log(f"[study] run {name}: the study moved; its paths now point into {self.work}")
            write_text(stored, cfg.to_json())
            write_json(summary, {**json.loads(summary.read_text()),
                                 "config_digest": cfg.digest(), "run_folder": str(folder)})
        return (folder / needs).exists()

    def pretrained(self) -> Path:
        # Fine-tuning settings do not reach the from-scratch model, so they stay out of its run.
        folder = self.train_run("base", {"objective.method": "dit", "sample.ipc": "1"},
                                pretrain_only=True, needs="pretrained")
        return folder / "pretrained"

    def from_pretrained(self, name: str, overrides: dict, needs: str = "distilled") -> Path:
        """Run ``name`` from the from-scratch model (``overrides`` without ``model.dit``). A
        finished run is read as it is: the model's weights are needed (and trained when absent)
        only to compute it, so the sets of a generator trained on another machine, whose weights
        stay there, are evaluated here."""
        o = {"model.dit": str(self.work / "base" / "pretrained"), **overrides}
        if not self.finished(name, o, needs=needs):
            self.pretrained()
        return self.train_run(name, o, needs=needs)

    def method_run(self, method: str, repeat: int, extra: dict | None = None,
                   tag: str = "", ipc: tuple[int, ...] | None = None,
                   needs: str = "distilled") -> Path:
        """The run folder of one method and repeat (fine-tuned, then sampled at ``ipc``)."""
        o = {"run.seed": str(repeat), "sample.seed": str(repeat), **self.sampling(),
             "sample.ipc": ",".join(str(i) for i in (ipc or self.scale.ipc)),
             **method_overrides(method), **(extra or {})}
        if method == "ours-epoch" and self.scale.epoch_refreshes:
            from ddfast.train import finetune_steps

            cfg = self.config("probe", o)  # the steps depend on the data, not the model
            steps = cfg.optim.steps or finetune_steps(cfg, self._training_images(cfg))
            o["memory.refresh_every"] = str(max(1, steps // self.scale.epoch_refreshes))
        return self.from_pretrained(f"{method}{tag}-r{repeat}", o, needs=needs)

    def distilled(self, method: str, repeat: int, extra: dict | None = None,
                  tag: str = "", ipc: tuple[int, ...] | None = None) -> Path:
        return self.method_run(method, repeat, extra, tag, ipc) / "distilled"

    def resampled(self, method: str, repeat: int, ipc: int) -> Path:
        """The distilled set of one of the scale's ``ipc_once`` IPCs: the model of the method's
        run (the from-scratch DiT for ``dit``) sampled at ``ipc`` with the same seeds."""
        name = f"{method}-r{repeat}-ipc{ipc}"
        o = {"run.seed": str(repeat), "sample.seed": str(repeat), **self.sampling(),
             "sample.ipc": str(ipc), "objective.method": "dit"}
        if method == "dit":
            return self.from_pretrained(name, o) / "distilled"
        o["model.dit"] = str(self.work / f"{method}-r{repeat}" / "model")
        if not self.finished(name, o):
            self.method_run(method, repeat, needs="model")  # its model, computed if missing
        return self.train_run(name, o) / "distilled"

    def _training_images(self, cfg) -> int:
        """How many images a run of ``cfg`` trains on."""
        from ddfast.train import training_indices

        train, _, _ = self.data()
        labels = torch.as_tensor(train.labels)
        return len(training_indices(labels, cfg.data.max_per_class, cfg.data.holdout))

    # ------------------------------------------------------------------------------ data
    def data(self):
        if self._data is None:
            from ddfast.data import open_source

            kw = {"root": self.root} if self.root else {}
            train = open_source(self.dataset, "train", **kw)
            test = open_source(self.dataset, "test", **kw)
            test_x = test.images(range(len(test)))
            self._data = (train, test_x, test.labels)
        return self._data

    def full_classifier(self):
        """The full-data ConvNet-3: the upper bound, and the diversity feature space."""
        if self._full is not None:
            return self._full
        from ddfast.eval.networks import build_network
        from ddfast.eval.protocol import get_protocol, resolve_device, train_classifier

        train, test_x, test_y = self.data()
        folder = self.work / "full"
        rec_path, w_path = folder / "result.json", folder / "convnet3.safetensors"
        dev = resolve_device(self.device)
        batch = self.scale.full_batch or get_protocol("dc").batch_size
        if rec_path.is_file() and w_path.is_file():
            record = json.loads(rec_path.read_text())
            had = (record["epochs"], record.get("batch_size", get_protocol("dc").batch_size))
            if had != (self.scale.full_epochs, batch):
                raise ConfigError(f"{folder} holds a full-data classifier of {had[0]} epochs at "
                                  f"batch {had[1]}, this scale asks {self.scale.full_epochs} at "
                                  f"{batch}: delete {folder} or use another --out")
            model = build_network("convnet3", num_classes=len(train.class_names),
                                  channels=train.channels, resolution=train.resolution)
            model.load_state_dict(load_tensors(w_path)[0])
            model = model.to(dev).eval()
        else:
            log(f"[study] full training set: ConvNet-3, {self.scale.full_epochs} epochs")
            t = time.perf_counter()
            x = train.images(range(len(train)))
            record, model, _ = train_classifier(
                x, train.labels, test_x, test_y, protocol="dc", epochs=self.scale.full_epochs,
                batch_size=self.scale.full_batch or None, seed=0, device=dev, flip=self.flip,
                progress=self.progress, dataset=self.dataset)
            record = {**record, "num_train": len(train), "batch_size": batch,
                      "seconds": time.perf_counter() - t}
            save_tensors(w_path, {k: v.detach().cpu().contiguous() for k, v in
                                  model.state_dict().items()}, {"network": "convnet3"})
            write_json(rec_path, record)
        self._full = (record, model)
        return self._full

    def real_features(self):
        """Features and labels of the first REAL_PER_CLASS training images of each class."""
        from ddfast.eval.protocol import first_per_class

        if self._real is None:
            train, _, _ = self.data()
            counts = torch.bincount(train.labels)
            idx = first_per_class(train.labels, min(REAL_PER_CLASS, int(counts.min())),
                                  len(train.class_names))
            self._real = (self._features(train.images(idx)), train.labels[idx])
        return self._real

    def _normalised(self, x):
        """x uint8 / [0, 1] as the full-data classifier saw its inputs, on its device."""
        from ddfast.eval.augment import norm_stats, normalize

        _, model = self.full_classifier()
        dev = next(model.parameters()).device
        mean, std = norm_stats(x.shape[1], self.dataset)
        return normalize(x.to(dev).float() / 255.0, mean, std)

    def _features(self, x):
        from ddfast.eval.diversity import features

        _, model = self.full_classifier()
        return features(model, self._normalised(x)).cpu()

    def test_features(self):
        """The full-data classifier's features of every test image: the quality reference."""
        if self._test_f is None:
            _, test_x, _ = self.data()
            self._test_f = self._features(test_x)
        return self._test_f

    # ------------------------------------------------------------------------------ cells
    def evaluate_cell(self, key: str, x, y, protocol: str, seed: int) -> dict | None:
        """One classifier (ConvNet-3) on one set; with the set's diversity. Cached by key; None
        for a missing cell under ``runs_only``."""
        from ddfast.eval.diversity import set_diversity
        from ddfast.eval.protocol import evaluate

        path = self.work / "evals" / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if self.runs_only:
            return None
        _, test_x, test_y = self.data()
        log(f"[study] evaluate {key}")
        res = evaluate(x, y, test_x, test_y, networks=("convnet3",), repeats=1,
                       epochs=self.scale.eval_epochs, protocol=protocol, device=self.device,
                       seed=seed, flip=self.flip, progress=self.progress, dataset=self.dataset)
        real_f, real_y = self.real_features()
        div = set_diversity(real_f, real_y, self._features(x), y)
        net = res["networks"]["convnet3"]
        cell = {"key": key, "protocol": protocol, "seed": seed, "ipc": res["ipc"],
                "acc_best": net["best_mean"], "acc_last": net["last_mean"],
                "epochs": res["epochs"], "seconds": res["seconds"],
                "threads": torch.get_num_threads() if torch.device(res.get("device", "cpu")).type
                == "cpu" else 0,
                # The machine: rounding, so a cell's figures, differ between kinds of CPU.
                "machine": device_name(str(res.get("device", "cpu"))),
                "pairwise": div["pairwise"], "coverage": div["coverage"]}
        write_json(path, cell)
        return cell

    def quality_cell(self, key: str, x, y, against: str = "test") -> dict | None:
        """Fidelity, Fréchet distance, precision, recall and coverage of the images x (labels y)
        against the test images (or the held-out validation images, ``against="val"``), in the
        full-data classifier's features. Cached by key under ``quality/`` (``sampling/``); None
        for a missing test-split cell under ``runs_only``."""
        from ddfast.eval.quality import quality

        folder = "quality" if against == "test" else "sampling"
        path = self.work / folder / f"{key}.json"
        if path.is_file():
            cell = json.loads(path.read_text())
            if "facing" in cell:
                return cell
            # A cell measured before the facing measure existed: the one missing value is
            # added (the images are at hand), the others are kept as they were.
            log(f"[study] quality {key}: adding which way its items face")
            cell["facing"] = self.facing(x, y)
            write_json(path, cell)
            return cell
        if self.runs_only and against == "test":
            return None
        log(f"[study] quality {key} against the {against} images")
        _, model = self.full_classifier()
        ref = self.test_features() if against == "test" else self.validation()[2]
        cell = {"key": key, "against": against, "per_class": int(torch.bincount(y).min()),
                **quality(model, self._normalised(x), y, ref), "facing": self.facing(x, y)}
        write_json(path, cell)
        return cell

    def facing(self, x, y) -> dict:
        """Which way the items of x (labels y) face (``mirror_agreement`` against the training
        split's class means): the mean over classes, and each class's fraction."""
        from ddfast.eval.quality import class_means, mirror_agreement

        if self._means is None:
            train, _, _ = self.data()
            self._means = class_means(train.images(range(len(train))), train.labels,
                                      len(train.class_names))
        per_class = mirror_agreement(x, y, self._means)
        return {"mean": sum(per_class.values()) / len(per_class),
                "per_class": {str(c): v for c, v in per_class.items()}}

    def validation(self):
        """The held-out training images (the last ``holdout`` of each class, never trained on
        by any run): (images, labels, full-data classifier features)."""
        if self._val is None:
            from ddfast.train import holdout_indices

            if not self.scale.holdout:
                raise ConfigError("this scale holds no validation images out (holdout 0)")
            train, _, _ = self.data()
            idx = holdout_indices(train.labels, self.scale.holdout)
            x = train.images(idx)
            self._val = (x, train.labels[idx], self._features(x))
        return self._val

    def exact_set(self, guidance: float, draw: int, ipc: int = EXACT_IPC,
                  roundtrip: bool = False):
        """(images, labels) of the exact-generator reference: ``ipc`` training images per class
        (the images every run trains on) drawn by ``exact_draw``, with p(c|x) the full-data
        classifier's softmax; with ``roundtrip``, those images encoded and decoded by the
        study's autoencoder (the one its from-scratch DiT was trained on)."""
        if roundtrip:
            from ddfast.autoencoder import reconstruct
            from ddfast.models import load_vae

            x, y = self.exact_set(guidance, draw, ipc)
            if self._vae is None:
                if self.config("probe", {}).model.vae == "none":
                    raise ConfigError("a round trip needs a latent generator; this study's "
                                      "works in pixel space (model.vae none)")
                self._vae = load_vae(self.pretrained())
            return reconstruct(self._vae, x), y
        from ddfast.train import training_indices

        train, _, _ = self.data()
        labels = torch.as_tensor(train.labels)
        if self._pool is None:
            cfg = self.config("probe", {})
            idx = training_indices(labels, cfg.data.max_per_class, cfg.data.holdout)
            _, model = self.full_classifier()
            probs = []
            with torch.no_grad():
                for k in range(0, len(idx), 2000):
                    x = train.images(idx[k:k + 2000].tolist())
                    probs.append(model(self._normalised(x)).softmax(1).cpu())
            y = labels[idx]
            self._pool = (idx, y, torch.cat(probs)[torch.arange(len(idx)), y])
        idx, y, own = self._pool
        pick = idx[exact_draw(own, y, ipc, guidance, draw, len(train.class_names))]
        return train.images(pick.tolist()), labels[pick]

    def matched_set(self):
        """(images, labels) of the generator's closest samples (see ``Scale.matched_pool``),
        in the order of the random-real set they match."""
        from ddfast.eval.protocol import load_folder_set
        from ddfast.eval.quality import nearest_matches

        n = self.scale.matched_pool
        px, py, _ = load_folder_set(self.resampled("dit", 0, n), ipc=n)
        rx, ry = self.method_set("random", 0, EXACT_IPC)
        pick = nearest_matches(self._features(rx), ry, self._features(px), py)
        return px[pick], py[pick]

    def matched_key(self, repeat: int) -> str:
        return f"matched-p{self.scale.matched_pool}-r{repeat}-ipc{EXACT_IPC}-dc"

    def train_features(self):
        """Features and labels of every image the study's runs train on (the held-out images
        excepted): what prototype selection clusters."""
        from ddfast.train import training_indices

        if self._train_f is None:
            train, _, _ = self.data()
            labels = torch.as_tensor(train.labels)
            cfg = self.config("probe", {})
            idx = training_indices(labels, cfg.data.max_per_class, cfg.data.holdout)
            f = torch.cat([self._features(train.images(idx[k:k + 5000].tolist()))
                           for k in range(0, len(idx), 5000)])
            self._train_f = (f, labels[idx], idx)
        return self._train_f

    def select_folder(self, method: str, repeat: int, ipc: int, pool: int | None = None) -> Path:
        """Where the prototype-selected set of (method, repeat, ipc) is written, picked from a
        pool of ``pool`` per class (default ``Scale.select_pool``); ``random``: the real images
        nearest the prototypes (one set, whatever the repeat)."""
        if method == "random":
            return self.work / "select" / f"real-ipc{ipc}"
        n = pool or self.scale.select_pool
        return self.work / "select" / f"{method}-p{n}-r{repeat}-ipc{ipc}"

    def select_key(self, method: str, repeat: int, ipc: int, protocol: str = "dc",
                   pool: int | None = None) -> str:
        name = "real" if method == "random" else f"{method}-p{pool or self.scale.select_pool}"
        return f"select-{name}-r{repeat}-ipc{ipc}-{protocol}"

    def select_points(self, methods: tuple[str, ...] = METHODS, ipcs=None):
        """(method, repeat, ipc, recipe) of every prototype-selection cell, IPC by IPC, each
        recipe with its own repeats and IPCs (``Scale.repeats_of``, ``evaluates``)."""
        s = self.scale
        if not s.select_pool:
            return
        for ipc in (i for i in s.select_ipc if i in s.ipc and (ipcs is None or i in ipcs)):
            for proto in (p for p in s.select_protocols if s.evaluates(p, ipc)):
                for method in methods:
                    for r in range(s.repeats_of(proto)):
                        yield method, r, ipc, proto

    def larger_pool_points(self, methods: tuple[str, ...] = METHODS, ipcs=None):
        """(method, repeat, ipc, recipe, pool) of every cell picked from a larger pool
        (``Scale.larger_pools``): prototype selection's points at ``larger_pool_ipc``, without
        ``random``, pool by pool."""
        for pool in self.scale.larger_pools:
            for m, r, i, p in self.select_points(methods, ipcs):
                if m != "random" and i in self.scale.larger_pool_ipc:
                    yield m, r, i, p, pool

    def selected_set(self, method: str, repeat: int, ipc: int, pool: int | None = None):
        """(images, labels) of a prototype-selected set from a pool of ``pool`` per class
        (default ``Scale.select_pool``), written once as a set folder of its own (class
        folders, a manifest naming each image's pool file) and read from there after, so it
        needs its pool only to be made."""
        from ddfast.eval.protocol import load_folder_set
        from ddfast.select import prototype_pick, write_real_selection, write_selection

        n = pool or self.scale.select_pool
        folder = self.select_folder(method, repeat, ipc, n)
        if not (folder / "manifest.json").is_file():
            f, y, idx = self.train_features()
            if method == "random":
                train, _, _ = self.data()
                pick = idx[prototype_pick(f, y, f, y, ipc)]
                write_real_selection(folder, train.images(pick.tolist()),
                                     torch.as_tensor(train.labels)[pick], pick,
                                     list(train.class_names))
            else:
                pool_dir = self.resampled(method, repeat, n)
                px, py, _ = load_folder_set(pool_dir, ipc=n)
                write_selection(pool_dir, folder,
                                prototype_pick(self._features(px), py, f, y, ipc))
        else:
            self._check_selection(folder, method, repeat, ipc, n)
        x, y, _ = load_folder_set(folder, ipc=ipc)
        return x, y

    def _check_selection(self, folder: Path, method: str, repeat: int, ipc: int,
                         pool: int | None = None) -> None:
        """Refuse a selected set written under other settings (another pool size, sampling
        setting or repeat's seeds) instead of evaluating it as this study's."""
        from ddfast.diffusion import image_seed

        rec = json.loads((folder / "manifest.json").read_text())
        problems = []
        if rec.get("ipc") != ipc:
            problems.append(f"{rec.get('ipc')} images per class, not {ipc}")
        if method != "random":
            want = pool or self.scale.select_pool
            if rec.get("pool_ipc") != want:
                problems.append(f"a pool of {rec.get('pool_ipc')} per class, not {want}")
            problems += self._sampler_problems(rec)
            wrong = [m["pool_file"] for m in rec.get("images", [])
                     if m.get("seed") != image_seed(repeat, m["class"],
                                                    int(Path(m["pool_file"]).stem))]
            if wrong:
                problems.append(f"{len(wrong)} images not drawn with repeat {repeat}'s seeds "
                                f"(first: {wrong[0]})")
        if problems:
            raise ConfigError(f"{folder} holds a selection of other settings: "
                              f"{'; '.join(problems)}. Delete it (it is made again from its "
                              "pool) or use another --out")

    def _sampler_problems(self, rec: dict) -> list[str]:
        """What differs between the sampler a set's manifest records and the study's chosen
        setting (every pool and anchored set is drawn with it)."""
        c = self.config("probe", self.sampling()).sample
        want = (float(c.guidance_scale), c.sampler, int(c.steps),
                [int(v) for v in c.guidance_interval or ()])
        s = rec.get("sampler") or {}
        have = (float(s.get("guidance_scale", "nan")), s.get("name"), s.get("steps"),
                [int(v) for v in s.get("guidance_interval", ())])
        if have == want:
            return []
        return [f"sampler {s} where the study samples with guidance {want[0]:g}, {want[1]}, "
                f"{want[2]} steps"]

    # ------------------------------------------------------------------------------ anchored
    def anchor_strength(self) -> float:
        """The strength anchored sets start from: the point of ``Scale.anchor_grid`` whose
        IPC-10 set of the from-scratch model (repeat 0's seeds, the chosen sampling setting)
        trains the ConvNet-3 most accurate on the held-out images (ties: the higher strength).
        Written to ``work/anchored.json`` with the curve; the test split plays no part."""
        grid = tuple(float(g) for g in self.scale.anchor_grid)
        path = self.work / "anchored.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            if tuple(p["strength"] for p in rec["points"]) == grid:
                return rec["chosen"]
        points = []
        for g in grid:
            x, y = self.anchored_set("dit", 0, EXACT_IPC, g)
            points.append({"strength": g, "val_accuracy": self.val_accuracy_cell(
                f"val-anchored-dit-s{g:g}-r0-ipc{EXACT_IPC}", x, y)})
        best = max(points, key=lambda p: (p["val_accuracy"], p["strength"]))
        if path.is_file() and json.loads(path.read_text())["chosen"] != best["strength"]:
            log(f"[study] anchored: the grid now chooses strength {best['strength']:g}; sets "
                "of the old one stay in their own folders")
        write_json(path, {"criterion": f"highest accuracy on the validation images of a "
                                       f"ConvNet-3 trained (DC/DSA recipe) on the from-scratch "
                                       f"model's anchored IPC-{EXACT_IPC} set",
                          "points": points, "chosen": best["strength"]})
        return best["strength"]

    @staticmethod
    def anchored_key(method: str, repeat: int, ipc: int, protocol: str, strength: float) -> str:
        return f"anchored-{method}-s{strength:g}-r{repeat}-ipc{ipc}-{protocol}"

    def anchor_points(self, methods: tuple[str, ...] = METHODS, ipcs=None):
        """(method, repeat, ipc, recipe) of every anchored cell: prototype selection's points
        without ``random`` (whose row there is the coreset both compete with)."""
        if not self.scale.anchor_grid:
            return
        yield from ((m, r, i, p) for m, r, i, p in self.select_points(methods, ipcs)
                    if m != "random")

    def anchors(self, ipc: int) -> dict[int, torch.Tensor]:
        """Each class's ``ipc`` anchors: the mean training image (in [-1, 1]) of each of the
        k-means clusters whose centres prototype selection answers."""
        from ddfast.data.cache import to_model_range
        from ddfast.select import cluster_anchors

        if ipc not in self._anchors:
            f, y, idx = self.train_features()
            train, _, _ = self.data()
            self._anchors[ipc] = cluster_anchors(
                f, y, lambda c: to_model_range(train.images(idx[y == c].tolist())), ipc)
        return self._anchors[ipc]

    def anchored_set(self, method: str, repeat: int, ipc: int, strength: float | None = None):
        """(images, labels) of an anchored set: the method's model (the from-scratch one for
        ``dit``; repeat r's, computed again if its weights are missing) started from
        ``anchors(ipc)`` at ``strength`` (default: ``anchor_strength``), repeat r's seeds and
        the chosen sampling setting. Written once as a set folder, read from there after."""
        from ddfast.diffusion import Diffusion
        from ddfast.eval.protocol import load_folder_set, resolve_device
        from ddfast.models import load_dit, null_label
        from ddfast.sample import class_specs, write_distilled

        strength = self.anchor_strength() if strength is None else strength
        folder = self.work / "anchored" / f"{method}-s{strength:g}-r{repeat}-ipc{ipc}"
        if not (folder / "manifest.json").is_file():
            cfg = self.config("probe", self.sampling())
            if cfg.model.vae != "none":
                raise ConfigError("anchored sets are drawn in pixel space; this study's "
                                  "generator is a latent model")
            if method == "dit":
                model_dir = self.pretrained()
            else:
                model_dir = self.method_run(method, repeat, needs="model") / "model"
            dit = load_dit(model_dir)
            train, _, _ = self.data()
            classes = class_specs(list(train.class_names), list(range(len(train.class_names))))
            x = train.images([0])
            s = cfg.sample
            dev = torch.device(resolve_device(self.device))
            write_distilled(folder, dit.to(dev), None, Diffusion(device=dev), classes, ipc,
                            latent_shape=tuple(x.shape[1:]), null_label=null_label(dit),
                            scale=1.0, steps=s.steps, sampler=s.sampler,
                            guidance_scale=s.guidance_scale,
                            guidance_channels=s.guidance_channels, seed=repeat,
                            batch_size=s.batch_size, device=dev,
                            guidance_interval=s.guidance_interval, anchors=self.anchors(ipc),
                            strength=strength)
        else:  # refuse a set of other settings instead of evaluating it as this study's
            rec = json.loads((folder / "manifest.json").read_text())
            problems = self._sampler_problems(rec)
            if rec.get("seed") != repeat or rec.get("ipc") != ipc:
                problems.append(f"seed {rec.get('seed')} and {rec.get('ipc')} per class, not "
                                f"repeat {repeat}'s seed and {ipc}")
            if (rec.get("anchored") or {}).get("strength") != strength:
                problems.append(f"anchored {rec.get('anchored')}, not strength {strength:g}")
            if problems:
                raise ConfigError(f"{folder} holds an anchored set of other settings: "
                                  f"{'; '.join(problems)}. Delete it (it is drawn again) or use "
                                  "another --out")
        x, y, _ = load_folder_set(folder, ipc=ipc)
        return x, y

    def exact_points(self):
        """Every exact-generator cell of this scale (``ExactPoint``): the draws of
        ``exact_guidance`` under the DC/DSA recipe, of ``exact_small`` under IDC's, then those of
        ``exact_roundtrip`` through the autoencoder under each recipe of the study at IPC 10.
        Draw d is evaluated with classifier seed d, as repeat d of a method's set is."""
        s = self.scale
        groups = [*((g, "dc", False) for g in s.exact_guidance),
                  *((g, "small", False) for g in s.exact_small),
                  *((g, p, True) for g in s.exact_roundtrip for p in s.protocols
                    if s.evaluates(p, EXACT_IPC))]
        for g, proto, trip in groups:
            tag = f"{ROUNDTRIP}-" if trip else ""
            for d in range(1 if math.isinf(g) else s.exact_draws):
                yield ExactPoint(g, d, proto, trip,
                                 f"exact-{tag}g{g:g}-d{d}-ipc{EXACT_IPC}-{proto}")

    def sampling(self) -> dict:
        """The sampling settings every distilled set uses: the grid point whose samples lie
        closest to the validation images (lowest Fréchet distance in the full-data classifier's
        features), or none (the preset's) without a grid. Chosen once, written to
        ``work/sampling.json``; a point added to the grid later is measured and the choice made
        again over the whole grid (runs drawn with a setting no longer chosen are then refused).
        The test split plays no part."""
        from ddfast.eval.protocol import load_folder_set

        grid = self.scale.sampling_grid
        if not grid:
            return {}
        if self._sampling is not None:
            return self._sampling
        path = self.work / "sampling.json"
        criterion = self.scale.sampling_criterion
        if criterion not in SAMPLING_CRITERIA:
            raise ConfigError(f"sampling criterion {criterion!r}: pass one of "
                              f"{', '.join(SAMPLING_CRITERIA)}")
        by_accuracy = criterion == "accuracy" and len(grid) > 1  # one point: nothing to choose
        q = self.scale.val_per_class
        if by_accuracy and q < EXACT_IPC:
            raise ConfigError(f"the accuracy criterion trains on {EXACT_IPC} samples per class "
                              f"of each setting: set val_per_class >= {EXACT_IPC} (it is {q})")
        known, before, stored = {}, None, None
        if path.is_file():
            rec = json.loads(path.read_text())
            before, stored = rec["chosen"], rec["points"]
            known = {_grid_key(p): p for p in rec["points"]}
        for entry in grid:
            guidance, sampler, steps, interval = _grid_point(entry)
            point = known.get((guidance, sampler, steps, interval))
            if point is not None and (not by_accuracy or "val_accuracy" in point):
                continue
            o = {"sample.guidance_scale": f"{guidance:g}", "sample.sampler": sampler,
                 "sample.steps": str(steps)}
            tag = f"-g{guidance:g}-{sampler}{steps}"
            if interval:
                o["sample.guidance_interval"] = interval
                tag += "-interval" + interval.replace(",", "-")
            o_run = {"run.seed": "0", "sample.seed": "0", "sample.ipc": str(q),
                     "objective.method": "dit", **o}
            folder = self.from_pretrained(f"sampling{tag}", o_run) / "distilled"
            x, y, _ = load_folder_set(folder, ipc=q)
            cell = self.quality_cell(f"val{tag}", x, y, against="val")
            point = {"guidance_scale": guidance, "sampler": sampler, "steps": steps,
                     **({"interval": interval} if interval else {}), "settings": o,
                     **{k: cell[k] for k in ("fidelity", "fd", "precision", "recall",
                                             "coverage")}}
            if by_accuracy:
                # The first ten of each class: the IPC-10 set the same seeds draw (image seeds
                # depend on the class and the index alone).
                x10, y10, _ = load_folder_set(folder, ipc=EXACT_IPC)
                point["val_accuracy"] = self.val_accuracy_cell(f"val{tag}", x10, y10)
            known[(guidance, sampler, steps, interval)] = point
        points = [known[_grid_point(g)] for g in grid]
        if by_accuracy:  # ties go to the closer samples
            best = max(points, key=lambda p: (p["val_accuracy"], -p["fd"]))
            text = (f"highest accuracy on the validation images of a ConvNet-3 trained (DC/DSA "
                    f"recipe) on the setting's first {EXACT_IPC} samples per class")
        else:
            best = min(points, key=lambda p: p["fd"])
            text = "lowest Fréchet distance to the validation images"
        if before is not None and best["settings"] != before:
            log(f"[study] sampling: the grid now chooses {best['settings']} over {before}; "
                "runs drawn with the old setting will be refused (start a new --out)")
        if points != stored or best["settings"] != before:
            write_json(path, {"criterion": text, "per_class": q, "holdout": self.scale.holdout,
                              "points": points, "chosen": best["settings"]})
        self._sampling = best["settings"]
        return self._sampling

    def sampling_point(self) -> tuple | None:
        """The chosen sampling setting as a grid entry: (guidance scale, sampler, steps), with
        its guidance interval "lo,hi" fourth where it has one; None without a grid."""
        if not self.sampling():
            return None
        rec = json.loads((self.work / "sampling.json").read_text())
        p = next(p for p in rec["points"] if p["settings"] == rec["chosen"])
        g, sampler, steps, interval = _grid_key(p)
        return (g, sampler, steps, interval) if interval else (g, sampler, steps)

    def val_accuracy_cell(self, key: str, x, y) -> float:
        """Accuracy (%) on the held-out validation images of a ConvNet-3 trained on (x, y) under
        the DC/DSA recipe, seed 0: the sampling choice's measure of a setting's IPC-10 set.
        Cached under ``sampling/<key>-dc.json``; the test split plays no part."""
        from ddfast.eval.protocol import evaluate

        path = self.work / "sampling" / f"{key}-dc.json"
        if path.is_file():
            return json.loads(path.read_text())["acc_best"]
        val_x, val_y, _ = self.validation()
        log(f"[study] evaluate {key} on the validation images")
        res = evaluate(x, y, val_x, val_y, networks=("convnet3",), repeats=1,
                       epochs=self.scale.eval_epochs, protocol="dc", device=self.device, seed=0,
                       flip=self.flip, progress=self.progress, dataset=self.dataset)
        net = res["networks"]["convnet3"]
        write_json(path, {"key": key, "against": "val", "protocol": "dc", "seed": 0,
                          "ipc": res["ipc"], "acc_best": net["best_mean"],
                          "acc_last": net["last_mean"], "epochs": res["epochs"],
                          "seconds": res["seconds"]})
        return net["best_mean"]

    def generator_study(self, name: str) -> Study:
        """The study of candidate generator ``name``: this study's scale, data and full-data
        classifier, its base settings with the candidate's overrides, sampled at this study's
        chosen setting, under ``<out>/generators/<name>``."""
        if name not in self.scale.generators:
            known = ", ".join(self.scale.generators) or "none at this scale"
            raise ConfigError(f"unknown generator {name!r}: this scale's candidates are {known}")
        sub = Study(self.dataset, self.scale_name, self.out / "generators" / name, self.device,
                    self.root, self.progress, compile=self.compile)
        sub.runs_only = self.runs_only
        point = self.sampling_point()
        # The exact generator draws real images: its cells are this study's, not each
        # candidate's.
        sub.scale = replace(self.scale, sampling_grid=(point,) if point else (),
                            exact_guidance=(), exact_small=(), exact_roundtrip=(), generators={})
        sub.base.update(self.scale.generators[name])
        sub._data, sub._full = self.data(), self.full_classifier()
        return sub

    def generator_cells(self, name: str) -> None:
        """Train candidate generator ``name`` and compute its cells (see ``Scale.generators``);
        nothing when they exist (a clean checkout holds them, not the candidate's weights)."""
        sub = self.generator_study(name)
        keys = [sub.work / "evals" / f"dit-r0-ipc{EXACT_IPC}-dc.json",
                sub.work / "quality" / f"dit-r0-ipc{EXACT_IPC}.json",
                *(sub.work / "evals" / f"dit{tag}-r0-ipc{EXACT_IPC}-dc.json"
                  for tag, _ in sub.scale.generator_probes)]
        latent = self.scale.generators[name].get("model.vae", "none") in VAE_PRESETS
        if latent:
            keys += [sub.work / "evals" / f"{ROUNDTRIP}-r0-ipc{EXACT_IPC}-dc.json",
                     sub.work / "sampling" / f"{ROUNDTRIP}-ipc{self.scale.val_per_class}.json"]
        if all(k.is_file() for k in keys) and (not sub.scale.sampling_grid
                                               or (sub.work / "sampling.json").is_file()):
            folder = sub.work / "dit-r0" / "distilled"
            if "facing" not in json.loads(keys[1].read_text()) and folder.is_dir():
                # A cell measured before the facing measure: read from the set on disk, the
                # run's settings unchecked (a candidate trained elsewhere may name its paths).
                from ddfast.eval.protocol import load_folder_set

                x, y, _ = load_folder_set(folder, ipc=EXACT_IPC)
                sub.quality_cell(f"dit-r0-ipc{EXACT_IPC}", x, y)
            return
        log(f"[study] generator {name}: {self.scale.generators[name]}")
        sub.sampling()
        x, y = sub.method_set("dit", 0, EXACT_IPC)
        sub.quality_cell(f"dit-r0-ipc{EXACT_IPC}", x, y)
        sub.evaluate_cell(f"dit-r0-ipc{EXACT_IPC}-dc", x, y, "dc", 0)
        sub.probe_cells()
        if latent:
            sub.roundtrip_cells()

    def roundtrip_cells(self) -> None:
        """What a latent generator's autoencoder keeps of real images, before any DiT: the
        round trip (encode, decode the posterior mean) of the random-real IPC-10 set under the
        DC/DSA recipe (seed 0, one run, as a candidate's set), and of the first
        ``val_per_class`` training images of each class against the held-out images, beside
        those images themselves (cells ``roundtrip-*`` and ``random-ipc*`` under ``sampling/``).
        A latent set cannot be sharper than its autoencoder's round trip.

        What its edges alone are worth (``ddfast.eval.edges``): the round trip unsharp-masked
        to the real set's edge strength, and the real set blurred to the round trip's, each
        under the same recipe (cells ``roundtrip-sharp-*`` and ``random-blur-*``; the
        strengths and the filters' parameters in ``sampling/roundtrip-edges.json``). These
        are measured wherever the autoencoder's weights are at hand; a clone whose round trip
        is measured without them does not train the autoencoder again for them alone."""
        from ddfast.autoencoder import reconstruct
        from ddfast.eval.edges import blur_to, edge_strength, sharpen_to
        from ddfast.models import load_vae

        q = self.scale.val_per_class
        cells = [self.work / "evals" / f"{ROUNDTRIP}-r0-ipc{EXACT_IPC}-dc.json",
                 self.work / "sampling" / f"random-ipc{q}.json",
                 self.work / "sampling" / f"{ROUNDTRIP}-ipc{q}.json"]
        edges = [self.work / "evals" / f"{ROUNDTRIP}-sharp-r0-ipc{EXACT_IPC}-dc.json",
                 self.work / "evals" / f"random-blur-r0-ipc{EXACT_IPC}-dc.json",
                 self.work / "sampling" / f"{ROUNDTRIP}-edges.json"]
        folder = self.work / "base" / "vae"
        have_vae = (folder / "config.json").is_file()
        if all(c.is_file() for c in cells) and (
                all(c.is_file() for c in edges) or not have_vae):
            return  # measured: the weights are not needed again
        if not have_vae:
            self.pretrained()  # the autoencoder is trained first in the from-scratch DiT's run
        vae = load_vae(folder)
        x, y = self.method_set("random", 0, EXACT_IPC)
        back = reconstruct(vae, x)
        self.evaluate_cell(f"{ROUNDTRIP}-r0-ipc{EXACT_IPC}-dc", back, y, "dc", 0)
        real, trip = edge_strength(x), edge_strength(back)
        sharp, amount = sharpen_to(back, real)
        soft, sigma = blur_to(x, trip)
        write_json(self.work / "sampling" / f"{ROUNDTRIP}-edges.json",
                   {"ipc": EXACT_IPC, "real": real, "roundtrip": trip,
                    "sharpened": edge_strength(sharp), "unsharp_amount": amount,
                    "unsharp_sigma": 1.0, "blurred": edge_strength(soft), "blur_sigma": sigma})
        self.evaluate_cell(f"{ROUNDTRIP}-sharp-r0-ipc{EXACT_IPC}-dc", sharp, y, "dc", 0)
        self.evaluate_cell(f"random-blur-r0-ipc{EXACT_IPC}-dc", soft, y, "dc", 0)
        x, y = self.method_set("random", 0, q)
        self.quality_cell(f"random-ipc{q}", x, y, against="val")
        self.quality_cell(f"{ROUNDTRIP}-ipc{q}", reconstruct(vae, x), y, against="val")

    def probe_cells(self, methods: tuple[str, ...] = ("dit",)) -> None:
        """The IPC-10 set (repeat 0) of each generated method, by default this study's generator
        alone (``dit``), drawn at each of the scale's ``generator_probes``, under the DC/DSA
        recipe. A method's run fine-tunes as its cell's does and samples at the probe."""
        for method in (m for m in methods if m != "random"):
            for tag, extra in self.scale.generator_probes:
                x, y = self.method_set(method, 0, EXACT_IPC, extra, tag)
                self.evaluate_cell(f"{method}{tag}-r0-ipc{EXACT_IPC}-dc", x, y, "dc", 0)

    def generator_quality(self, methods: tuple[str, ...]) -> None:
        """The generator itself (``dit``: the from-scratch model, sampled with the study's
        settings) and the same number of real training images (the first of each class)."""
        q = self.scale.quality_per_class
        if not q:
            return
        x, y = self.method_set("random", 0, q)
        self.quality_cell(f"random-ipc{q}", x, y)
        if "dit" in methods:
            x, y = self.method_set("dit", 0, q, tag="-quality", ipcs=(q,))
            self.quality_cell(f"dit-ipc{q}", x, y)

    def method_set(self, method: str, repeat: int, ipc: int, extra=None, tag="", ipcs=None):
        """The images and labels of one set; ``ipcs`` the IPCs its run samples (default: the
        scale's, or 10 alone for an ablation ``tag``)."""
        from ddfast.eval.protocol import load_folder_set, load_source_set

        if method == "random":
            train, _, _ = self.data()
            x, y, _ = load_source_set(train, ipc)
            return x, y
        if ipc in self.scale.ipc_once and not tag and ipcs is None:
            x, y, _ = load_folder_set(self.resampled(method, repeat, ipc), ipc=ipc)
            return x, y
        ipcs = ipcs or ((10,) if tag else None)
        x, y, _ = load_folder_set(self.distilled(method, repeat, extra, tag, ipcs), ipc=ipc)
        return x, y

    def run_all(self, methods: tuple[str, ...] = METHODS, ipcs: tuple[int, ...] = ()) -> None:
        """Compute every missing cell of ``methods`` (the ablations go with ours-step); with
        ``ipcs``, only the cells of those IPCs (the ablations and the lambda_g sweep are IPC 10's).
        """
        s = self.scale
        unknown = sorted(set(ipcs) - {*s.ipc, *s.ipc_once})
        if unknown:
            raise ConfigError(f"IPC {', '.join(map(str, unknown))} is not in this scale: pass a "
                              f"subset of {', '.join(map(str, sorted({*s.ipc, *s.ipc_once})))}")
        wanted = set(ipcs or (*s.ipc, *s.ipc_once))
        self.full_classifier()
        self.sampling()
        self.generator_quality(methods)
        for method in methods:
            for r in range(s.repeats):
                for ipc in (i for i in s.ipc if i in wanted):
                    x, y = self.method_set(method, r, ipc)
                    if r == 0 and ipc == max(s.ipc):  # every method's largest set, once
                        self.quality_cell(f"{method}-r0-ipc{ipc}", x, y)
                    for proto in s.protocols:
                        if r >= s.repeats_of(proto) or not s.evaluates(proto, ipc):
                            continue
                        self.evaluate_cell(f"{method}-r{r}-ipc{ipc}-{proto}", x, y, proto, r)
        if s.ablations and "ours-step" in methods and 10 in wanted:
            for _key, tag, extra in self.ablation_points():
                for r in range(s.ablation_repeats or s.repeats):
                    x, y = self.method_set("ours-step", r, 10, extra, tag)
                    self.evaluate_cell(f"ours-step{tag}-r{r}-ipc10-dc", x, y, "dc", r)
        if "ours-step" in methods and s.lambda_g_factors and 10 in wanted:
            x0, _ = self.method_set("ours-step", 0, 10)
            for value, tag, extra in self.lambda_g_points():
                x, y = self.method_set("ours-step", 0, 10, extra, tag)
                self.evaluate_cell(f"ours-step{tag}-r0-ipc10-dc", x, y, "dc", 0)
                path = self.work / "lambda_g" / f"ours-step{tag}-r0-ipc10.json"
                if not path.is_file():
                    # Same per-image seeds, so the same initial noise: the change is the term's.
                    diff = (x.double() - x0.double()).abs()
                    write_json(path, {"lambda_g": value, "grey_levels": 255,
                                      "pixel_change_mean": float(diff.mean()),
                                      "pixel_change_max": float(diff.max())})
        if "random" in methods and EXACT_IPC in wanted and EXACT_IPC in s.ipc:
            for p in self.exact_points():  # a round trip needs the autoencoder: only if missing
                if not (self.work / "evals" / f"{p.key}.json").is_file():
                    x, y = self.exact_set(p.guidance, p.draw, roundtrip=p.roundtrip)
                    self.evaluate_cell(p.key, x, y, p.protocol, p.draw)
        if "dit" in methods and s.matched_pool and EXACT_IPC in wanted and EXACT_IPC in s.ipc:
            keys = [self.matched_key(r) for r in range(s.repeats)]
            if not all((self.work / "evals" / f"{k}.json").is_file() for k in keys):
                x, y = self.matched_set()
                for r, key in enumerate(keys):  # one set, a classifier seed per repeat
                    self.evaluate_cell(key, x, y, "dc", r)
        for method, r, ipc, proto in self.select_points(methods, wanted):
            key = self.select_key(method, r, ipc, proto)  # each pool and set made once, kept
            if not (self.work / "evals" / f"{key}.json").is_file():
                x, y = self.selected_set(method, r, ipc)
                self.evaluate_cell(key, x, y, proto, r)
        for method, r, ipc, proto in self.anchor_points(methods, wanted):
            key = self.anchored_key(method, r, ipc, proto, self.anchor_strength())
            if not (self.work / "evals" / f"{key}.json").is_file():
                x, y = self.anchored_set(method, r, ipc)
                self.evaluate_cell(key, x, y, proto, r)
        for method, r, ipc, proto, pool in self.larger_pool_points(methods, wanted):
            key = self.select_key(method, r, ipc, proto, pool)  # a pool's draw: the costliest
            if not (self.work / "evals" / f"{key}.json").is_file():
                x, y = self.selected_set(method, r, ipc, pool)
                self.evaluate_cell(key, x, y, proto, r)
        for ipc in (i for i in s.ipc_once if i in wanted):  # the costliest, after the others
            for method in methods:
                x, y = self.method_set(method, 0, ipc)
                for proto in (p for p in s.protocols if s.evaluates(p, ipc)):
                    self.evaluate_cell(f"{method}-r0-ipc{ipc}-{proto}", x, y, proto, 0)

    def lambda_g_points(self):
        """(value, tag, overrides) of the lambda_g sweep."""
        default = self.config("probe", {}).objective.lambda_g
        for f in self.scale.lambda_g_factors:
            value = default * f
            yield value, f"-lambda_g{value:g}", {"objective.lambda_g": str(value)}

    def ablation_points(self):
        """(setting, tag, overrides) for every swept value off the default."""
        cfg = self.config("probe", {})
        for key in ABLATED:
            section, name = key.split(".")
            default = getattr(getattr(cfg, section), name)
            for f in self.scale.sweep:
                value = default * f
                value = max(1, round(value)) if isinstance(default, int) else value
                yield key, f"-{name}{value:g}", {key: str(value)}

    # ------------------------------------------------------------------------------ report
    def report(self) -> dict:
        from ddfast.study_report import write_report

        return write_report(self)


def _in_study(config: dict) -> str:
    """The digest of a run's settings with its path into its own study folder (``run.out``'s
    parent: the from-scratch DiT, a method run's model) written relative to that folder: the
    same for the same run wherever the study lies."""
    work = Path(config["run"]["out"]).parent
    d = {section: dict(values) if isinstance(values, dict) else values
         for section, values in config.items()}
    path = Path(d["model"].get("dit") or "")
    if path.parts and path.is_relative_to(work):
        d["model"]["dit"] = "<study>/" + path.relative_to(work).as_posix()
    return Config.from_dict(d).digest()


def _compare_logs(name: str, before: list[dict], after: list[dict]) -> None:
    """Say whether a recomputed run logged the same losses as its committed log: the same on
    the same kind of CPU and thread count; otherwise float rounding differs, and the cells
    computed from the committed outputs stay as they were."""
    key = ("stage", "step")
    old = {tuple(r.get(k) for k in key): r.get("loss") for r in before if "loss" in r}
    new = {tuple(r.get(k) for k in key): r.get("loss") for r in after if "loss" in r}
    shared = sorted(set(old) & set(new), key=lambda k: (str(k[0]), k[1] or 0))
    differ = [k for k in shared if old[k] != new[k]]
    if not differ:
        log(f"[study] run {name}: recomputed, and its {len(shared)} logged losses equal the "
            f"committed ones")
        return
    stage, step = differ[0]
    log(f"[study] run {name}: recomputed; {len(differ)} of {len(shared)} logged losses differ "
        f"from the committed log, the first at {stage} step {step} ({old[differ[0]]!r} then, "
        f"{new[differ[0]]!r} now): another CPU or thread count rounds differently")


def device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddfast.study", description=__doc__.split("\n")[0],
                                epilog="Rerun the same command to resume a killed study.")
    p.add_argument("--dataset", required=True, choices=tuple(DATASETS))
    p.add_argument("--repeats", type=int, default=0, help="override the scale's repeats")
    p.add_argument("--scale", default="full", choices=tuple(SCALES),
                   help="full: IPC 1/10/50, 3 repeats (a GPU's work); cpu: IPC 1/10 sized for "
                        "2 CPU cores; cpu-latent (fashion-mnist): cpu on a latent DiT, its "
                        "sampling chosen by held-out accuracy; smoke: seconds, for tests")
    p.add_argument("--out", required=True, help="study folder: results.json, results.md, plots; "
                   "run folders and cells under <out>/work")
    p.add_argument("--root", help="fashion-mnist: the IDX folder (default: Debian's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ", ".join(METHODS) + " (default: all); "
                        "processes computing disjoint subsets can share one --out. With "
                        "--generators: also these methods' cells in each candidate's own study "
                        "(<out>/generators/<name>, its tables there)")
    p.add_argument("--ipc", default="",
                   help="comma-separated IPCs: compute only their cells (default: every IPC of "
                        "the scale)")
    p.add_argument("--generators", default="",
                   help="comma-separated candidate generators of the scale (or all): train each "
                        "and measure it beside this study's generator, instead of the methods' "
                        "cells")
    p.add_argument("--runs-only", action="store_true",
                   help="train and sample every run the cells need, and evaluate none (the "
                        "sampling choice's held-out measures excepted): a GPU's part, the "
                        "evaluations then run wherever the sets are, from the finished runs")
    p.add_argument("--probes", action="store_true",
                   help="the IPC-10 set of this study's generator at each of the scale's probe "
                        "settings, beside the candidates (whose runs measure their own); with "
                        "--methods, each of those methods' sets too")
    p.add_argument("--report", action="store_true",
                   help="only rebuild results.json, results.md and the plots from the cells")
    p.add_argument("--progress", action="store_true", help="progress bars for every stage")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every run's step (and CUDA graphs in sampling on a GPU): "
                        "faster on a GPU, the same settings for resuming")
    args = p.parse_args(argv)
    try:
        study = Study(args.dataset, args.scale, Path(args.out), args.device, args.root,
                      args.progress, args.repeats, args.compile)
        study.runs_only = args.runs_only
        methods = tuple(m for m in (args.methods or ",".join(METHODS)).split(",") if m)
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}: pass a subset of "
                              f"{', '.join(METHODS)}")
        if not args.report:
            try:
                ipcs = tuple(int(i) for i in args.ipc.split(",") if i.strip())
            except ValueError:
                raise ConfigError(f"--ipc {args.ipc!r}: pass comma-separated integers, "
                                  f"e.g. --ipc 1,10") from None
            names = [g for g in args.generators.split(",") if g]
            if names == ["all"]:
                names = list(study.scale.generators)
            unknown = [g for g in names if g not in study.scale.generators]
            if unknown:  # every name checked before any is trained
                known = ", ".join(study.scale.generators) or "none at this scale"
                raise ConfigError(f"unknown generator(s) {', '.join(unknown)}: this scale's "
                                  f"candidates are {known}")
            if args.probes:  # with --methods, theirs too
                study.probe_cells(methods if args.methods is not None else ("dit",))
            if names:
                for name in names:
                    study.generator_cells(name)
                    if args.methods is not None:  # the candidate's own study of the methods
                        sub = study.generator_study(name)
                        sub.run_all(methods, ipcs)
                        sub.report()
            elif not args.probes:
                study.run_all(methods, ipcs)
        study.report()
    except DdfastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
