"""The study's outputs from its cells on disk: results.json, results.md, plots and sample grids.

Every figure in them is read from a cell that ``ddfast.study`` wrote; a cell not yet computed is
shown as missing, never filled in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ddfast.io import read_jsonl, write_json, write_png, write_text

PROTOCOL_NAMES = {"dc": "DC/DSA recipe (1000 epochs, DSA augmentation)",
                  "small": "IDC recipe (1000 epochs at batch 64, IDC's DSA, CutMix on half the "
                           "batches)"}
LABELS = {"random": "random real", "dit": "DiT (no fine-tune)", "minimax": "Minimax (fifo)",
          "ours-step": "ours (adaptive, per step)", "ours-epoch": "ours (adaptive, per epoch)"}


def _invocations(summary: dict) -> list[dict]:
    """A run folder's invocations, oldest first: a resumed run's summary records only its own
    and keeps the earlier ones in ``earlier_runs`` (``ddfast.train.earlier_runs``)."""
    return [*summary.get("earlier_runs", []), summary]


def run_total_seconds(summary: dict) -> float:
    """Every invocation's time in one run folder."""
    return sum(r["timings_s"]["total"] for r in _invocations(summary))


def logged_seconds(metrics: Path, stage: str, batch_size: int) -> float | None:
    """A training stage's time from its metrics log: each logged window's images over its rate
    (``images_per_s``), summed over the stage's steps. Unlike the summary's timings, which
    cover one invocation, this counts every step once however many invocations (a killed run
    resumed, a run continued from another's checkpoint) computed them. None without a log."""
    total, last = 0.0, 0
    for rec in read_jsonl(metrics):  # a line cut short by a kill is skipped
        if rec.get("stage") != stage or not rec.get("images_per_s"):
            continue
        total += (rec["step"] - last) * batch_size / rec["images_per_s"]
        last = rec["step"]
    return total if last else None


def stage_seconds(summary: dict, stage: str) -> float | None:
    """The time ``stage`` took in the invocation that computed it (the newest that did not
    read its output from disk), or None when none recorded it."""
    for r in reversed(_invocations(summary)):
        if stage in r["timings_s"] and stage not in r.get("reused", []):
            return r["timings_s"][stage]
    return None


def _stats(cells: list[dict], key: str = "acc_best") -> dict | None:
    vals = [c[key] for c in cells if c.get(key) is not None]
    if not vals:
        return None
    arr = np.asarray(vals, dtype=np.float64)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            "std": float(arr.std()), "n": len(vals)}


def _cells(study, prefix: str, ipc: int, proto: str, repeats: int = 0) -> list[dict]:
    out = []
    for r in range(repeats or study.scale.repeats_of(proto)):
        path = study.work / "evals" / f"{prefix}-r{r}-ipc{ipc}-{proto}.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


def collect(study) -> dict:
    """Everything the report shows, as one JSON-ready dict."""
    from ddfast.study import ABLATED, METHODS, PUBLISHED, PUBLISHED_IPC, device_name

    s = study.scale
    rows = []
    for proto in s.protocols:
        for method in METHODS:
            for ipc in sorted({*s.ipc, *s.ipc_once}):
                cells = _cells(study, method, ipc, proto)
                rows.append({"protocol": proto, "method": method, "ipc": ipc,
                             "evaluated": s.evaluates(proto, ipc),
                             "accuracy": _stats(cells), "pairwise": _stats(cells, "pairwise"),
                             "coverage": _stats(cells, "coverage"),
                             "repeats": [c["acc_best"] for c in cells]})
    ablations = []
    if s.ablations:
        reps = s.ablation_repeats or s.repeats
        # The default point over the same repeats as the swept ones, so the ranges compare.
        default_acc = _stats(_cells(study, "ours-step", 10, "dc", reps))
        cfg = study.config("probe", {})
        points = list(study.ablation_points())
        for key in ABLATED:
            section, name = key.split(".")
            base_value = getattr(getattr(cfg, section), name)
            series = [{"value": base_value, "default": True, "accuracy": default_acc}]
            for k, tag, extra in points:
                if k == key:
                    cells = _cells(study, f"ours-step{tag}", 10, "dc", reps)
                    series.append({"value": float(extra[key]), "default": False,
                                   "accuracy": _stats(cells),
                                   "pairwise": _stats(cells, "pairwise")})
            series.sort(key=lambda p: p["value"])
            ablations.append({"setting": key, "points": series})
    full_path = study.work / "full" / "result.json"
    full = json.loads(full_path.read_text()) if full_path.is_file() else None
    # Each run's own record of its stages (also the runs an earlier process finished, and the
    # earlier invocations of a resumed run).
    run_seconds = sum(run_total_seconds(json.loads(p.read_text()))
                      for p in sorted(study.work.glob("*/summary.json")))
    evals = [json.loads(p.read_text()) for p in sorted((study.work / "evals").glob("*.json"))]
    eval_seconds = sum(c["seconds"] for c in evals)
    threads = sorted({c["threads"] for c in evals if c.get("threads")})
    machines = {}
    for c in evals:
        machines[c.get("machine")] = machines.get(c.get("machine"), 0) + 1
    sampling_path = study.work / "sampling.json"
    return {
        "exact": exact(study),
        "matched": matched(study),
        "selected": selected(study),
        "anchored": anchored(study),
        "generators": generators(study),
        "probes": probes(study),
        "lambda_g": lambda_g_sweep(study),
        "sampling": json.loads(sampling_path.read_text()) if sampling_path.is_file() else None,
        "quality": quality(study),
        "mechanism": mechanism(study),
        "dataset": study.dataset, "scale": study.scale_name,
        "settings": {"ipc": sorted({*s.ipc, *s.ipc_once}), "ipc_once": list(s.ipc_once),
                     "repeats": s.repeats, "protocols": list(s.protocols),
                     "small_repeats": s.repeats_of("small"), "small_ipc": list(s.small_ipc),
                     "ablation_repeats": s.ablation_repeats or s.repeats,
                     "full_epochs": s.full_epochs,
                     "eval_epochs": s.eval_epochs or "protocol",
                     "run_overrides": study.base, "ablation_factors": list(s.sweep),
                     "epoch_refreshes": s.epoch_refreshes,
                     "exact_guidance": [str(g) if g == float("inf") else g
                                        for g in s.exact_guidance],
                     "exact_draws": s.exact_draws, "exact_small": list(s.exact_small),
                     "exact_roundtrip": list(s.exact_roundtrip), "matched_pool": s.matched_pool,
                     "select_pool": s.select_pool, "select_ipc": list(s.select_ipc),
                     "select_protocols": list(s.select_protocols),
                     "larger_pools": list(s.larger_pools),
                     "larger_pool_ipc": list(s.larger_pool_ipc),
                     "anchor_grid": list(s.anchor_grid)},
        "device": device_name(study.device), "torch": torch.__version__,
        # The CPU threads of each evaluation (cells from before this was recorded carry none).
        "eval_threads": threads,
        # The evaluations by machine (None: cells from before this was recorded).
        "eval_machines": [{"machine": m, "cells": n} for m, n in
                          sorted(machines.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))],
        "rows": rows, "ablations": ablations,
        "full": None if full is None else {"accuracy": full["last"], "epochs": full["epochs"],
                                           "num_train": full["num_train"]},
        "published": {"ipc": list(PUBLISHED_IPC), "methods": PUBLISHED.get(study.dataset, {})},
        "seconds": {"runs": round(run_seconds, 1), "evaluations": round(eval_seconds, 1),
                    "full_data": round(full["seconds"], 1) if full else 0.0,
                    "total": round(run_seconds + eval_seconds + (full["seconds"] if full else 0),
                                   1)},
    }


