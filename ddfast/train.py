"""The whole job: data -> (from-scratch DiT) -> memory-driven fine-tuning -> sampling -> report.

    python -m ddfast.train                      # the embedded default (scikit-learn digits)
    python -m ddfast.train --preset smoke --out runs/smoke
    python -m ddfast.train --preset imagewoof --root /data/imagenet/train \\
        --test-root /data/imagenet/val --dit /models/DiT-XL-2-256 --decode-vae /models/sd-vae-ft-mse

Every stage is resumable: rerun with --resume after a kill and the run ends exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddfast import perf
from ddfast.config import ALIASES, PRESETS, Config, field_types, parse_cli_overrides, resolve
from ddfast.data import check_same_classes, open_source
from ddfast.data.cache import build_latents, to_model_range
from ddfast.data.imagenet import is_imagenet_wnid
from ddfast.diffusion import Diffusion
from ddfast.distributed import Dist
from ddfast.dit_original import is_original_checkpoint, load_original
from ddfast.errors import ConfigError, DdfastError, ModelError
from ddfast.io import prepare_run_dir, to_uint8_image, write_json, write_text
from ddfast.memory import MemoryBank
from ddfast.models import (
    DIT_PRESETS,
    VAE_PRESETS,
    build_dit,
    build_vae,
    check_compatible,
    fold_difffit,
    load_dit,
    load_vae,
    null_label,
    save_pipeline,
    set_trainable,
    vae_factor,
)
from ddfast.perf import attention_backends
from ddfast.progress import bars_enabled, log, set_quiet
from ddfast.report import write_report
from ddfast.sample import class_specs, write_class_grids, write_distilled
from ddfast.trainer import (
    StageSpec,
    StopRequested,
    model_autocast,
    steps_per_epoch,
    train_stage,
)


@dataclass
class Setup:
    cfg: Config
    out: Path
    device: torch.device
    precision: str
    progress: bool


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={setting} but no CUDA device is visible; use --device cpu")
    return device


def parse_subset(subset: str | None) -> str | list[str] | None:
    if not subset:
        return None
    return [s.strip() for s in subset.split(",") if s.strip()] if "," in subset else subset


def open_data(cfg: Config, split: str):
    d = cfg.data
    root = d.test_root if (split == "test" and d.source == "imagefolder") else d.root
    if d.source == "imagefolder" and not root:
        flag = "--test-root" if split == "test" else "--root"
        example = "ImageNet val" if split == "test" else "ImageNet train"
        raise ConfigError(f"data.source=imagefolder needs a {split} folder: pass {flag} DIR "
                          f"(a class-per-folder tree, e.g. {example} in wnid folders)")
    return open_source(d.source, split, root=root, subset=parse_subset(d.subset),
                       resolution=d.resolution or None, channels=d.channels or None)


def cap_per_class(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of at most ``limit`` items of every class (the first ones), in source order;
    all items when ``limit`` is 0. Unlike the evaluation subset rule, fewer is not an error."""
    if limit <= 0:
        return torch.arange(labels.shape[0])
    keep, seen = [], {}
    for i, c in enumerate(labels.tolist()):
        if seen.get(c, 0) < limit:
            keep.append(i)
            seen[c] = seen.get(c, 0) + 1
    return torch.tensor(keep, dtype=torch.int64)


def earlier_runs(out: Path) -> list[dict]:
    """What the earlier invocations of a resumed run folder recorded (their timings and the
    stages they read from disk), oldest first, so that a resume, which times only what it
    computes, does not erase how long the folder's outputs took to make."""
    path = out / "summary.json"
    if not path.is_file():  # a killed run: nothing was recorded before it
        return []
    prev = json.loads(path.read_text())
    return [*prev.get("earlier_runs", []),
            {"timings_s": prev["timings_s"], "reused": prev.get("reused", [])}]


def finetune_steps(cfg: Config, num_items: int) -> int:
    """Fine-tuning steps: ``optim.steps``, or ``optim.epochs`` passes over ``num_items``."""
    o = cfg.optim
    return o.steps if o.steps > 0 else o.epochs * steps_per_epoch(num_items, o.batch_size)


def check_refreshes(cfg: Config, num_items: int) -> None:
    """Refuse epoch timing whose first memory refresh would come at or after the last step:
    the memories would stay empty and the memory terms off for the whole run."""
    total = finetune_steps(cfg, num_items)
    every = cfg.memory.refresh_every or steps_per_epoch(num_items, cfg.optim.batch_size)
    if cfg.memory.timing == "epoch" and every >= total:
        raise ConfigError(
            f"memory.timing=epoch refreshes the memories every {every} steps (one pass over "
            f"{num_items} images at batch {cfg.optim.batch_size}), but fine-tuning runs {total}: "
            f"the memories would stay empty and the memory terms off. Set "
            f"memory.refresh_every below {total} (e.g. {max(1, total // 8)} for 8 refreshes) "
            f"or fine-tune longer")


