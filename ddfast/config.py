"""One configuration tree: frozen dataclasses, named presets, typed command-line overrides.

A run is fully described by a ``Config``. ``resolve(preset, overrides)`` starts from a named
preset and applies ``section.field=value`` overrides, each parsed by the field's declared type;
unknown keys are rejected with the list of valid ones. The resolved tree is written into every
run folder (``config.json``) and checkpoint, and ``Config.from_dict`` reads it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ddfast.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"  # digits | fashion-mnist | imagefolder
    root: str | None = None  # IDX folder (fashion-mnist) or train root (imagefolder)
    test_root: str | None = None  # imagefolder test root (ImageNet val in class folders, say)
    subset: str | None = None  # imagefolder: woof | nette | idc | comma-separated wnids
    resolution: int = 0  # image side in pixels; 0 = the source's native size (256 for imagefolder)
    channels: int = 0  # image channels; 0 = the source's own (1 for digits/fashion-mnist, else 3)
    max_per_class: int = 0  # keep at most this many training images per class; 0 = all
    holdout: int = 0  # the last N training images of each class: a validation split, unseen
    hflip: bool = True  # random horizontal flips in training (off for digits, Fashion-MNIST)
    cache_dir: str = ""  # latent cache folder; "" = $DDFAST_CACHE or ~/.cache/ddfast
    encode_batch_size: int = 32  # images per VAE forward when building the latent cache


@dataclass(frozen=True)
class ModelConfig:
    dit: str = "micro"  # DiT preset (XL/2, ...), a diffusers folder or an original-layout .pt
    dit_weights: str = "ema"  # ema | model: which weights of a DiT training checkpoint (.pt)
    dit_heads: int = 0  # attention heads of a .pt DiT outside the paper's sizes; 0 = inferred
    vae: str = "none"  # none (pixels), a diffusers folder, or a preset trained here (small-f4, ...)
    decode_vae: str = ""  # VAE used to decode samples (sd-vae-ft-mse); "" = the encoding VAE
    patch_size: int = 0  # DiT patch size for presets; 0 = the preset's own
    conditioning: str = "auto"  # auto | imagenet | class: which label conditions the DiT


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 0  # from-scratch training steps when model.dit is a preset (all parameters)
    lr: float = 1e-3  # AdamW learning rate
    batch_size: int = 64  # images per step
    ema_decay: float = 0.999  # EMA decay of the from-scratch model
    warmup: int = 100  # linear learning-rate warm-up steps
    decay: str = "constant"  # constant | cosine: lr after warm-up (cosine falls toward 0)
    # model.vae a preset: the autoencoder trained here first, on the same images
    # (ddfast.autoencoder), then the DiT on its latents
    vae_steps: int = 3000  # VAE trained here (model.vae a preset): optimiser steps
    vae_batch_size: int = 64  # VAE trained here: images per step
    vae_lr: float = 1e-3  # VAE trained here: AdamW learning rate
    vae_kl: float = 1e-6  # VAE trained here: weight of the KL term against the per-pixel error
    vae_decay: str = "constant"  # VAE trained here: constant | cosine (lr falls toward 0)


@dataclass(frozen=True)
class ObjectiveConfig:
    method: str = "ours"  # ours (adaptive memory) | minimax (fifo) | dit (no fine-tuning)
    lambda_r: float = 0.002  # weight of the representativeness term
    lambda_g: float = 0.008  # weight of the diversity term
    accumulate_bug: bool = False  # released loop's repeated class sums (not the method)


@dataclass(frozen=True)
class MemoryConfig:
    real_capacity: int = 64  # N_R: items per class in the real memory
    gen_capacity: int = 64  # N_G: items per class in the generated memory
    policy: str = "auto"  # auto (by method) | adaptive | fifo
    timing: str = "step"  # step (released code) | epoch (the paper's figure caption)
    # A run much shorter than one pass over its images (a large data set fine-tuned for a few
    # hundred steps) never reaches an epoch's end: refresh every N steps instead.
    refresh_every: int = 0  # epoch timing: steps between memory refreshes; 0 = each pass's end


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # AdamW learning rate, constant
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 8  # images per fine-tuning step
    epochs: int = 8  # passes over the training images
    steps: int = 0  # if > 0, fine-tune this many steps instead of `epochs`
    ema_decay: float = 0.9999  # EMA of the trainable parameters, updated every step
    label_dropout: float = 0.1  # probability of replacing a label by the null class
    trainable: str = "difffit"  # difffit (biases, class table, scales) | all


@dataclass(frozen=True)
class SampleConfig:
    ipc: tuple[int, ...] = (10,)  # images per class to sample; one distilled set per value
    steps: int = 50  # respaced sampling steps
    sampler: str = "ddpm"  # ddpm (ancestral, learned variance) | ddim
    guidance_scale: float = 4.0  # classifier-free guidance scale; 1 = none
    guidance_channels: str = "first3"  # first3 (original DiT) | all (diffusers)
    guidance_interval: tuple[int, ...] = ()  # lo,hi timesteps guided (else conditional); ()=all
    batch_size: int = 64  # images per sampling forward
    seed: int = 0  # base of the per-image seeds (seed, class, index)
    select: str = "none"  # none (paper's sampler) | prototypes (pool picks) | anchored (D4M)
    pool: int = 0  # prototypes: samples per class in the pool; 0 = 20 x the largest IPC
    feature_epochs: int = 0  # prototypes, anchored: feature network epochs; 0 = ~192,000 images
    strength: float = 0.0  # anchored: noise level of the start, in (0, 1]; 0 = 0.2


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True  # evaluate the distilled sets after sampling
    protocol: str = "small"  # small (IDC recipe, 28-32 px) | dc (DC/DSA recipe) | imagenet-subset
    networks: tuple[str, ...] = ("convnet3",)  # networks trained on each distilled set
    repeats: int = 3  # runs per network with distinct seeds
    epochs: int = 0  # 0 = the protocol's (small 1000, dc 1001, imagenet-subset by IPC)
    batch_size: int = 0  # classifier training batch; 0 = the protocol's (64; dc 256)
    baseline: bool = True  # also evaluate the first IPC real images per class (cached per data)


@dataclass(frozen=True)
class RunConfig:
    out: str = ""  # run folder; "" = runs/<preset>
    seed: int = 0  # seed of training (data order, noise, dropout)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    log_every: int = 50  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints
    progress: str = "auto"  # auto (bars on a terminal) | on | off
    compile: bool = False  # torch.compile the training loss and the sampling forward


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = "digits"  # the preset this config started from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def digest(self) -> str:
        """Short hash of the settings that decide results (not where or how verbosely)."""
        d = self.to_dict()
        for key in NON_RESULT_KEYS:
            section, name = key.split(".")
            d[section].pop(name, None)
        for key, neutral in LATER_KEYS.items():  # at their neutral value: as before they existed
            section, name = key.split(".")
            if d[section].get(name) == neutral:
                d[section].pop(name)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild a config written by ``to_dict`` (a run folder's config.json)."""
        flat = {}
        for section, values in d.items():
            if isinstance(values, dict):
                flat.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                flat[section] = values
        return apply_overrides(Config(), flat)

    @property
    def policy(self) -> str:
        """The memory replacement policy in force: explicit, or chosen by the method."""
        if self.memory.policy != "auto":
            return self.memory.policy
        return "fifo" if self.objective.method == "minimax" else "adaptive"