def _distilled_set(work: Path, run: str, ipc: int):
    """(images, labels) of a finished run's distilled set (run folder ``work/run``), or None."""
    from ddfast.eval.protocol import load_folder_set

    folder = work / run / "distilled"
    if not (folder / "manifest.json").is_file():
        return None
    x, y, _ = load_folder_set(folder, ipc=ipc)
    return x, y


def exact(study) -> list[dict]:
    """The exact-generator reference (IPC 10), one row per recipe, set (the training images
    drawn, or their round trip through the autoencoder) and guidance scale: accuracy and
    diversity over its draws ("inf" for the most confident images), and each draw's accuracy
    minus that of random real images under the same recipe and classifier seed."""
    import math

    from ddfast.study import EXACT_IPC

    rows = {}
    for p in study.exact_points():
        g = p.guidance
        row = rows.setdefault((p.protocol, p.roundtrip, g), {
            "guidance": "inf" if math.isinf(g) else g, "protocol": p.protocol,
            "set": "roundtrip" if p.roundtrip else "images", "cells": []})
        cell = _json(study.work / "evals" / f"{p.key}.json")
        if cell is not None:
            row["cells"].append(cell)
    out = []
    for (proto, _trip, g), row in rows.items():
        cells = row.pop("cells")
        gaps = []
        for c in cells:
            real = _json(study.work / "evals" / f"random-r{c['seed']}-ipc{EXACT_IPC}-{proto}.json")
            gaps.append(None if real is None else c["acc_best"] - real["acc_best"])
        out.append({**row, "draws": 1 if math.isinf(g) else study.scale.exact_draws,
                    "accuracy": _stats(cells), "pairwise": _stats(cells, "pairwise"),
                    "coverage": _stats(cells, "coverage"),
                    "repeats": [c["acc_best"] for c in cells],
                    "seeds": [c["seed"] for c in cells], "minus_random": gaps})
    return out


def matched(study) -> dict | None:
    """The generator's closest samples (``Scale.matched_pool``; IPC 10, DC/DSA recipe): one
    set, a classifier seed per repeat. None where the scale has no pool."""
    if not study.scale.matched_pool:
        return None
    cells = [json.loads(p.read_text()) for r in range(study.scale.repeats)
             if (p := study.work / "evals" / f"{study.matched_key(r)}.json").is_file()]
    return {"pool": study.scale.matched_pool, "runs": study.scale.repeats,
            "accuracy": _stats(cells), "pairwise": _stats(cells, "pairwise"),
            "coverage": _stats(cells, "coverage"), "repeats": [c["acc_best"] for c in cells]}


def selected(study) -> list[dict]:
    """Prototype selection (``Scale.select_pool``, then each of ``larger_pools``), one row per
    recipe, method, IPC and pool: accuracy and diversity over the repeats (``random``: the real
    images nearest the prototypes, one set, a classifier seed per repeat). Empty where the
    scale draws no pool."""
    from ddfast.study import METHODS

    s = study.scale
    points: dict[tuple, list[int]] = {}
    for method, r, ipc, proto in study.select_points():
        points.setdefault((proto, method, ipc, s.select_pool), []).append(r)
    for method, r, ipc, proto, pool in study.larger_pool_points():
        points.setdefault((proto, method, ipc, pool), []).append(r)
    out = []
    for proto in s.select_protocols:
        for method in METHODS:
            for pool in (s.select_pool, *s.larger_pools):
                for ipc in s.select_ipc:
                    repeats = points.get((proto, method, ipc, pool))
                    if repeats is None:
                        continue
                    keys = [study.select_key(method, r, ipc, proto, pool) for r in repeats]
                    cells = [json.loads(p.read_text()) for k in keys
                             if (p := study.work / "evals" / f"{k}.json").is_file()]
                    out.append({"method": method, "ipc": ipc, "protocol": proto,
                                "pool": None if method == "random" else pool,
                                "runs": len(repeats), "accuracy": _stats(cells),
                                "pairwise": _stats(cells, "pairwise"),
                                "coverage": _stats(cells, "coverage"),
                                "repeats": [c["acc_best"] for c in cells]})
    return out


def anchored(study) -> dict | None:
    """Anchored generation (``Scale.anchor_grid``): the held-out curve behind the strength, and
    one row per recipe, method and IPC at that strength, as ``selected``'s. None before the
    strength is chosen."""
    path = study.work / "anchored.json"
    if not study.scale.anchor_grid or not path.is_file():
        return None
    rec = json.loads(path.read_text())
    strength = rec["chosen"]
    points: dict[tuple, list[int]] = {}
    for method, r, ipc, proto in study.anchor_points():
        points.setdefault((proto, method, ipc), []).append(r)
    rows = []
    for (proto, method, ipc), repeats in points.items():
        cells = [json.loads(p.read_text()) for r in repeats
                 if (p := study.work / "evals" /
                     f"{study.anchored_key(method, r, ipc, proto, strength)}.json").is_file()]
        rows.append({"method": method, "ipc": ipc, "protocol": proto, "strength": strength,
                     "runs": len(repeats), "accuracy": _stats(cells),
                     "pairwise": _stats(cells, "pairwise"), "coverage": _stats(cells, "coverage"),
                     "repeats": [c["acc_best"] for c in cells]})
    return {"criterion": rec["criterion"], "curve": rec["points"], "strength": strength,
            "rows": rows}