def holdout_indices(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the last ``n`` items of every class, in source order: the validation split
    (``data.holdout``). The first items stay in training, so the random-real baseline (the first
    IPC of each class) is the same with or without a holdout. Every class keeps at least one
    training item, or this raises."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64)
    counts = torch.bincount(labels)
    short = [c for c, k in enumerate(counts.tolist()) if 0 < k <= n]
    if short:
        raise ConfigError(f"data.holdout={n} would leave classes {short[:10]} without training "
                          f"images (smallest class: {int(counts[counts > 0].min())}): pass a "
                          f"smaller holdout")
    out = []
    for c in torch.nonzero(counts).flatten().tolist():
        out.append(torch.nonzero(labels == c).flatten()[-n:])
    return torch.sort(torch.cat(out)).values


def training_indices(labels: torch.Tensor, max_per_class: int, holdout: int) -> torch.Tensor:
    """The items a run trains on: the holdout removed, then the first ``max_per_class``."""
    held = set(holdout_indices(labels, holdout).tolist())
    rest = torch.tensor([i for i in range(labels.shape[0]) if i not in held], dtype=torch.int64)
    return rest[cap_per_class(labels[rest], max_per_class)]


def _is_folder(spec: str) -> bool:
    return bool(spec) and Path(spec).expanduser().exists()


def load_models(cfg: Config, num_classes: int, data_channels: int, resolution: int):
    """(dit, vae, decode_vae, pretrained) as the model section asks."""
    m = cfg.model
    if not m.dit:
        raise ConfigError(f"preset {cfg.preset} needs a pretrained DiT: pass --dit DIR (a "
                          f"diffusers DiT folder such as DiT-XL-2-256) ")
    vae = decode_vae = None
    if m.vae in VAE_PRESETS:
        # An autoencoder trained here: with a preset DiT, trained first in this run
        # (``vae_trained_here``); with a DiT folder, the one trained with it (its vae/).
        if _is_folder(m.dit) and (Path(m.dit).expanduser() / "vae").is_dir():
            vae = load_vae(m.dit)
        elif m.dit in DIT_PRESETS:
            vae = build_vae(m.vae, in_channels=data_channels, sample_size=resolution)
        else:
            raise ConfigError(f"model.vae={m.vae} is an architecture to train here, with a "
                              f"from-scratch DiT (model.dit a preset) or read from a DiT folder "
                              f"trained with it (its vae/); model.dit={m.dit!r} is neither. "
                              f"Pass a trained VAE folder (e.g. sd-vae-ft-ema), a DiT preset, "
                              f"or --vae none for pixel space")
    elif m.vae not in ("none", ""):
        vae = load_vae(str(Path(m.vae).expanduser()))
    elif m.vae == "" and _is_folder(m.dit) and (Path(m.dit) / "vae").is_dir():
        vae = load_vae(m.dit)
    elif m.vae == "":
        raise ConfigError("this preset encodes with a VAE: pass --vae DIR (sd-vae-ft-ema in "
                          "diffusers layout), or a --dit pipeline folder that holds vae/")
    decode_vae = load_vae(str(Path(m.decode_vae).expanduser())) if m.decode_vae else vae
    if is_original_checkpoint(m.dit):
        dit = load_original(m.dit, weights=m.dit_weights, heads=m.dit_heads or None)
        pretrained = True
    elif _is_folder(m.dit):
        dit, pretrained = load_dit(str(Path(m.dit).expanduser())), True
    elif m.dit in DIT_PRESETS:
        in_ch = vae.config.latent_channels if vae is not None else data_channels
        factor = vae_factor(vae)
        if resolution % factor:
            raise ModelError(f"resolution {resolution} is not divisible by the VAE factor "
                             f"{factor}; pass --resolution a multiple of {factor}")
        torch.manual_seed(cfg.run.seed)  # the from-scratch initialisation is part of the run
        dit = build_dit(m.dit, in_channels=in_ch, sample_size=resolution // factor,
                        num_classes=num_classes, patch_size=m.patch_size or None)
        pretrained = False
    else:
        raise ModelError(f"model.dit={m.dit!r} is neither an existing folder, a .pt file nor a "
                         f"preset; presets are {', '.join(DIT_PRESETS)}")
    return dit, vae, decode_vae, pretrained


def vae_trained_here(cfg: Config) -> bool:
    """Whether this run trains its autoencoder (a ``model.vae`` preset with a preset DiT)."""
    return cfg.model.vae in VAE_PRESETS and cfg.model.dit in DIT_PRESETS \
        and not _is_folder(cfg.model.dit)


def conditioning_labels(cfg: Config, source, pretrained: bool) -> list[int]:
    """The DiT label of each dataset class: its ImageNet index (a pretrained ImageNet DiT reuses
    its class embedding) or simply the class index (a DiT trained here)."""
    own = list(range(len(source.class_names)))
    has_wnids = all(is_imagenet_wnid(name) for name in source.class_names)
    mode = cfg.model.conditioning
    if mode == "auto":
        mode = "imagenet" if pretrained and has_wnids else "class"
    if mode == "imagenet":
        if not has_wnids:
            raise ConfigError("model.conditioning=imagenet needs ImageNet wnid class folders; "
                              "use --model.conditioning class")
        return list(source.cond_labels)
    return own


def run(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run the whole job; returns the summary (also written to <out>/summary.json)."""
    device = pick_device(cfg.run.device)
    dist = Dist.from_env(device.type)  # one process unless started by torchrun
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    set_quiet(not dist.main)
    main = dist.main
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    progress = bars_enabled(cfg.run.progress)
    out = Path(cfg.run.out or f"runs/{cfg.preset}")
    timings: dict[str, float] = {}
    reused: list[str] = []  # stages whose output an earlier invocation left in the run folder
    t0 = time.perf_counter()

    source = open_data(cfg, "train")  # checks the data before anything is written
    test_source = open_data(cfg, "test")
    check_same_classes(source, test_source)
    dit, vae, decode_vae, pretrained = load_models(
        cfg, len(source.class_names), source.channels, source.resolution)
    cond = conditioning_labels(cfg, source, pretrained)
    check_compatible(dit, vae, resolution=source.resolution, data_channels=source.channels,
                     num_classes=len(cond), cond_labels=cond)
    if not pretrained and cfg.pretrain.steps == 0:
        raise ConfigError(f"model.dit={cfg.model.dit} is a preset with random weights: set "
                          f"--pretrain.steps N to train it here first, or pass a trained DiT "
                          f"folder with --dit")
    # Refuse an occupied run folder before spending anything; write only once the data is read.
    prepare_run_dir(out, config_json=cfg.to_json(), resume=resume, overwrite=overwrite,
                    write=False)
    indices = training_indices(source.labels, cfg.data.max_per_class, cfg.data.holdout)
    resumed = None
    vae_report = None
    if vae_trained_here(cfg):  # Stage 0: the autoencoder, before anything is encoded with it
        if main:
            resumed = prepare_run_dir(out, config_json=cfg.to_json(), resume=resume,
                                      overwrite=overwrite)
        resumed = dist.broadcast_object(resumed)
        t = time.perf_counter()
        vae, vae_report = autoencoder_stage(cfg, out, vae, source, indices, device, progress,
                                            dist, reused)
        decode_vae = vae if not cfg.model.decode_vae else decode_vae
        timings["vae"] = time.perf_counter() - t
    for turn in (True, False):  # rank 0 fills the latent cache first; the others then read it
        if turn == main:
            latents = build_latents(source, vae, indices=indices,
                                    cache_dir=cfg.data.cache_dir or None, device=device,
                                    batch_size=cfg.data.encode_batch_size,
                                    progress=progress and main, hflip=cfg.data.hflip)
        dist.barrier()
    if cfg.objective.method != "dit":
        check_refreshes(cfg, len(latents))  # before anything is written or trained
    if resumed is None:
        if main:
            resumed = prepare_run_dir(out, config_json=cfg.to_json(), resume=resume,
                                      overwrite=overwrite)
        resumed = dist.broadcast_object(resumed)
    log(f"ddfast: run folder {out} ({'resumed' if resumed else 'new'}), device {device}, "
        f"{precision}, {len(latents)} training images in {len(source.class_names)} classes"
        + (f", {dist.world} processes" if dist.active else ""))
    timings["data"] = time.perf_counter() - t0 - timings.get("vae", 0.0)  # the VAE apart
    diffusion = Diffusion(device=device)
    cond_table = torch.tensor(cond, device=device)
    null = null_label(dit)
    metrics = out / "metrics.jsonl"
    scale = latents.scale

    # Stage 1: a from-scratch DiT when no pretrained one was given.
    if not pretrained:
        t = time.perf_counter()
        base_dir = out / "pretrained"
        if base_dir.is_dir():
            dit = load_dit(str(base_dir))
            reused.append("pretrain")
        else:
            dit = dit.to(device)
            set_trainable(dit, "all")
            p = cfg.pretrain
            spec = StageSpec("pretrain", p.steps, p.batch_size, p.lr, 0.0, p.warmup,
                             p.ema_decay, cfg.optim.label_dropout, log_every=cfg.run.log_every,
                             ckpt_every=cfg.run.ckpt_every, seed=cfg.run.seed, decay=p.decay)
            ema = train_stage(dit, latents, diffusion, cond_table, null, spec,
                              ckpt_path=out / "ckpt" / "pretrain.safetensors",
                              metrics_path=metrics, precision=precision, progress=progress,
                              compile=cfg.run.compile, dist=dist)
            ema.copy_to()
            if main:
                save_pipeline(base_dir, dit.cpu(), vae)
            dist.barrier()
        timings["pretrain"] = time.perf_counter() - t
    dit = dit.to(device)

    # Stage 2: the method.
    model = dit
    if cfg.objective.method != "dit":
        t = time.perf_counter()
        model_dir = out / "model"
        if model_dir.is_dir():
            model = load_dit(str(model_dir)).to(device)
            reused.append("finetune")
        else:
            model = copy.deepcopy(dit)
            set_trainable(model, cfg.optim.trainable)
            o = cfg.optim
            total = finetune_steps(cfg, len(latents))
            dim = int(np.prod(latents.latent_shape))
            bank = MemoryBank(len(cond), dim, real_capacity=cfg.memory.real_capacity,
                              gen_capacity=cfg.memory.gen_capacity, policy=cfg.policy,
                              timing=cfg.memory.timing, device=device)
            spec = StageSpec("finetune", total, o.batch_size, o.lr, o.weight_decay, 0,
                             o.ema_decay, o.label_dropout, cfg.objective.lambda_r,
                             cfg.objective.lambda_g, cfg.run.log_every, cfg.run.ckpt_every,
                             cfg.run.seed, cfg.objective.accumulate_bug,
                             cfg.memory.refresh_every)
            ema = train_stage(model, latents, diffusion, cond_table, null, spec,
                              ckpt_path=out / "ckpt" / "finetune.safetensors",
                              metrics_path=metrics, bank=bank, precision=precision,
                              progress=progress, compile=cfg.run.compile, dist=dist)
            ema.copy_to()
            if cfg.optim.trainable == "difffit":
                model = fold_difffit(model)
            if main:
                save_pipeline(model_dir, model.cpu(), decode_vae)
            dist.barrier()
            model = model.to(device)
        timings["finetune"] = time.perf_counter() - t

    # The attention kernel the DiT actually runs (flash, cuDNN, ... or the math fallback).
    probe = torch.zeros(2, *latents.latent_shape, device=device)  # (2, c, h, w)
    probe_t = torch.zeros(2, dtype=torch.long, device=device)  # (2,)
    with model_autocast(device, precision):
        attention = attention_backends(lambda: model(probe, timestep=probe_t,
                                                     class_labels=probe_t, return_dict=False))
    log(f"[sample] attention kernels: {', '.join(attention) or 'none found'}")

    # Stage 3: the distilled set (the largest IPC; smaller ones are its first files).
    t = time.perf_counter()
    classes = class_specs(source.class_names, cond)
    ipc = max(cfg.sample.ipc)
    s = cfg.sample
    distilled = out / "distilled"
    if decode_vae is not None:
        decode_vae = decode_vae.to(device).eval()
    sampler_model = model
    if cfg.run.compile:  # on a GPU with CUDA graphs: each sampling batch has a static shape
        sampler_model = perf.compile(
            model, mode="reduce-overhead" if device.type == "cuda" else "default")

    def draw(folder: Path, n: int, anchors: dict | None = None) -> None:
        write_distilled(folder, sampler_model, decode_vae, diffusion, classes, n,
                        latent_shape=latents.latent_shape, null_label=null, scale=scale,
                        steps=s.steps, sampler=s.sampler, guidance_scale=s.guidance_scale,
                        guidance_channels=s.guidance_channels, seed=s.seed,
                        batch_size=s.batch_size, device=device, precision=precision,
                        progress=progress, config_digest=cfg.digest(), dist=dist,
                        guidance_interval=s.guidance_interval, anchors=anchors,
                        strength=anchor_strength(cfg))

    if all((distilled / c.folder / f"{i:05d}.png").is_file() for c in classes
           for i in range(ipc)):
        reused.append("sample")
    draw(distilled, ipc)
    real = {}
    for c in classes:
        idx = (source.labels == c.index).nonzero().flatten()[:10]
        real[c.index] = [to_uint8_image(x) for x in to_model_range(source.images(idx))]
    grids = []
    if main:
        grids = write_class_grids(out / "grids", distilled, classes, real, min(ipc, 50))
    timings["sample"] = time.perf_counter() - t

    # Stage 3b (sample.select, a departure from the paper's sampler): k-means prototypes of
    # each class's training images in a full-data ConvNet's features, answered for each IPC by
    # the nearest samples of a pool (prototypes) or by one sample started from each
    # prototype's mean item (anchored; ddfast/select.py).
    selected: dict[int, Path] = {}
    if s.select != "none":
        t = time.perf_counter()
        selected = prototype_sets(cfg, out, draw, source, test_source, indices, classes, real,
                                  device, progress, dist, latents)
        timings["select"] = time.perf_counter() - t

    # Stage 4: train fresh classifiers on the distilled set, test on real data (method.md 5).
    table = None
    if cfg.eval.enabled:
        t = time.perf_counter()
        table = evaluate_distilled(cfg, distilled, source, test_source, out / "eval", device,
                                   progress, dist, selected)
        timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    summary = {
        "config_digest": cfg.digest(),
        "preset": cfg.preset,
        "method": cfg.objective.method,
        "policy": cfg.policy if cfg.objective.method != "dit" else None,
        "device": str(device),
        "run_folder": str(out),
        "distilled": str(distilled),
        "ipc": list(cfg.sample.ipc),
        "training_images": len(latents),
        "vae": vae_report,
        "held_out": cfg.data.holdout * len(source.class_names),
        "model": str(out / "model") if cfg.objective.method != "dit" else None,
        "grids": [str(p) for p in grids],
        "selected": selection_summary(cfg, out, selected),
        "evaluation": str(out / "eval" / "results.md") if table else None,
        "metrics": str(metrics),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "reused": reused,
        "earlier_runs": earlier_runs(out) if resumed else [],
        "attention": attention,
    }
    if main:
        write_json(out / "summary.json", summary)
        write_report(out)
    dist.barrier()
    if table:
        log("\n" + table)
    log(f"ddfast: done in {timings['total']:.1f} s")
    log(f"  distilled set : {distilled}/<class>/<index>.png "
        f"(IPC k = the first k files of each class)")
    log(f"  class grids   : {out / 'grids'}")
    if selected:
        how = (f"picked from {out / 'pool'}" if s.select == "prototypes"
               else "started from the prototypes")
        log(f"  selected sets : {out / 'selected'}/ipc<k>/<class>/<index>.png (one folder per "
            f"IPC, {how}; grids in {out / 'grids'}/selected-ipc<k>)")
    if summary["model"]:
        log(f"  model         : {summary['model']} (diffusers format)")
    log(f"  metrics       : {metrics}")
    if table:
        log(f"  evaluation    : {out / 'eval'} (results.md, per-IPC results.json)")
    log(f"  report        : {out / 'report.md'}")
    log(f"  summary       : {out / 'summary.json'}")
    return summary


def autoencoder_stage(cfg: Config, out: Path, vae, source, indices: torch.Tensor,
                      device: torch.device, progress: bool, dist: Dist, reused: list[str]):
    """The run's autoencoder (``model.vae`` a preset): trained on the training images (the
    held-out ones stay out), scaled to unit latent std and written to ``<out>/vae``, or read
    from there when an earlier invocation finished it. Returns (vae, its report)."""
    from ddfast.autoencoder import (
        VaeSpec,
        fit_scaling_factor,
        reconstruction_error,
        save_vae,
        train_vae,
    )

    folder = out / "vae"
    report_path = out / "vae.json"
    if not (folder / "config.json").is_file():
        if dist.main:
            p = cfg.pretrain
            log(f"[vae] training {cfg.model.vae} for {p.vae_steps} steps of {p.vae_batch_size} "
                f"on {len(indices)} images (lr {p.vae_lr:g}, {p.vae_decay})")
            images = source.images(indices)  # (N, C, H, W) uint8
            torch.manual_seed(cfg.run.seed)  # its initialisation is part of the run
            vae = build_vae(cfg.model.vae, in_channels=source.channels,
                            sample_size=source.resolution)
            spec = VaeSpec(p.vae_steps, p.vae_batch_size, p.vae_lr, p.vae_kl, cfg.run.seed,
                           hflip=cfg.data.hflip, log_every=cfg.run.log_every,
                           decay=p.vae_decay)
            last = train_vae(vae, images, spec, device=device, metrics_path=out / "metrics.jsonl",
                             progress=progress)
            vae = vae.cpu()
            scale = fit_scaling_factor(vae, images)
            report = {"preset": cfg.model.vae, "parameters": sum(q.numel() for q in
                                                                 vae.parameters()),
                      "latent_shape": list(posterior_shape(vae, source)), "scaling_factor": scale,
                      "last_steps": last}
            held = holdout_indices(source.labels, cfg.data.holdout)
            if len(held):  # the round trip on images no run trains on
                report["held_out_reconstruction"] = reconstruction_error(
                    vae, source.images(held))
            write_json(report_path, report)
            save_vae(folder, vae)
        dist.barrier()
    else:
        reused.append("vae")
    vae = load_vae(str(folder))
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return vae, report


def posterior_shape(vae, source) -> tuple[int, int, int]:
    """(c, h, w) of the VAE's latents of one image of ``source``."""
    f = vae_factor(vae)
    return int(vae.config.latent_channels), source.resolution // f, source.resolution // f


def evaluate_distilled(cfg: Config, distilled: Path, source, test_source, out: Path,
                       device: torch.device, progress: bool, dist: Dist | None = None,
                       selected: dict[int, Path] | None = None) -> str:
    """Evaluate the IPC-k subsets of the distilled set (and the prototype-selected set of each
    IPC in ``selected``); each finished set is kept on disk, so a resumed run evaluates only
    what is missing. Returns the merged markdown table. With ``dist`` the runs of each set are
    spread over the ranks and rank 0 writes the results."""
    dist = dist or Dist.single()
    from ddfast.eval import evaluate, load_folder_set, merge_tables, write_results

    test_x = test_source.images(range(len(test_source)))  # (N, C, H, W) uint8
    selected = selected or {}

    def one(folder: Path, ipc: int, done: Path, method: str) -> dict:
        if not done.is_file():
            x, y, names = load_folder_set(folder, ipc=ipc)
            if list(names) != list(source.class_names):
                raise DdfastError(f"the classes of {folder} ({names}) differ from the data's "
                                  f"{source.class_names}; rerun sampling with --overwrite")
            log(f"[eval] IPC {ipc}, {method}: {', '.join(cfg.eval.networks)} x "
                f"{cfg.eval.repeats} ({cfg.eval.protocol} protocol)")
            result = evaluate(x, y, test_x, test_source.labels, networks=cfg.eval.networks,
                              repeats=cfg.eval.repeats, epochs=cfg.eval.epochs,
                              protocol=cfg.eval.protocol, device=device, seed=cfg.run.seed,
                              batch_size=cfg.eval.batch_size or None, progress=progress,
                              dist=dist, dataset=cfg.data.source)
            if dist.main:
                write_results(done.parent, result, method=method, ipc=ipc)
            dist.barrier()
        return json.loads(done.read_text())

    records = []
    for ipc in sorted(cfg.sample.ipc):
        records.append(one(distilled, ipc, out / f"ipc{ipc}" / "results.json",
                           cfg.objective.method))
        if ipc in selected:
            records.append(one(selected[ipc], ipc, out / f"selected-ipc{ipc}" / "results.json",
                               selected_label(cfg)))
        if cfg.eval.baseline:
            records.append(random_real_record(cfg, source, test_source, test_x, ipc, device,
                                              progress, dist))
    table = merge_tables(records)
    if cfg.eval.baseline:
        table += ("\n" + RANDOM_REAL + ": the first IPC real training images of each class "
                  "under the same recipe; a distilled set must beat it to be of use.\n")
        lines = beat_lines(records)
        for line in lines:
            log(line)
        table += "".join(f"\n- {line.removeprefix('[eval] ')}" for line in lines) + "\n"
    if dist.main:
        write_text(out / "results.md", table)
    return table


RANDOM_REAL = "random real"


def cache_folder(cfg: Config) -> Path:
    """Where results shared by every run on the same data are cached: ``--data.cache_dir``, else
    ``$DDFAST_CACHE`` or ``~/.cache/ddfast`` (the latent cache's folder)."""
    from ddfast.data.cache import default_cache_dir

    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


def selected_label(cfg: Config) -> str:
    """The row name of a selection stage's set: the method, and how the set was made."""
    from ddfast.select import pool_size

    if cfg.sample.select == "anchored":
        return f"{cfg.objective.method} + anchored (strength {anchor_strength(cfg):g})"
    n = pool_size(cfg.sample.pool, max(cfg.sample.ipc))
    return f"{cfg.objective.method} + prototypes (pool {n})"


def anchor_strength(cfg: Config) -> float:
    """The noise level anchored sampling starts from (1 = the paper's sampler)."""
    from ddfast.select import ANCHOR_STRENGTH

    if cfg.sample.select != "anchored":
        return 1.0
    return cfg.sample.strength or ANCHOR_STRENGTH


def prototype_sets(cfg: Config, out: Path, draw, source, test_source, indices: torch.Tensor,
                   classes, real: dict, device: torch.device, progress: bool,
                   dist: Dist, latents=None) -> dict[int, Path]:
    """The set of every IPC that ``sample.select`` makes (``out/selected/ipc<k>``). A ConvNet
    trained on every training image gives the features (cached per data set) in which each
    class's training images are clustered into k prototypes. ``prototypes``: ``draw(folder, n)``
    samples a pool (``out/pool``, the distilled set's seeds) and ``prototype_pick`` takes the
    sample nearest each prototype. ``anchored``: ``draw(folder, k, anchors)`` starts one sample
    from each prototype's mean training item (``cluster_anchors``; ``latents`` holds the items,
    row i being ``indices[i]``). Each set folder is written once, its manifest last; a resumed
    run redoes only what is missing."""
    from ddfast.eval import load_folder_set
    from ddfast.select import (
        FEATURE_BATCH,
        FEATURE_RECIPE,
        cluster_anchors,
        feature_epochs,
        feature_network,
        feature_network_name,
        image_features,
        pool_size,
        prototype_pick,
        write_selection,
    )

    anchored = cfg.sample.select == "anchored"
    n = pool_size(cfg.sample.pool, max(cfg.sample.ipc))
    folders = {k: out / "selected" / f"ipc{k}" for k in sorted(cfg.sample.ipc)}
    todo = [k for k, f in folders.items() if not (f / "manifest.json").is_file()]
    pool = out / "pool"
    if todo and not anchored:
        log(f"[select] pool of {n} samples per class in {pool}")
        draw(pool, n)
    anchors: dict[int, dict] = {}
    if dist.main and todo:
        network = feature_network_name(cfg.eval.networks)
        epochs = feature_epochs(cfg.sample.feature_epochs, len(indices))
        model, normalise, record = feature_network(
            source, indices, test_source, network=network, epochs=epochs, seed=cfg.run.seed,
            device=device, dataset=cfg.data.source, cache_dir=cache_folder(cfg),
            progress=progress)
        write_json(out / "selected" / "feature_network.json",
                   {"network": network, "epochs": epochs, "protocol": FEATURE_RECIPE,
                    "batch_size": FEATURE_BATCH,
                    "training_images": len(indices), "test_accuracy": record["accuracy"]})
        real_f = image_features(model, normalise, (
            len(indices), lambda a, b: source.images(indices[a:b].tolist())))
        real_y = torch.as_tensor(source.labels)[indices]
        if anchored:
            def items(c: int) -> torch.Tensor:
                rows = (real_y == c).nonzero().flatten()
                return latents.items(rows.to(latents.labels.device)).cpu()

            for k in todo:
                anchors[k] = cluster_anchors(real_f, real_y, items, k, seed=cfg.run.seed)
        else:
            px, py, names = load_folder_set(pool, ipc=n)
            if list(names) != list(source.class_names):
                raise DdfastError(f"the pool's classes {names} differ from the data's "
                                  f"{source.class_names}; rerun with --overwrite")
            pool_f = image_features(model, normalise, px)
            for k in todo:
                pick = prototype_pick(pool_f, py, real_f, real_y, k, seed=cfg.run.seed)
                write_selection(pool, folders[k], pick)
                log(f"[select] IPC {k}: {folders[k]}")
    if anchored and todo:
        anchors = dist.broadcast_object(anchors)  # every rank draws its share of each set
        for k in todo:
            log(f"[select] IPC {k}: {k} samples per class started from the prototypes, "
                f"strength {anchor_strength(cfg):g}, in {folders[k]}")
            draw(folders[k], k, anchors[k])
    if dist.main:
        for k, folder in folders.items():
            write_class_grids(out / "grids" / f"selected-ipc{k}", folder, classes, real,
                              min(k, 50))
    dist.barrier()
    return folders


def selection_summary(cfg: Config, out: Path, selected: dict[int, Path]) -> dict | None:
    """What the summary says of the selection stage's sets (None without them)."""
    if not selected:
        return None
    path = out / "selected" / "feature_network.json"
    anchored = cfg.sample.select == "anchored"
    return {"rule": cfg.sample.select,
            "pool": None if anchored else str(out / "pool"),
            "strength": anchor_strength(cfg) if anchored else None,
            "sets": {str(k): str(f) for k, f in selected.items()},
            "grids": {str(k): str(out / "grids" / f"selected-ipc{k}") for k in selected},
            "feature_network": json.loads(path.read_text()) if path.is_file() else None}


def random_real_record(cfg: Config, source, test_source, test_x: torch.Tensor, ipc: int,
                       device: torch.device, progress: bool, dist: Dist | None = None) -> dict:
    """The random-real baseline of one IPC: the first ``ipc`` real images of each class, trained
    and tested exactly as the distilled set is. Cached per data set and recipe (outside the run
    folder, beside the latent cache), so every run on the same data reuses it."""
    from dataclasses import asdict

    from ddfast.eval import evaluate, load_source_set
    from ddfast.eval.protocol import get_protocol

    dist = dist or Dist.single()
    e = cfg.eval
    test_y = test_source.labels
    key = {"source": source.fingerprint(), "test": test_source.fingerprint(), "ipc": ipc,
           "recipe": asdict(get_protocol(e.protocol)), "networks": list(e.networks),
           "repeats": e.repeats, "epochs": e.epochs, "batch_size": e.batch_size,
           "seed": cfg.run.seed, "dataset": cfg.data.source, "device": device.type}
    key = json.loads(json.dumps(key))  # as it reads back from the cache (tuples -> lists)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_folder(cfg)
    path = folder / "baselines" / f"random-real-{digest}.json"
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            if record.get("key") == key:
                log(f"[eval] IPC {ipc}: {RANDOM_REAL} baseline from {path}")
                return record
        except (OSError, ValueError):
            pass  # unreadable: evaluate again and replace it
    log(f"[eval] IPC {ipc}: {RANDOM_REAL} baseline, {', '.join(e.networks)} x {e.repeats} "
        f"(cached afterwards in {path.parent})")
    x, y, _ = load_source_set(source, ipc)
    result = evaluate(x, y, test_x, test_y, networks=e.networks, repeats=e.repeats,
                      epochs=e.epochs, protocol=e.protocol, device=device, seed=cfg.run.seed,
                      batch_size=e.batch_size or None, progress=progress, dist=dist,
                      dataset=cfg.data.source)
    record = {**result, "method": RANDOM_REAL, "ipc": ipc, "key": key}
    if dist.main:
        try:
            write_json(path, record)
        except DdfastError as exc:  # a read-only cache costs a recomputation, not the run
            log(f"[eval] could not cache the baseline ({exc})")
    return record


def beat_lines(records: list[dict]) -> list[str]:
    """One line per (IPC, network): the method's best mean against the random-real one."""
    lines = []
    base = {r["ipc"]: r for r in records if r["method"] == RANDOM_REAL}
    for r in records:
        if r["method"] == RANDOM_REAL or r["ipc"] not in base:
            continue
        for net, cell in r["networks"].items():
            ref = base[r["ipc"]]["networks"].get(net)
            if ref is None:
                continue
            gap = cell["best_mean"] - ref["best_mean"]
            verdict = "beats" if gap > 0 else "does NOT beat"
            lines.append(f"[eval] IPC {r['ipc']} {net}: {r['method']} {cell['best_mean']:.2f} % "
                         f"{verdict} {RANDOM_REAL} {ref['best_mean']:.2f} % ({gap:+.2f})")
    return lines


def help_text() -> str:
    import ddfast.config as config_module

    src = inspect.getsource(config_module)
    lines = [__doc__.strip(), "", "options:",
             "  --preset NAME     " + " | ".join(PRESETS) + " (default digits)",
             "  --resume          continue the run in --out after an interruption",
             "  --overwrite       delete the run in --out and start over",
             "", "settings (--section.field VALUE):"]
    for key in field_types():
        if "." not in key:
            continue
        name = key.split(".", 1)[1]
        comment = next((ln.split("#", 1)[1].strip() for ln in src.splitlines()
                        if ln.strip().startswith(f"{name}:") and "#" in ln), "")
        alias = next((a for a, k in ALIASES.items() if k == key), None)
        flag = f"--{key}" + (f" (--{alias})" if alias else "")
        lines.append(f"  {flag:<44} {comment}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(help_text())
        return 0
    preset, resume, overwrite, rest = "digits", False, False, []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            resume = True
        elif a == "--overwrite":
            overwrite = True
        elif a == "--preset" or a.startswith("--preset="):
            if "=" in a:
                preset = a.split("=", 1)[1]
            elif i + 1 < len(args):
                preset, i = args[i + 1], i + 1
            else:
                print("error: --preset needs a name", file=sys.stderr)
                return 2
        else:
            rest.append(a)
        i += 1
    def terminate(signum, frame):  # outside training (which stops at a step's end)
        raise StopRequested(f"stopped by {signal.Signals(signum).name}", signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        cfg = resolve(preset, parse_cli_overrides(rest))
        run(cfg, resume=resume, overwrite=overwrite)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except DdfastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StopRequested as exc:
        print(f"{exc}: rerun the same command with --resume to continue", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted: rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