# Settings added after runs were first written, with the value that reproduces the old behaviour:
# left out of the digest at that value, so an older run folder still resumes and matches.
LATER_KEYS = {"data.holdout": 0, "memory.refresh_every": 0, "pretrain.decay": "constant",
              "sample.guidance_interval": (), "sample.select": "none", "sample.pool": 0,
              "sample.feature_epochs": 0, "sample.strength": 0.0, "pretrain.vae_steps": 3000,
              "pretrain.vae_batch_size": 64, "pretrain.vae_lr": 1e-3, "pretrain.vae_kl": 1e-6,
              "pretrain.vae_decay": "constant"}
# Settings that do not change results: outside the digest, and free to change on --resume
# (eval.baseline adds the random-real row beside the method's; the method's figures stay).
NON_RESULT_KEYS = ("run.out", "run.device", "run.progress", "run.log_every", "run.ckpt_every",
                   "run.compile", "eval.baseline")

# Allowed values of string fields with a closed set of choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("digits", "fashion-mnist", "imagefolder"),
    "model.conditioning": ("auto", "imagenet", "class"),
    "model.dit_weights": ("ema", "model"),
    "objective.method": ("ours", "minimax", "dit"),
    "pretrain.decay": ("constant", "cosine"),
    "pretrain.vae_decay": ("constant", "cosine"),
    "sample.select": ("none", "prototypes", "anchored"),
    "memory.policy": ("auto", "adaptive", "fifo"),
    "memory.timing": ("step", "epoch"),
    "optim.trainable": ("difffit", "all"),
    "sample.sampler": ("ddpm", "ddim"),
    "sample.guidance_channels": ("first3", "all"),
    "eval.protocol": ("small", "imagenet-subset", "dc"),
    "run.precision": ("auto", "fp32", "bf16"),
    "run.progress": ("auto", "on", "off"),
}