def select_lines(res: dict) -> list[str]:
    """The prototype-selection tables, one per recipe: each method's selected sets beside its
    sets as the paper samples them and the random-real row, IPC by IPC."""
    sel = res["selected"]
    ipcs = sorted({r["ipc"] for r in sel})
    pool = next((r["pool"] for r in sel if r["pool"]), 0)
    lines = ["Prototype selection, a departure from the paper's sampler (one seed per image), "
             f"measured beside it: from {pool} samples per class of each "
             "method's model (the repeat's seeds, the study's sampling setting), the sample "
             "nearest each of IPC k-means centres of the class's training images in the "
             "full-data ConvNet-3's features; \"real images nearest the prototypes\" takes the "
             "training images nearest the same centres (one set, a classifier seed per repeat). "
             "Mean [min, max] over repeats; pairwise / coverage after each."]
    larger = sorted({r["pool"] for r in sel if r["pool"] and r["pool"] != pool})
    if larger:
        lines[0] += (f" \"Pool {', '.join(map(str, larger))}\": the same pick from more samples "
                     f"per class (the same seeds; the pool of {pool} is their first {pool}).")
    anch = res.get("anchored")
    if anch:
        lines[0] += (f" \"Anchored\" (D4M's route, no pool): each method's model starts image i "
                     f"of a class from the mean training image of the i-th of those clusters, "
                     f"noised to strength {anch['strength']:g} (of the schedule; 1 is pure "
                     f"noise), the repeat's seeds and the study's sampling setting.")
    anchored_rows = {(r["protocol"], r["method"], r["ipc"]): r
                     for r in (anch["rows"] if anch else [])}

    def cell(row, want):
        if row is None or not row.get("evaluated", True):
            return "-"  # this recipe never evaluates this IPC
        if row["accuracy"] is None:
            return "not run"
        pw, cov = _diversity(row)
        acc = row["accuracy"]
        short = f" ({acc['n']} of {want})" if acc["n"] < want else ""
        return f"{_fmt(acc)}{short} ({pw} / {cov})"

    for proto in dict.fromkeys(r.get("protocol", "dc") for r in sel):
        want = res["settings"]["small_repeats" if proto == "small" else "repeats"]
        rows = [r for r in sel if r.get("protocol", "dc") == proto]
        lines += ["", f"{PROTOCOL_NAMES[proto]}:", "",
                  "| set | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
                  "|---|" + "---:|" * len(ipcs)]
        main = {(r["method"], r["ipc"]): r for r in res["rows"] if r["protocol"] == proto}
        chosen = {(r["method"], r["ipc"], r["pool"]): r for r in rows}
        for method in dict.fromkeys(r["method"] for r in rows):
            if method == "random":
                label_main, label_sel = "random real", "real images nearest the prototypes"
            else:
                label_main = f"{LABELS[method]}, the paper's sampler"
                label_sel = f"{LABELS[method]}, prototype selection"
            lines.append(f"| {label_main} | "
                         + " | ".join(cell(main.get((method, i)), want) for i in ipcs) + " |")
            lines.append(f"| {label_sel} | " + " | ".join(
                cell(chosen.get((method, i, None if method == "random" else pool)), want)
                for i in ipcs) + " |")
            for n in (larger if method != "random" else ()):
                lines.append(f"| {label_sel}, pool {n} | " + " | ".join(
                    cell(chosen.get((method, i, n)), want) for i in ipcs) + " |")
            if method != "random" and anch:
                lines.append(f"| {LABELS[method]}, anchored (strength {anch['strength']:g}) | "
                             + " | ".join(cell(anchored_rows.get((proto, method, i)), want)
                                          for i in ipcs) + " |")
    if anch:
        lines += ["", f"The anchored start's strength, chosen on the held-out images "
                  f"({anch['criterion']}; the chosen one in bold):", "",
                  "| strength | " + " | ".join(
                      f"**{p['strength']:g}**" if p["strength"] == anch["strength"]
                      else f"{p['strength']:g}" for p in anch["curve"]) + " |",
                  "|---|" + "---:|" * len(anch["curve"]),
                  "| held-out accuracy (%) | " + " | ".join(
                      f"{p['val_accuracy']:.2f}" for p in anch["curve"]) + " |"]
    return lines


def lambda_g_sweep(study) -> list[dict]:
    """The lambda_g sweep at IPC 10, repeat 0, with the default in it: accuracy and diversity
    (from the cells), and how far the samples moved from the default's (same seeds, so the
    same initial noise): mean and largest absolute change, in grey levels of 255."""
    if not study.scale.lambda_g_factors:
        return []
    default = study.config("probe", {}).objective.lambda_g
    points = [(default, "", True)] + [(v, tag, False) for v, tag, _ in study.lambda_g_points()]
    out = []
    for value, tag, is_default in sorted(points, key=lambda p: p[0]):
        cells = _cells(study, f"ours-step{tag}", 10, "dc", 1)
        path = study.work / "lambda_g" / f"ours-step{tag}-r0-ipc10.json"
        change = {"mean": 0.0, "max": 0.0} if is_default else None
        if path.is_file():
            cell = json.loads(path.read_text())
            change = {"mean": cell["pixel_change_mean"], "max": cell["pixel_change_max"]}
        out.append({"lambda_g": value, "default": is_default, "tag": tag,
                    "accuracy": cells[0]["acc_best"] if cells else None,
                    "pairwise": cells[0]["pairwise"] if cells else None,
                    "coverage": cells[0]["coverage"] if cells else None,
                    "pixel_change": change})
    return out


QUALITY_KEYS = ("fidelity", "fd", "precision", "recall", "coverage")


def quality(study) -> list[dict]:
    """The quality cells on disk, real sets first, then by method order and size."""
    from ddfast.study import METHODS

    cells = [json.loads(p.read_text()) for p in sorted((study.work / "quality").glob("*.json"))]

    def order(c):
        method = _quality_method(c["key"])
        return (-c["per_class"], METHODS.index(method) if method in METHODS else len(METHODS))

    return sorted(cells, key=order)


def _quality_method(key: str) -> str:
    """``ours-step-r0-ipc10`` -> ``ours-step``; ``dit-ipc100`` -> ``dit``."""
    head = key.rsplit("-ipc", 1)[0]
    stem, _, rep = head.rpartition("-r")
    return stem if stem and rep.isdigit() else head


MECHANISM_KEYS = ("memory_cos_real", "memory_cos_gen", "grad_diffusion", "grad_rep", "grad_div")


def mechanism(study) -> dict:
    """Per memory method, the fine-tuning curves of what the memories do, averaged over the
    repeats that logged them: each memory's mean pairwise cosine (lower is more diverse) and,
    where logged, the gradient norm of each term. {method: {"step": [...], key: [...]}}."""
    out = {}
    for method in ("minimax", "ours-step", "ours-epoch"):
        runs = []
        for path in sorted(study.work.glob(f"{method}-r*/metrics.jsonl")):
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            rows = [r for r in rows if r.get("stage") == "finetune" and "memory_cos_real" in r]
            if rows:
                runs.append(rows)
        if not runs:
            continue
        steps = [r["step"] for r in runs[0]]
        runs = [r for r in runs if [x["step"] for x in r] == steps]  # same log steps only
        curves = {"step": steps, "repeats": len(runs)}
        for key in MECHANISM_KEYS:
            if all(key in x for r in runs for x in r):
                curves[key] = [float(np.nanmean([r[i][key] for r in runs]))
                               for i in range(len(steps))]
        out[method] = curves
    return out


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _acc(path: Path) -> float | None:
    """An evaluation cell's accuracy, or None where it has not run."""
    cell = _json(path)
    return None if cell is None else cell["acc_best"]