_IMAGENET_COMMON = dict(
    model=ModelConfig(dit="", vae="", decode_vae="", conditioning="imagenet"),
    optim=OptimConfig(),
    sample=SampleConfig(ipc=(10, 20, 50)),
    eval=EvalConfig(
        protocol="imagenet-subset", networks=("convnet6", "resnetap10", "resnet18"), repeats=3
    ),
)

PRESETS: dict[str, Config] = {
    # The embedded default: scikit-learn's digits, a small DiT trained here from scratch in pixel
    # space, then fine-tuned by the method; the whole job fits a few minutes on 2 CPU cores.
    "digits": Config(
        preset="digits",
        data=DataConfig(source="digits", hflip=False),
        model=ModelConfig(dit="micro", vae="none"),
        pretrain=PretrainConfig(steps=1500, lr=2e-3, batch_size=64, ema_decay=0.995, warmup=100),
        optim=OptimConfig(batch_size=32, epochs=0, steps=300, ema_decay=0.99, lr=1e-3),
        memory=MemoryConfig(real_capacity=32, gen_capacity=32),
        sample=SampleConfig(ipc=(10,), steps=50, batch_size=100),
        eval=EvalConfig(protocol="small", networks=("convnet3",), repeats=1),
        run=RunConfig(log_every=100, ckpt_every=500),
    ),
    # Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist, or any folder).
    "fashion-mnist": Config(
        preset="fashion-mnist",
        # No mirrored training images: its shoes all face one way (a generator trained on
        # flips draws half of them mirrored, and its samples lie farther from held-out images).
        data=DataConfig(source="fashion-mnist", hflip=False),
        model=ModelConfig(dit="tiny", vae="none"),
        pretrain=PretrainConfig(steps=20000, lr=1e-3, batch_size=128, ema_decay=0.999),
        optim=OptimConfig(batch_size=64, epochs=1, ema_decay=0.999),
        sample=SampleConfig(ipc=(1, 10, 50), batch_size=250),
        eval=EvalConfig(protocol="small", networks=("convnet3",), repeats=3),
    ),
    # The published DiT-XL/2 configuration (method.md section 4) on the three ImageNet subsets.
    "imagewoof": Config(preset="imagewoof", data=DataConfig(source="imagefolder", subset="woof"),
                        **_IMAGENET_COMMON),
    "imagenette": Config(preset="imagenette", data=DataConfig(source="imagefolder", subset="nette"),
                         **_IMAGENET_COMMON),
    "imageidc": Config(preset="imageidc", data=DataConfig(source="imagefolder", subset="idc"),
                       **_IMAGENET_COMMON),
    # Tiny: every stage in seconds; used by tests and quick checks.
    "smoke": Config(
        preset="smoke",
        data=DataConfig(source="digits", max_per_class=40, hflip=False),
        model=ModelConfig(dit="micro", vae="none"),
        pretrain=PretrainConfig(steps=40, lr=2e-3, batch_size=32, ema_decay=0.9, warmup=5),
        optim=OptimConfig(batch_size=16, epochs=0, steps=20, ema_decay=0.9),
        memory=MemoryConfig(real_capacity=8, gen_capacity=8),
        sample=SampleConfig(ipc=(2,), steps=10, batch_size=20),
        eval=EvalConfig(protocol="small", networks=("convnet3",), repeats=1, epochs=2),
        run=RunConfig(log_every=10, ckpt_every=15),
    ),
}