def generators(study) -> list[dict]:
    """This study's generator and each candidate of the scale (``--generators``), as far as
    measured (nothing until a candidate has trained): its settings and size, its training time,
    its samples' quality against the held-out images at the chosen sampling setting, and its
    IPC-10 set (seed 0, no fine-tuning): quality against the test images and accuracy under the
    DC/DSA recipe."""
    from ddfast.models import VAE_PRESETS, build_dit, build_vae, vae_factor
    from ddfast.study import EXACT_IPC, ROUNDTRIP

    if not study.scale.generators:
        return []
    train = study.data()[0]
    rows = []
    for i, (name, over) in enumerate([("this study's", {}), *study.scale.generators.items()]):
        work = study.out / "generators" / name / "work" if i else study.work
        row = {"name": name, "overrides": over, "parameters": None, "pretrain_s": None,
               "val": None, "quality": None, "accuracy": None}
        cfg, summary = _json(work / "base" / "config.json"), _json(work / "base" / "summary.json")
        if cfg is not None:
            m, pre, precision = cfg["model"], cfg["pretrain"], cfg["run"]["precision"]
            if precision == "auto" and summary is not None:  # as ddfast.train resolves it
                precision = "bf16" if summary.get("device", "cpu").startswith("cuda") else "fp32"
            channels, side = train.channels, train.resolution
            latent = m.get("vae", "none") in VAE_PRESETS  # a latent candidate's autoencoder
            with torch.device("meta"):  # sizes only: no memory, no initialisation
                if latent:
                    vae = build_vae(m["vae"], in_channels=channels, sample_size=side)
                    channels, side = vae.config.latent_channels, side // vae_factor(vae)
                dit = build_dit(m["dit"], in_channels=channels, sample_size=side,
                                num_classes=len(train.class_names),
                                patch_size=m["patch_size"] or None)
            row["settings"] = {"dit": m["dit"], "patch": dit.config.patch_size,
                               "steps": pre["steps"], "batch": pre["batch_size"],
                               "lr": pre["lr"], "precision": precision}
            if latent:
                row["settings"]["latents"] = f"{m['vae']} latents ({channels}x{side}x{side})"
            row["parameters"] = sum(t.numel() for t in dit.parameters())
        if summary is not None:
            row["pretrain_s"] = (
                logged_seconds(work / "base" / "metrics.jsonl", "pretrain",
                               cfg["pretrain"]["batch_size"]) if cfg is not None else None
            ) or stage_seconds(summary, "pretrain")
            row["device"] = summary.get("device")  # the minutes are this device's
        sw = _json(work / "sampling.json")
        if sw is not None:
            point = next(p for p in sw["points"] if p["settings"] == sw["chosen"])
            row["val"] = {k: point[k] for k in ("fidelity", "fd", "precision", "recall",
                                                "coverage")}
        row["quality"] = _json(work / "quality" / f"dit-r0-ipc{EXACT_IPC}.json")
        row["accuracy"] = _acc(work / "evals" / f"dit-r0-ipc{EXACT_IPC}-dc.json")
        trip = _json(work / "evals" / f"{ROUNDTRIP}-r0-ipc{EXACT_IPC}-dc.json")
        q = study.scale.val_per_class
        if trip is not None:
            row["roundtrip"] = {
                "accuracy": trip["acc_best"],
                "val": _json(work / "sampling" / f"{ROUNDTRIP}-ipc{q}.json"),
                "real_val": _json(work / "sampling" / f"random-ipc{q}.json"),
                "edges": _json(work / "sampling" / f"{ROUNDTRIP}-edges.json"),
                "sharp_accuracy": _acc(
                    work / "evals" / f"{ROUNDTRIP}-sharp-r0-ipc{EXACT_IPC}-dc.json"),
                "blur_accuracy": _acc(work / "evals" / f"random-blur-r0-ipc{EXACT_IPC}-dc.json"),
                # the autoencoder's own report when the run stopped before its summary
                "vae": (summary or {}).get("vae") or _json(work / "base" / "vae.json")}
        row["probes"] = {}
        for tag, _ in study.scale.generator_probes:
            row["probes"][tag] = _acc(work / "evals" / f"dit{tag}-r0-ipc{EXACT_IPC}-dc.json")
        rows.append(row)
    # The table compares candidates with this study's generator: none measured, no table.
    return rows if any(r.get("settings") for r in rows[1:]) else []


def generator_lines(res: dict) -> list[str]:
    """The candidate generators' table, with the bar a generated IPC-10 set must clear."""
    from ddfast.study import EXACT_IPC

    probes = list(res["generators"][0].get("probes") or {})
    lines = ["Candidate generators (`--generators`), each trained from scratch here and sampled "
             "at the study's chosen setting without fine-tuning: its training time ("
             "minutes, every logged step counted once across resumes, on the device named), "
             "its samples against the "
             "held-out images (Fréchet distance, precision, recall, coverage, fidelity %), and "
             f"its IPC-{EXACT_IPC} set (seed 0): which way its items face (the mean over "
             "classes of the fraction that correlate better with their real class mean than "
             "with its mirror image; real images about 0.8, a set drawn facing either way 0.5) "
             "and its accuracy (%) under the DC/DSA recipe, one run."
             + (" The last columns draw the same set at each probe setting (`--probes`): "
                "measured on the test split, so shown, never chosen from." if probes else ""),
             "", "| generator | parameters | pretraining | min | held-out FD | precision | recall "
             f"| coverage | fidelity | facing | IPC {EXACT_IPC} accuracy |"
             + "".join(f" at {_probe_label(t)} |" for t in probes),
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(probes)]
    for g in res["generators"]:
        st = g.get("settings")
        what = ("not run" if st is None else
                f"{st['dit']}, {st['patch']}x{st['patch']} patches, {st['steps']} steps of "
                f"{st['batch']}, lr {st['lr']:g}, {st['precision']}"
                + (f", on {st['latents']}" if st.get("latents") else "")
                + (f", on {g['device'].split(':')[0]}" if g.get("device") else ""))
        params = "-" if g["parameters"] is None else f"{g['parameters'] / 1e6:.2f} M"
        mins = "-" if g["pretrain_s"] is None else f"{g['pretrain_s'] / 60:.0f}"
        v = g["val"]
        val = (["-"] * 5 if v is None else
               [f"{v['fd']:.3g}", f"{v['precision']:.3f}", f"{v['recall']:.3f}",
                f"{v['coverage']:.3f}", f"{v['fidelity']:.1f}"])
        face = ((g.get("quality") or {}).get("facing") or {}).get("mean")
        val.append("-" if face is None else f"{face:.2f}")
        acc = "not run" if g["accuracy"] is None else f"{g['accuracy']:.1f}"
        at = "".join(" not run |" if (g.get("probes") or {}).get(t) is None
                     else f" {g['probes'][t]:.1f} |" for t in probes)
        lines.append(f"| {g['name']} | {params} | {what} | {mins} | " + " | ".join(val)
                     + f" | {acc} |" + at)
    for g in res["generators"]:
        trip = g.get("roundtrip")
        if not trip:
            continue
        v, r, vae = trip["val"] or {}, trip["real_val"] or {}, trip["vae"] or {}
        held = (vae.get("held_out_reconstruction") or {}).get("psnr")
        lines += ["", f"{g['name']}'s autoencoder alone (real images encoded and decoded, no "
                  f"DiT): the random-real IPC-{EXACT_IPC} set's round trip scores "
                  f"{trip['accuracy']:.1f} (DC/DSA recipe, seed 0)"
                  + (f"; the held-out images' round trip has a PSNR of {held:.1f} dB" if held
                     else "")
                  + (f"; {v['per_class']} training images per class through it lie at Fréchet "
                     f"distance {v['fd']:.3g} from the held-out images (precision "
                     f"{v['precision']:.3f}, recall {v['recall']:.3f}, fidelity "
                     f"{v['fidelity']:.1f}), the same images unchanged at {r['fd']:.3g} "
                     f"({r['precision']:.3f}, {r['recall']:.3f}, {r['fidelity']:.1f})"
                     if v and r else "") + "."]
        edges = trip.get("edges")
        if edges and None not in (trip.get("sharp_accuracy"), trip.get("blur_accuracy")):
            lines[-1] += (
                f" Its edges (mean absolute difference of neighbouring pixels, across plus down, "
                f"in grey levels): {edges['roundtrip']:.1f} against the real images' "
                f"{edges['real']:.1f}. The round trip unsharp-masked to the real images' edges "
                f"(amount {edges['unsharp_amount']:.2f}, sigma {edges['unsharp_sigma']:g}) "
                f"scores {trip['sharp_accuracy']:.1f}; the real images blurred to the round trip's "
                f"(sigma {edges['blur_sigma']:.2f}) score {trip['blur_accuracy']:.1f}.")
    bar = []
    real = next((r for r in res["rows"] if (r["protocol"], r["method"], r["ipc"])
                 == ("dc", "random", EXACT_IPC)), None)
    if real and real["accuracy"]:
        bar.append(f"random real {_fmt(real['accuracy'])}")
    chosen = (res.get("sampling") or {}).get("chosen") or {}
    g = chosen.get("sample.guidance_scale")
    for p in res.get("exact") or []:
        if (p.get("protocol", "dc"), p.get("set", "images")) != ("dc", "images"):
            continue
        if g is not None and p["guidance"] != "inf" and float(g) == p["guidance"] \
                and p["accuracy"]:
            bar.append(f"the exact generator at guidance {g} {_fmt(p['accuracy'])}")
    if bar:
        lines += ["", f"The bar at IPC {EXACT_IPC}, same recipe: " + "; ".join(bar) + "."]
    return lines


def probes(study) -> list[dict]:
    """Each generated method's IPC-10 set (repeat 0, DC/DSA recipe) at the chosen sampling
    setting and at each of the scale's probe settings (``--probes --methods``), for the methods
    measured at some probe beyond ``dit`` (whose probe the candidates' table shows)."""
    from ddfast.study import EXACT_IPC, METHODS

    tags = [t for t, _ in study.scale.generator_probes]
    rows = []
    for method in (m for m in METHODS if m != "random"):
        at = {t: _json(study.work / "evals" / f"{method}{t}-r0-ipc{EXACT_IPC}-dc.json")
              for t in tags}
        chosen = _json(study.work / "evals" / f"{method}-r0-ipc{EXACT_IPC}-dc.json")
        rows.append({"method": method,
                     "chosen": None if chosen is None else chosen["acc_best"],
                     "probes": {t: None if c is None else c["acc_best"] for t, c in at.items()},
                     "coverage": {t: None if c is None else c["coverage"] for t, c in at.items()}})
    measured = any(v is not None for r in rows if r["method"] != "dit"
                   for v in r["probes"].values())
    return rows if measured else []


def probe_lines(res: dict) -> list[str]:
    """The methods at the probe settings, beside their sets at the chosen one."""
    from ddfast.study import EXACT_IPC

    tags = list(res["probes"][0]["probes"])
    lines = ["The methods at the probe settings (`--probes --methods`): each one's "
             f"IPC-{EXACT_IPC} set of repeat 0, its fine-tuning unchanged, drawn at the "
             "study's chosen setting and at each probe; DC/DSA recipe, one run each: "
             "accuracy (%) / coverage. Measured on the test split: shown, never chosen from.",
             "",
             "| method | chosen setting | " + " | ".join(_probe_label(t) for t in tags) + " |",
             "|---|---:|" + "---:|" * len(tags)]
    for r in res["probes"]:
        chosen = "not run" if r["chosen"] is None else f"{r['chosen']:.1f}"
        cells = ["not run" if r["probes"][t] is None
                 else f"{r['probes'][t]:.1f} / {r['coverage'][t]:.3f}" for t in tags]
        lines.append(f"| {LABELS[r['method']]} | {chosen} | " + " | ".join(cells) + " |")
    real = next((r for r in res["rows"] if (r["protocol"], r["method"], r["ipc"])
                 == ("dc", "random", EXACT_IPC)), None)
    if real and real["accuracy"]:
        lines += ["", f"Random real at IPC {EXACT_IPC}, same recipe: {_fmt(real['accuracy'])}."]
    return lines


def _probe_label(tag: str) -> str:
    """'-g6-interval80-580' -> 'g6, interval 80-580'."""
    parts = tag.strip("-").split("-", 1)
    return parts[0] + (", " + parts[1].replace("interval", "interval ", 1) if len(parts) > 1
                       else "")