def field_types() -> dict[str, Any]:
    """Every settable key (``section.field`` or top-level) with its declared type."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            for name, tp in typing.get_type_hints(sub).items():
                out[f"{f.name}.{name}"] = tp
        else:
            out[f.name] = sub
    return out


def _parse(key: str, tp: Any, raw: Any) -> Any:
    """Convert a command-line string (or a JSON value) to the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        return _parse(key, args[0], raw)
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        items = raw if isinstance(raw, list | tuple) else [s for s in str(raw).split(",") if s]
        return tuple(_parse(key, elem, x) for x in items)
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            low = str(raw).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if tp is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return str(raw)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{key}: cannot read {raw!r} as {name}") from None
    raise ConfigError(f"{key}: unsupported type {tp}")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return ``cfg`` with ``{"section.field": value}`` applied; values are parsed by type."""
    valid = field_types()
    unknown = sorted(k for k in overrides if k not in valid)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; valid settings are: " + ", ".join(valid)
        )
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, raw in overrides.items():
        value = _parse(key, valid[key], raw)
        allowed = CHOICES.get(key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in sections.items():
        top[section] = replace(getattr(cfg, section), **values)
    return replace(cfg, **top)


def resolve(preset: str = "digits", overrides: dict[str, Any] | None = None) -> Config:
    """The named preset with the overrides applied, validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets are: {', '.join(PRESETS)}")
    cfg = apply_overrides(PRESETS[preset], dict(overrides or {}))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values and combinations that cannot run, before anything is computed."""
    positive = {
        "optim.batch_size": cfg.optim.batch_size,
        "pretrain.batch_size": cfg.pretrain.batch_size,
        "pretrain.vae_steps": cfg.pretrain.vae_steps,
        "pretrain.vae_batch_size": cfg.pretrain.vae_batch_size,
        "memory.real_capacity": cfg.memory.real_capacity,
        "memory.gen_capacity": cfg.memory.gen_capacity,
        "sample.steps": cfg.sample.steps,
        "sample.batch_size": cfg.sample.batch_size,
        "data.encode_batch_size": cfg.data.encode_batch_size,
        "run.log_every": cfg.run.log_every,
        "run.ckpt_every": cfg.run.ckpt_every,
        "eval.repeats": cfg.eval.repeats,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    non_negative = {
        "data.resolution": cfg.data.resolution,
        "data.channels": cfg.data.channels,
        "data.max_per_class": cfg.data.max_per_class,
        "data.holdout": cfg.data.holdout,
        "pretrain.steps": cfg.pretrain.steps,
        "optim.epochs": cfg.optim.epochs,
        "optim.steps": cfg.optim.steps,
        "model.patch_size": cfg.model.patch_size,
        "eval.epochs": cfg.eval.epochs,
        "eval.batch_size": cfg.eval.batch_size,
        "objective.lambda_r": cfg.objective.lambda_r,
        "objective.lambda_g": cfg.objective.lambda_g,
        "pretrain.vae_kl": cfg.pretrain.vae_kl,
        "memory.refresh_every": cfg.memory.refresh_every,
        "sample.pool": cfg.sample.pool,
        "sample.feature_epochs": cfg.sample.feature_epochs,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must not be negative, got {value}")
    if not cfg.sample.ipc or any(i < 1 for i in cfg.sample.ipc):
        raise ConfigError(f"sample.ipc must list positive counts, got {cfg.sample.ipc}")
    if cfg.sample.select == "prototypes" and 0 < cfg.sample.pool < max(cfg.sample.ipc):
        raise ConfigError(f"sample.pool={cfg.sample.pool} is smaller than the largest IPC "
                          f"{max(cfg.sample.ipc)}: draw a pool of at least that many samples "
                          f"per class (0 = 20 x the largest IPC)")
    if cfg.sample.select == "none" and cfg.sample.feature_epochs:
        raise ConfigError("sample.feature_epochs applies to sample.select=prototypes or "
                          "anchored only: set one, or drop it")
    if cfg.sample.select != "prototypes" and cfg.sample.pool:
        raise ConfigError("sample.pool applies to sample.select=prototypes only: set it, or "
                          "drop sample.pool")
    if not 0.0 <= cfg.sample.strength <= 1.0:
        raise ConfigError(f"sample.strength must lie in [0, 1] (0 = the default), got "
                          f"{cfg.sample.strength}")
    if cfg.sample.select != "anchored" and cfg.sample.strength:
        raise ConfigError("sample.strength applies to sample.select=anchored only: set it, or "
                          "drop sample.strength")
    if cfg.objective.method != "dit" and cfg.optim.steps == 0 and cfg.optim.epochs == 0:
        raise ConfigError("set optim.steps or optim.epochs above 0 (or objective.method=dit)")
    for key, value in (("optim.ema_decay", cfg.optim.ema_decay),
                       ("pretrain.ema_decay", cfg.pretrain.ema_decay),
                       ("optim.label_dropout", cfg.optim.label_dropout)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if cfg.memory.refresh_every and cfg.memory.timing != "epoch":
        raise ConfigError(f"memory.refresh_every={cfg.memory.refresh_every} applies to "
                          f"memory.timing=epoch only (step timing refreshes every step): set "
                          f"memory.timing=epoch or drop memory.refresh_every")
    if cfg.data.channels not in (0, 1, 3):
        raise ConfigError(f"data.channels must be 0 (the source's own), 1 or 3, got "
                          f"{cfg.data.channels}")
    if cfg.data.source != "imagefolder" and cfg.data.subset:
        raise ConfigError("data.subset applies to data.source=imagefolder only")
    if cfg.sample.guidance_scale < 1.0:
        raise ConfigError(f"sample.guidance_scale must be >= 1 (1 = no guidance), got "
                          f"{cfg.sample.guidance_scale}")
    gi = cfg.sample.guidance_interval
    if gi and (len(gi) != 2 or not 0 <= gi[0] <= gi[1]):
        raise ConfigError(f"sample.guidance_interval must be two timesteps lo,hi with "
                          f"0 <= lo <= hi (e.g. 80,580), or empty for every step; got "
                          f"{','.join(map(str, gi))}")


# Short flags for the settings a user reaches for most; every other setting is --section.field.
ALIASES: dict[str, str] = {
    "source": "data.source",
    "root": "data.root",
    "test-root": "data.test_root",
    "subset": "data.subset",
    "resolution": "data.resolution",
    "dit": "model.dit",
    "vae": "model.vae",
    "decode-vae": "model.decode_vae",
    "method": "objective.method",
    "lambda-r": "objective.lambda_r",
    "lambda-g": "objective.lambda_g",
    "policy": "memory.policy",
    "timing": "memory.timing",
    "refresh-every": "memory.refresh_every",
    "real-capacity": "memory.real_capacity",
    "gen-capacity": "memory.gen_capacity",
    "steps": "optim.steps",
    "epochs": "optim.epochs",
    "batch-size": "optim.batch_size",
    "lr": "optim.lr",
    "ipc": "sample.ipc",
    "seed": "run.seed",
    "out": "run.out",
    "device": "run.device",
}


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    """Turn ``--section.field VALUE``, ``--section.field=VALUE`` and alias flags into overrides.

    Raises ConfigError naming any unknown flag together with the valid ones.
    """
    valid = field_types()
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; settings are given as --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        key = ALIASES.get(key, key)
        key = key.replace("-", "_") if key not in valid else key
        if key not in valid:
            given = arg[2:].partition("=")[0]
            flags = sorted([*ALIASES, *valid])
            close = difflib.get_close_matches(given, flags, n=3, cutoff=0.6)
            hint = (f"did you mean {' or '.join('--' + c for c in close)}? " if close else "")
            raise ConfigError(f"unknown flag --{given}; {hint}`python -m ddfast.train --help` "
                              f"lists every setting")
        out[key] = value
        i += 1
    return out