def _fmt(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "not run"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def _diversity(row: dict) -> tuple[str, str]:
    """A row's mean pairwise cosine distance and coverage over its cells, "-" where none ran."""
    pw = "-" if row["pairwise"] is None else f"{row['pairwise']['mean']:.4f}"
    cov = "-" if row["coverage"] is None else f"{row['coverage']['mean']:.3f}"
    return pw, cov


def exact_lines(res: dict) -> list[str]:
    """The exact-generator tables, one per recipe, with the random-real and generated rows of
    the same IPC and recipe beside them."""
    from ddfast.study import EXACT_IPC

    chosen = (res.get("sampling") or {}).get("chosen") or {}
    study_g = chosen.get("sample.guidance_scale")
    exact_rows = res.get("exact") or []
    trip = any(p.get("set") == "roundtrip" for p in exact_rows)
    lines = [f"What an exact generator would score (IPC {EXACT_IPC}): training "
             "images drawn as a generator that matched its training data exactly would draw "
             "them under classifier-free guidance g, from p(x|c) p(c|x)^(g-1) with p(c|x) the "
             "full-data ConvNet-3's softmax; g = inf takes each class's most confident images."
             + (" A round trip is such a draw encoded and decoded by the study's autoencoder: "
                "what a DiT that matched its training latents exactly would give." if trip
                else "")
             + " Mean [min, max] over the draws, one evaluation each (k of n where only k have "
             "run), and each draw minus random real images under the same classifier seed; "
             "then, where the scale draws a pool for it, the generator's closest "
             "samples (a set picked with the real images' help: a measurement of the "
             "generator, not a method); below them, the study's own sets of the same IPC and "
             "recipe over their repeats."]
    protos = [q for q in ("dc", "small")
              if q == "dc" or any(p.get("protocol", "dc") == q for p in exact_rows)]
    for proto in protos:
        lines += ["", f"{PROTOCOL_NAMES[proto]}:", "",
                  "| set | runs | accuracy | pairwise | coverage | minus random real, per draw |",
                  "|---|---:|---:|---:|---:|---|"]
        for p in (p for p in exact_rows if p.get("protocol", "dc") == proto):
            acc = p["accuracy"]
            short = acc is not None and acc["n"] < p["draws"]
            pw, cov = _diversity(p)
            g = p["guidance"]
            label = "inf" if g == "inf" else f"{g:g}"
            note = " (the study's)" if g != "inf" and study_g is not None \
                and float(study_g) == g else ""
            through = ", round trip through the autoencoder" if p.get("set") == "roundtrip" \
                else ""
            count = f" ({acc['n']} of {p['draws']})" if short else ""
            gaps = ", ".join("-" if v is None else f"{v:+.1f}"
                             for v in p.get("minus_random") or []) or "-"
            lines.append(f"| exact generator, guidance {label}{note}{through} | {p['draws']} | "
                         f"{_fmt(acc)}{count} | {pw} | {cov} | {gaps} |")
        m = res.get("matched")
        if m and proto == "dc":
            acc = m["accuracy"]
            pw, cov = _diversity(m)
            count = f" ({acc['n']} of {m['runs']})" if acc is not None and acc["n"] < m["runs"] \
                else ""
            lines.append(f"| the generator's closest samples: for each random-real image, the "
                         f"nearest of {m['pool']} per class (one set) | {m['runs']} | "
                         f"{_fmt(acc)}{count} | {pw} | {cov} | - |")
        for r in res["rows"]:
            if (r["protocol"], r["ipc"]) == (proto, EXACT_IPC) and r["accuracy"] is not None:
                pw, cov = _diversity(r)
                lines.append(f"| {LABELS[r['method']]} | {r['accuracy']['n']} | "
                             f"{_fmt(r['accuracy'])} | {pw} | {cov} | - |")
    return lines


def _machines(res: dict) -> str:
    """Where the evaluations ran, as far as their cells record it ("" where none does)."""
    known = [m for m in res.get("eval_machines") or [] if m["machine"] is not None]
    if not known:
        return ""
    text = ", ".join(f"{m['machine']} ({m['cells']})" for m in known)
    older = sum(m["cells"] for m in res["eval_machines"] if m["machine"] is None)
    return (f" Evaluation cells by machine: {text}"
            + (f"; {older} earlier cells do not record theirs." if older else "."))


def markdown(res: dict) -> str:
    ipcs = res["settings"]["ipc"]
    head = "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |"
    rule = "|---|" + "---:|" * len(ipcs)
    threads = res.get("eval_threads") or []
    on = (f" ({'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''} per "
          f"evaluation)" if threads else "")
    # The cells may come from several machines; the one named here only wrote the report.
    lines = [f"Dataset **{res['dataset']}**, scale `{res['scale']}`{on}, "
             f"torch {res['torch']}; wall time {res['seconds']['total'] / 60:.1f} min "
             f"(runs {res['seconds']['runs'] / 60:.1f}, evaluations "
             f"{res['seconds']['evaluations'] / 60:.1f}, full-data classifier "
             f"{res['seconds']['full_data'] / 60:.1f})." + _machines(res)
             + f" Report written on {res['device']}.", "",
             f"Settings: {json.dumps(res['settings'])}.", ""]
    for proto in res["settings"]["protocols"]:
        rows = [r for r in res["rows"] if r["protocol"] == proto]
        want = res["settings"]["small_repeats" if proto == "small" else "repeats"]
        once = set(res["settings"].get("ipc_once") or [])
        # IPCs this scale never evaluates under the recipe: "-", not "not run"
        skipped = {r["ipc"] for r in rows if not r.get("evaluated", True)}
        spread = ("one run per cell" if want == 1 else
                  f"mean [min, max] over {want} repeats; (k of {want}) where only k have run")
        lines += [f"ConvNet-3 top-1 test accuracy (%), {PROTOCOL_NAMES[proto]}: {spread}"
                  + (f"; IPC {', '.join(map(str, sorted(once)))} once" if once else "")
                  + ("; - where the scale does not evaluate this recipe" if skipped else "")
                  + ".", "", head, rule]
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = []
            for i in ipcs:
                if i in skipped:
                    cells.append("-")
                    continue
                acc = next(r["accuracy"] for r in rows if r["method"] == method and r["ipc"] == i)
                short = acc is not None and i not in once and acc["n"] < want
                cells.append(_fmt(acc) + (f" ({acc['n']} of {want})" if short else ""))
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        if res["full"] and proto == "dc":
            f = res["full"]
            lines.append(f"| full training set ({f['num_train']} images, {f['epochs']} epochs; "
                         f"one value) | "
                         + " | ".join([f"{f['accuracy']:.1f}"] * len(ipcs)) + " |")
        if proto == "dc":
            pub_ipc = res["published"]["ipc"]
            for name, vals in res["published"]["methods"].items():
                cells = [f"{vals[pub_ipc.index(i)]}" if i in pub_ipc else "-" for i in ipcs]
                lines.append(f"| *published {name}* | " + " | ".join(cells) + " |")
        lines.append("")
    dc = [r for r in res["rows"] if r["protocol"] == res["settings"]["protocols"][0]]
    lines += ["Diversity of each distilled set in the full-data ConvNet-3's feature space: "
              "mean pairwise cosine distance / coverage (k = 5), mean over repeats.", "",
              head, rule]
    for method in dict.fromkeys(r["method"] for r in dc):
        cells = []
        for i in ipcs:
            r = next(r for r in dc if r["method"] == method and r["ipc"] == i)
            pw, cov = _diversity(r)
            cells.append(f"{pw} / {cov}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    if res.get("exact") or res.get("matched"):
        lines += ["", *exact_lines(res)]
    if res.get("selected"):
        lines += ["", *select_lines(res)]
    if res.get("generators"):
        lines += ["", *generator_lines(res)]
    if res.get("probes"):
        lines += ["", *probe_lines(res)]
    if res.get("sampling"):
        sw = res["sampling"]
        intervals = any(p.get("interval") for p in sw["points"])
        accuracy = any("val_accuracy" in p for p in sw["points"])
        lines += ["", f"Sampling settings, chosen on {sw['holdout']} held-out training images "
                  f"per class (never trained on) by {sw['criterion']}; {sw['per_class']} "
                  "samples per class of the from-scratch model per setting, measured in the "
                  "full-data ConvNet-3's features"
                  + ("; held-out accuracy: a ConvNet-3 trained (DC/DSA recipe) on the first 10 "
                     "of them per class, tested on the held-out images" if accuracy else "")
                  + ". The chosen row is in bold.", "",
                  "| guidance |" + (" interval |" if intervals else "")
                  + " sampler | steps | fidelity | Fréchet distance | precision | recall | "
                  "coverage |" + (" held-out accuracy |" if accuracy else ""),
                  "|---:|" + ("---|" if intervals else "") + "---|---:|---:|---:|---:|---:|---:|"
                  + ("---:|" if accuracy else "")]
        by_accuracy = sw["criterion"].startswith("highest accuracy")
        for p in sw["points"]:
            b = "**" if p["settings"] == sw["chosen"] else ""
            bf, ba = ("", b) if by_accuracy else (b, "")
            acc = p.get("val_accuracy")
            lines.append(f"| {b}{p['guidance_scale']:g}{b} |"
                         + (f" {p.get('interval', '').replace(',', '-') or 'every step'} |"
                            if intervals else "")
                         + f" {p['sampler']} | {p['steps']} | {p['fidelity']:.1f} | "
                         f"{bf}{p['fd']:.3g}{bf} | {p['precision']:.3f} | {p['recall']:.3f} | "
                         f"{p['coverage']:.3f} |"
                         + ((" - |" if acc is None else f" {ba}{acc:.1f}{ba} |") if accuracy
                            else ""))
    if res.get("quality"):
        lines += ["", "Sample quality in the full-data ConvNet-3's features against every test "
                  "image: fidelity (the classifier's accuracy on the images, %), Fréchet "
                  "distance (lower is closer), precision, recall and coverage (k = 5). Sets of "
                  "equal size compare; `random real` is the first images of each class. "
                  "Facing: the fraction of items that correlate better with their real class "
                  "mean than with its mirror image (mean over classes; 0.5 for a set drawn "
                  "facing either way).", "",
                  "| set | images | fidelity | Fréchet distance | precision | recall | "
                  "coverage | facing |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in res["quality"]:
            m = _quality_method(c["key"])
            what = "a sample of the generator" if m == "dit" and "-r" not in c["key"] else (
                "the distilled set, repeat 0" if m != "random" else "real")
            label = f"{LABELS.get(m, m)}, IPC {c['per_class']} ({what})"
            face = (c.get("facing") or {}).get("mean")
            lines.append(f"| {label} | {c['n']} | {c['fidelity']:.1f} | {c['fd']:.3g} | "
                         f"{c['precision']:.3f} | {c['recall']:.3f} | {c['coverage']:.3f} | "
                         + ("-" if face is None else f"{face:.2f}") + " |")
    if res.get("mechanism"):
        lines += ["", "The memories at the end of fine-tuning (mean over repeats): mean pairwise "
                  "cosine of the real / generated memory (lower is more diverse), and where "
                  "logged the gradient norm of each term with respect to the model's output.",
                  "", "| method | real memory | generated memory | grad diffusion | grad rep | "
                  "grad div |", "|---|---:|---:|---:|---:|---:|"]
        for method, c in res["mechanism"].items():
            cells = [f"{c[k][-1]:.3g}" if k in c else "-" for k in MECHANISM_KEYS]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    if res.get("lambda_g"):
        lines += ["", "lambda_g sweep (ours, adaptive per step, repeat 0, IPC 10, DC/DSA recipe, "
                  "one run each): accuracy (%), diversity, and how far the samples moved from "
                  "the default's (same seeds): mean / largest absolute change in grey levels "
                  "of 255. The default is in bold.", "",
                  "| lambda_g | accuracy | pairwise | coverage | pixel change |",
                  "|---:|---:|---:|---:|---:|"]
        for p in res["lambda_g"]:
            v = f"**{p['lambda_g']:g}**" if p["default"] else f"{p['lambda_g']:g}"
            acc = "not run" if p["accuracy"] is None else f"{p['accuracy']:.1f}"
            pw = "-" if p["pairwise"] is None else f"{p['pairwise']:.4f}"
            cov = "-" if p["coverage"] is None else f"{p['coverage']:.3f}"
            ch = ("-" if p["pixel_change"] is None else
                  f"{p['pixel_change']['mean']:.2f} / {p['pixel_change']['max']:.0f}")
            lines.append(f"| {v} | {acc} | {pw} | {cov} | {ch} |")
        real = next((r for r in res["rows"] if (r["protocol"], r["method"], r["ipc"])
                     == ("dc", "random", 10)), None)
        if real and real["accuracy"]:
            pw, cov = _diversity(real)
            lines.append(f"| random real (same recipe) | {_fmt(real['accuracy'])} | {pw} | "
                         f"{cov} | - |")
    if res["ablations"]:
        lines += ["", "Ablations (ours, adaptive per step, IPC 10, DC/DSA recipe): accuracy (%) "
                  "mean [min, max]; the default is in bold.", ""]
        for ab in res["ablations"]:
            vals = [(f"**{p['value']:g}**" if p["default"] else f"{p['value']:g}",
                     _fmt(p["accuracy"])) for p in ab["points"]]
            lines += [f"| {ab['setting']} | " + " | ".join(v for v, _ in vals) + " |",
                      "|---|" + "---:|" * len(vals),
                      "| accuracy | " + " | ".join(a for _, a in vals) + " |", ""]
    return "\n".join(lines).rstrip() + "\n"


def plots(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    protos = res["settings"]["protocols"]
    fig, axes = plt.subplots(1, len(protos), figsize=(5.5 * len(protos), 4), squeeze=False)
    for ax, proto in zip(axes[0], protos, strict=True):
        for method, label in LABELS.items():
            pts = [r for r in res["rows"] if r["protocol"] == proto and r["method"] == method
                   and r["accuracy"]]
            if not pts:
                continue
            x = [p["ipc"] for p in pts]
            ax.plot(x, [p["accuracy"]["mean"] for p in pts], marker="o", label=label)
            ax.fill_between(x, [p["accuracy"]["min"] for p in pts],
                            [p["accuracy"]["max"] for p in pts], alpha=0.2)
        if res["full"] and proto == "dc":
            ax.axhline(res["full"]["accuracy"], color="k", ls="--", lw=1, label="full set")
        if proto == "dc":
            for name, vals in res["published"]["methods"].items():
                ax.plot(res["published"]["ipc"], vals, ls=":", marker="x", lw=1,
                        label=f"published {name}")
        ax.set_xscale("log")
        ax.set_xlabel("images per class")
        ax.set_ylabel("top-1 test accuracy (%)")
        ax.set_title(f"{res['dataset']}: {PROTOCOL_NAMES[proto].split(' (')[0]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "accuracy_vs_ipc.png", plt))
    if res.get("mechanism"):
        mech = res["mechanism"]
        panels = [k for k in ("memory_cos_real", "memory_cos_gen")
                  if any(k in c for c in mech.values())]
        if any("grad_div" in c for c in mech.values()):
            panels.append("grad_ratio")
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False)
        titles = {"memory_cos_real": "real memory: mean pairwise cosine",
                  "memory_cos_gen": "generated memory: mean pairwise cosine",
                  "grad_ratio": "|grad| of memory terms / diffusion"}
        for ax, panel in zip(axes[0], panels, strict=True):
            for method, c in mech.items():
                if panel == "grad_ratio" and "grad_div" in c:
                    ratio = [(r + d) / g if g > 0 else float("nan")
                             for r, d, g in zip(c["grad_rep"], c["grad_div"],
                                                c["grad_diffusion"], strict=True)]
                    ax.plot(c["step"], ratio, marker=".", label=LABELS[method])
                    ax.set_yscale("log")
                elif panel in c:
                    ax.plot(c["step"], c[panel], marker=".", label=LABELS[method])
            ax.set_title(titles[panel], fontsize=9)
            ax.set_xlabel("fine-tuning step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / "mechanism.png", plt))
    lg = [p for p in res.get("lambda_g") or [] if p["accuracy"] is not None]
    if lg:
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.3))
        xs = [p["lambda_g"] for p in lg]
        axes[0].plot(xs, [p["accuracy"] for p in lg], marker="o")
        axes[0].set_ylabel("test accuracy (%), IPC 10")
        moved = [p for p in lg if p["pixel_change"] is not None]
        axes[1].plot([p["lambda_g"] for p in moved],
                     [p["pixel_change"]["mean"] for p in moved], marker="o", label="mean")
        axes[1].plot([p["lambda_g"] for p in moved],
                     [p["pixel_change"]["max"] for p in moved], marker="x", label="largest")
        axes[1].set_ylabel("change from the default (grey levels)")
        axes[1].legend(fontsize=7)
        default = next(p["lambda_g"] for p in res["lambda_g"] if p["default"])
        for ax in axes:
            ax.set_xscale("symlog", linthresh=default)
            ax.set_xticks(xs, [f"{v:g}" for v in xs], fontsize=7)
            ax.minorticks_off()
            ax.axvline(default, color="k", ls=":", lw=1)
            ax.set_xlabel("lambda_g (dotted: default)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, out / "lambda_g.png", plt))
    if res.get("sampling"):
        sw = res["sampling"]
        keys = (("fd", "Fréchet distance to the validation images"),
                ("fidelity", "fidelity (%)"), ("recall", "recall"))
        if any("val_accuracy" in p for p in sw["points"]):
            keys += (("val_accuracy", "held-out accuracy, IPC 10 (%)"),)
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.3), squeeze=False)
        for ax, (key, title) in zip(axes[0], keys, strict=True):
            def line(p):
                return p["sampler"], p["steps"], p.get("interval", "")

            for sampler, steps, interval in dict.fromkeys(line(p) for p in sw["points"]):
                pts = sorted((p for p in sw["points"]
                              if line(p) == (sampler, steps, interval) and key in p),
                             key=lambda p: p["guidance_scale"])
                if not pts:
                    continue
                ax.plot([p["guidance_scale"] for p in pts], [p[key] for p in pts], marker="o",
                        label=f"{sampler}, {steps} steps"
                        + (f", in {interval.replace(',', '-')}" if interval else ""))
            chosen = next(p for p in sw["points"] if p["settings"] == sw["chosen"])
            if key in chosen:
                ax.plot([chosen["guidance_scale"]], [chosen[key]], "k*", ms=12, label="chosen")
            ax.set_xlabel("guidance scale")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / "sampling.png", plt))
    if res["ablations"]:
        abl = res["ablations"]
        fig, axes = plt.subplots(1, len(abl), figsize=(3.6 * len(abl), 3.2), squeeze=False)
        for ax, ab in zip(axes[0], abl, strict=True):
            pts = [p for p in ab["points"] if p["accuracy"]]
            if pts:
                x = [p["value"] for p in pts]
                m = np.array([p["accuracy"]["mean"] for p in pts])
                lo = m - np.array([p["accuracy"]["min"] for p in pts])
                hi = np.array([p["accuracy"]["max"] for p in pts]) - m
                ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=3)
                ax.set_xscale("log")
            ax.set_title(ab["setting"], fontsize=9)
            ax.set_ylabel("accuracy (%)")
        fig.tight_layout()
        paths.append(_save(fig, out / "ablations.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from ddfast.io import write_bytes

    write_bytes(path, buf.getvalue())
    return path


def _write_grid(path: Path, x: torch.Tensor, per_class: int) -> Path:
    """x (N, C, H, W) uint8, class by class: one row per class, upscaled to at least 32 px."""
    from ddfast.sample import grid

    tiles = [t[0] if t.shape[0] == 1 else t.permute(1, 2, 0) for t in x]  # (H, W[, 3])
    write_png(path, grid([t.numpy() for t in tiles], per_class, upscale=max(1, 32 // x.shape[-1])))
    return path


def grids(study, out: Path, columns: int = 10) -> list[Path]:
    """One PNG per method (repeat 0, up to ``columns`` images per class, one row per class), one
    per point of the lambda_g sweep, and one per guidance of the exact-generator reference. A
    run whose distilled set is not on disk (a checkout of committed results holds no distilled
    images) keeps the grid already written for it."""
    from ddfast.eval.protocol import load_source_set
    from ddfast.study import EXACT_IPC, METHODS, ROUNDTRIP

    ipc = min(columns, max(study.scale.ipc))
    paths = []
    for method in METHODS:
        got = (load_source_set(study.data()[0], ipc)[:2] if method == "random" else
               _distilled_set(study.work, f"{method}-r0", ipc))
        path = out / "grids" / f"{method}.png"
        if got is not None:
            paths.append(_write_grid(path, got[0], ipc))
        elif path.is_file():
            paths.append(path)
    for value, tag, _ in study.lambda_g_points():
        got = _distilled_set(study.work, f"ours-step{tag}-r0", 10)
        path = out / "grids" / f"ours-step-lambda_g{value:g}.png"
        if got is not None:
            paths.append(_write_grid(path, got[0], 10))
        elif path.is_file():
            paths.append(path)
    for name in study.scale.generators:  # each candidate's IPC-10 set, once sampled
        got = _distilled_set(study.out / "generators" / name / "work", "dit-r0", EXACT_IPC)
        path = out / "grids" / f"generator-{name}.png"
        if got is not None:
            paths.append(_write_grid(path, got[0], EXACT_IPC))
        elif path.is_file():
            paths.append(path)
    drawn = set()
    vae = (study.work / "base" / "pretrained" / "vae" / "config.json").is_file()
    for p in study.exact_points():  # draw 0 of each, once a cell of it is computed (then the
        # full-data classifier that draws it is on disk: a report never trains one); a round
        # trip's only where the autoencoder is too, else its grid stays as it was written
        name = f"exact-{ROUNDTRIP + '-' if p.roundtrip else ''}g{p.guidance:g}.png"
        if p.draw or name in drawn or not (study.work / "evals" / f"{p.key}.json").is_file():
            continue
        drawn.add(name)
        if p.roundtrip and not vae:
            if (out / "grids" / name).is_file():
                paths.append(out / "grids" / name)
            continue
        x, _ = study.exact_set(p.guidance, 0, roundtrip=p.roundtrip)
        paths.append(_write_grid(out / "grids" / name, x, EXACT_IPC))
    path = out / "grids" / "matched.png"
    if study.scale.matched_pool and (study.work / "evals" / f"{study.matched_key(0)}.json") \
            .is_file():
        pool = study.work / f"dit-r0-ipc{study.scale.matched_pool}" / "distilled"
        if (pool / "manifest.json").is_file():  # else (pool not on disk) the grid stays
            paths.append(_write_grid(path, study.matched_set()[0], EXACT_IPC))
        elif path.is_file():
            paths.append(path)
    if study.scale.select_pool and 10 in study.scale.select_ipc:
        from ddfast.eval.protocol import load_folder_set

        for method in METHODS:  # repeat 0's IPC-10 sets, once selected (small, committed)
            folder = study.select_folder(method, 0, 10)
            if (folder / "manifest.json").is_file():
                x, _, _ = load_folder_set(folder, ipc=10)
                paths.append(_write_grid(out / "grids" / f"select-{method}.png", x, 10))
        for pool in (p for p in study.scale.larger_pools if 10 in study.scale.larger_pool_ipc):
            for method in METHODS[1:]:  # the generated methods' picks from the larger pool
                folder = study.select_folder(method, 0, 10, pool)
                if (folder / "manifest.json").is_file():
                    x, _, _ = load_folder_set(folder, ipc=10)
                    paths.append(_write_grid(out / "grids" / f"select-{method}-p{pool}.png",
                                             x, 10))
    anchored_json = study.work / "anchored.json"
    if study.scale.anchor_grid and 10 in study.scale.select_ipc and anchored_json.is_file():
        from ddfast.eval.protocol import load_folder_set

        g = json.loads(anchored_json.read_text())["chosen"]
        for method in METHODS:  # repeat 0's IPC-10 anchored sets, once drawn (committed)
            folder = study.work / "anchored" / f"{method}-s{g:g}-r0-ipc10"
            if (folder / "manifest.json").is_file():
                x, _, _ = load_folder_set(folder, ipc=10)
                paths.append(_write_grid(out / "grids" / f"anchored-{method}.png", x, 10))
    return paths


def write_report(study) -> dict:
    res = collect(study)
    out = study.out
    res["plots"] = [str(p.relative_to(out)) for p in plots(res, out)]
    res["grids"] = [str(p.relative_to(out)) for p in grids(study, out)]
    write_json(out / "results.json", res)
    write_text(out / "results.md", markdown(res))
    return res
