"""The whole job end to end: outputs, resume after a kill, guards, baselines, real-use paths."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddfast.sample as sample_mod
import ddfast.trainer as trainer_mod
from ddfast.config import resolve
from ddfast.errors import ConfigError, OutputError
from ddfast.models import build_dit, build_vae, load_dit, save_pipeline
from ddfast.perf import SDPA_KERNELS
from ddfast.train import main, run


def smoke(out: Path, **overrides):
    return resolve("smoke", {"run.out": str(out), "run.progress": "off", **overrides})


def tree_bytes(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    summary = run(smoke(out))
    return out, summary


def test_smoke_run_writes_every_output(finished):
    out, summary = finished
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "smoke" and summary["config_digest"]
    manifest = json.loads((out / "distilled" / "manifest.json").read_text())
    assert manifest["ipc"] == 2 and len(manifest["images"]) == 20
    assert len({im["seed"] for im in manifest["images"]}) == 20
    for c in manifest["classes"]:
        files = sorted((out / "distilled" / c["folder"]).glob("*.png"))
        assert [f.name for f in files] == ["00000.png", "00001.png"]
        img = np.asarray(Image.open(files[0]))
        assert img.shape == (8, 8) and img.dtype == np.uint8 and img.std() > 0
    assert len(list((out / "grids").glob("*.png"))) == 10
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {x["stage"] for x in lines}
    assert stages == {"pretrain", "finetune"}
    fine = [x for x in lines if x["stage"] == "finetune"]
    assert all(x["div"] > 0 and x["rep"] > 0 for x in fine)  # the memory terms are on
    assert all(x["grad_diffusion"] > 0 and x["grad_div"] > 0 for x in fine)  # and push
    assert load_dit(str(out / "model")).config.num_embeds_ada_norm == 10
    result = json.loads((out / "eval" / "ipc2" / "results.json").read_text())
    assert result["ipc"] == 2 and result["epochs"] == 2 and result["num_train"] == 20
    run0 = result["networks"]["convnet3"]["runs"][0]
    assert run0["best"] == max(p["acc"] for p in run0["curve"])
    assert run0["last"] == run0["curve"][-1]["acc"]
    report = (out / "report.md").read_text()
    assert "| ours | 2 |" in report and "grids/0.png" in report
    assert "plots/losses.png" in report and "plots/memory.png" in report
    assert "plots/gradients.png" in report and (out / "plots" / "gradients.png").is_file()
    assert summary["evaluation"] and summary["timings_s"]["eval"] > 0
    assert summary["attention"] and set(summary["attention"]) <= set(SDPA_KERNELS.values())
    assert not list(out.rglob("*.tmp"))


def test_report_pictures_and_regeneration(finished, tmp_path, capsys):
    import shutil

    from ddfast.report import main as report_main

    out, _ = finished
    for name in ("losses.png", "memory.png"):
        img = np.asarray(Image.open(out / "plots" / name).convert("L"))
        assert img.shape[0] > 100 and img.std() > 10  # a drawn figure, not a blank
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.md").unlink()
    shutil.rmtree(copy / "plots")
    assert report_main([str(copy)]) == 0
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    for name in ("losses.png", "memory.png"):
        assert (copy / "plots" / name).read_bytes() == (out / "plots" / name).read_bytes()
    assert report_main([str(tmp_path / "nothing")]) == 2
    assert "holds no finished ddfast run" in capsys.readouterr().err


def _kill_after(monkeypatch, module, name, when):
    """Make module.name raise KeyboardInterrupt (a kill) once when(*args, **kw) holds."""
    real = getattr(module, name)
    state = {"fired": False}

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if not state["fired"] and when(*args, **kwargs):
            state["fired"] = True
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(module, name, wrapper)
    return state


def test_resuming_a_finished_run_keeps_the_earlier_timings(finished, tmp_path):
    """A finished run whose fine-tuned weights were deleted (they are the large output a study
    does not keep) is resumed: the model is trained again, the from-scratch DiT and the set
    are read from disk, and the summary keeps the first invocation's timings instead of
    replacing them with the resume's load times."""
    import shutil

    from ddfast.study_report import run_total_seconds, stage_seconds

    reference, first = finished
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "model")
    again = run(smoke(out), resume=True)
    assert first["reused"] == [] and first["earlier_runs"] == []
    assert again["reused"] == ["pretrain", "sample"]
    assert again["earlier_runs"] == [{"timings_s": first["timings_s"], "reused": []}]
    assert json.loads((out / "summary.json").read_text())["earlier_runs"] == again["earlier_runs"]
    for pattern in ("model/transformer/*.safetensors", "distilled/*/*.png"):
        got, want = tree_bytes(out, pattern), tree_bytes(reference, pattern)
        assert got.keys() == want.keys() and got, pattern
        assert got == want, f"{pattern} differs after training the model again"
    # The report's stage time is the computing invocation's; its run time counts both.
    assert stage_seconds(again, "pretrain") == first["timings_s"]["pretrain"]
    assert stage_seconds(again, "finetune") == again["timings_s"]["finetune"]
    assert stage_seconds(again, "select") is None
    assert run_total_seconds(again) == pytest.approx(
        first["timings_s"]["total"] + again["timings_s"]["total"])


@pytest.mark.parametrize("point", ["pretrain", "finetune", "logging", "sampling"])
def test_killed_run_resumes_to_identical_outputs(finished, tmp_path, monkeypatch, point):
    reference, _ = finished
    out = tmp_path / "b"
    if point == "sampling":
        count = {"n": 0}

        def nth_png(path, arr):
            count["n"] += 1
            return count["n"] == 7
        state = _kill_after(monkeypatch, sample_mod, "write_png", nth_png)
    elif point == "logging":  # after a log line that is newer than the last checkpoint
        state = _kill_after(monkeypatch, trainer_mod, "append_jsonl",
                            lambda path, rec: rec["stage"] == "pretrain" and rec["step"] == 20)
    else:
        state = _kill_after(monkeypatch, trainer_mod, "save_checkpoint",
                            lambda path, **kw: kw["extra"]["stage"] == point and kw["step"] == 15)
    with pytest.raises(KeyboardInterrupt):
        run(smoke(out))
    assert state["fired"]
    monkeypatch.undo()
    with pytest.raises(OutputError, match="--resume"):
        run(smoke(out))
    run(smoke(out), resume=True)
    steps = [(r["stage"], r["step"]) for r in map(json.loads,
                                                  (out / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps)) and steps == sorted(steps, key=lambda x: (
        x[0] != "pretrain", x[1]))  # each log line once, in order, despite the kill
    for pattern in ("model/transformer/*.safetensors", "distilled/*/*.png",
                    "distilled/manifest.json"):
        got, want = tree_bytes(out, pattern), tree_bytes(reference, pattern)
        assert got.keys() == want.keys() and got, pattern
        assert got == want, f"{pattern} differs after resuming from a kill during {point}"


def test_random_real_row_beside_the_method_and_cached(finished, tmp_path, capsys):
    """The table of every run carries the random-real baseline of the same IPC and recipe,
    evaluated on the first IPC real images per class and cached per data set and recipe."""
    from ddfast.eval import evaluate, load_source_set

    out, _ = finished
    table = (out / "eval" / "results.md").read_text()
    assert "| ours | 2 |" in table and "| random real | 2 |" in table
    assert "IPC 2 convnet3: ours" in table and "random real" in table.splitlines()[-1]
    # Its numbers are those of evaluate() on the first two real images of each class.
    cfg = smoke(tmp_path / "x")
    from ddfast.train import open_data

    source, test = open_data(cfg, "train"), open_data(cfg, "test")
    x, y, _ = load_source_set(source, 2)
    want = evaluate(x, y, test.images(range(len(test))), test.labels, networks=("convnet3",),
                    repeats=1, epochs=2, protocol="small", device="cpu", seed=0,
                    dataset="digits")
    best = want["networks"]["convnet3"]["best_mean"]
    assert f"random real {best:.2f} %" in table
    # A second run on the same data reads the baseline from the cache.
    capsys.readouterr()
    run(smoke(tmp_path / "again", **{"eval.repeats": "1"}))
    assert "random real baseline from" in capsys.readouterr().out
    # and eval.baseline false leaves it out
    run(smoke(tmp_path / "none", **{"eval.baseline": "false", "objective.method": "dit"}))
    assert "random real" not in (tmp_path / "none" / "eval" / "results.md").read_text()


def test_baselines_dit_and_minimax(tmp_path):
    dit = run(smoke(tmp_path / "dit", **{"objective.method": "dit"}))
    assert dit["model"] is None and not (tmp_path / "dit" / "model").exists()
    assert (tmp_path / "dit" / "pretrained").is_dir()
    mm = run(smoke(tmp_path / "mm", **{"objective.method": "minimax"}))
    assert mm["policy"] == "fifo"


def test_epoch_timing_refreshes_the_memories_every_refresh_every_steps(tmp_path):
    quiet = {"memory.timing": "epoch", "eval.enabled": "false"}
    # smoke: 400 images at batch 16 make a pass of 25 steps, longer than the 20 of fine-tuning:
    # refreshed once a pass, the memories would stay empty and the memory terms off
    with pytest.raises(ConfigError, match="Set memory.refresh_every below 20"):
        run(smoke(tmp_path / "never", **quiet))
    assert not (tmp_path / "never").exists()  # refused before anything was written or trained
    run(smoke(tmp_path / "every5", **quiet, **{"memory.refresh_every": "5"}))
    lines = (tmp_path / "every5" / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r["stage"] == "finetune"]
    assert [r["step"] for r in rows] == [10, 20]
    # refreshed at steps 5, 10 and 15: both memories hold items and both terms pull
    for r in rows:
        assert np.isfinite(r["memory_cos_real"]) and np.isfinite(r["memory_cos_gen"])
        assert r["grad_rep"] > 0 and r["grad_div"] > 0
    with pytest.raises(ConfigError, match="applies to memory.timing=epoch only"):
        smoke(tmp_path / "step", **{"memory.refresh_every": "5"})


def test_cli_reports_bad_input_and_writes_nothing(tmp_path, capsys):
    assert main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--bogus", "1"]) == 2
    assert "unknown flag --bogus" in capsys.readouterr().err
    assert main(["--preset", "imagewoof", "--out", str(tmp_path / "y")]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["--preset", "smoke", "--out", str(tmp_path / "z"),
                 "--model.dit", str(tmp_path / "nope")]) == 2
    assert "neither an existing folder, a .pt file nor a preset" in capsys.readouterr().err
    # a corrupt image is found while the data is read, before the run folder is written
    for w in ("n02096294", "n02093754"):
        (tmp_path / "tree" / w).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "tree" / w / "a.png")
    (tmp_path / "tree" / "n02093754" / "b.png").write_bytes(b"not an image")
    assert main(["--preset", "smoke", "--out", str(tmp_path / "c"), "--source", "imagefolder",
                 "--root", str(tmp_path / "tree"), "--test-root", str(tmp_path / "tree"),
                 "--resolution", "8", "--data.hflip", "true",
                 "--data.channels", "1", "--data.max_per_class", "0"]) == 2
    assert "b.png" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z", "c"))
    assert main(["--help"]) == 0
    assert "--objective.lambda_g" in capsys.readouterr().out


def test_pretrained_dit_folder_vae_cache_and_imagenet_conditioning(tmp_path):
    rng = np.random.default_rng(0)
    wnids = ["n02096294", "n02093754"]  # ImageNet 193 and 182 (ImageWoof)
    for split in ("train", "val"):
        for w in wnids:
            (tmp_path / split / w).mkdir(parents=True)
            for k in range(6):
                arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / w / f"{k}.png")
    torch.manual_seed(0)
    dit = build_dit("micro", in_channels=4, sample_size=8, num_classes=1000)
    vae = build_vae("small", in_channels=3, sample_size=16)
    save_pipeline(tmp_path / "weights", dit, vae)
    overrides = {
        "run.out": str(tmp_path / "run"), "run.progress": "off",
        "data.root": str(tmp_path / "train"),
        "data.test_root": str(tmp_path / "val"), "data.subset": ",".join(wnids),
        "data.resolution": "16", "data.cache_dir": str(tmp_path / "cache"),
        "model.dit": str(tmp_path / "weights"), "optim.steps": "4", "optim.batch_size": "4",
        "memory.real_capacity": "3", "memory.gen_capacity": "3", "sample.ipc": "2",
        "sample.steps": "3", "run.log_every": "2", "eval.networks": "resnetap10",
        "eval.repeats": "1", "eval.epochs": "1",
    }
    summary = run(resolve("imagewoof", overrides))
    manifest = json.loads((tmp_path / "run" / "distilled" / "manifest.json").read_text())
    assert [c["cond_label"] for c in manifest["classes"]] == [193, 182]
    assert [c["folder"] for c in manifest["classes"]] == wnids
    assert len(list((tmp_path / "cache").glob("latents-*.safetensors"))) == 1
    img = np.asarray(Image.open(tmp_path / "run" / "distilled" / wnids[0] / "00000.png"))
    assert img.shape == (16, 16, 3)
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(summary["model"], local_files_only=True)
    assert pipe.transformer.config.num_embeds_ada_norm == 1000
    # a second run reuses the latent cache
    overrides["run.out"] = str(tmp_path / "run2")
    run(resolve("imagewoof", overrides))
    assert len(list((tmp_path / "cache").glob("latents-*.safetensors"))) == 1


def test_progress_bars_on_a_terminal_and_quiet_otherwise(tmp_path, capsys):
    """run.progress on: bars with rate and ETA for every stage on stderr; auto without a
    terminal (as here): none. Log lines (stdout) are the same either way."""
    run(smoke(tmp_path / "bars", **{"run.progress": "on"}))
    shown = capsys.readouterr()
    for stage in ("load:", "pretrain:", "finetune:", "sample:", "convnet3 seed "):
        assert stage in shown.err, stage
    assert "step/s" in shown.err and "<" in shown.err  # rate and remaining time
    run(smoke(tmp_path / "quiet", **{"run.progress": "auto"}))
    quiet = capsys.readouterr()
    assert "step/s" not in quiet.err and "%|" not in quiet.err
    logged = [x for x in quiet.out.splitlines() if x.startswith("[finetune] step")]
    assert len(logged) == 2 and all("img/s" in x and "rep" in x for x in logged)


def test_term_gradient_norms_have_their_closed_form():
    """|d term / d out| for the memory terms: only the extreme sample's eps channels get
    gradient, (lambda / n) * |d cos / d x0| * sqrt(1 - abar_t) / sqrt(abar_t); with empty
    memories the terms have none. The diffusion loss always pushes."""
    from ddfast.diffusion import Diffusion
    from ddfast.memory import MemoryBank
    from ddfast.models import build_dit
    from ddfast.ref import class_extremes_ref
    from ddfast.trainer import objective, term_grad_norms

    torch.manual_seed(0)
    dit = build_dit("micro", in_channels=1, sample_size=8, num_classes=10).double()
    diffusion = Diffusion()
    labels = torch.tensor([0, 0, 1, 1, 1])  # n = 2 classes
    z0 = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(z0)
    t = torch.tensor([10, 400, 999, 50, 700])
    bank = MemoryBank(10, 64, real_capacity=4, gen_capacity=4)
    args = (diffusion, z0, t, noise, labels, bank, 0.5, 0.25, False)
    _, _, x0, out = objective(dit, diffusion, z0, t, noise, labels, labels, bank, 0.5, 0.25,
                              False, "fp32")
    empty = term_grad_norms(out, *args)
    assert empty[0] > 0 and empty[1] == 0 and empty[2] == 0
    bank.update(torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64),
                labels)
    got = term_grad_norms(out, *args)
    x0 = x0.detach()
    ab = torch.tensor(diffusion.tables64["alphas_cumprod"])[t]  # (B,)
    scale = (1 - ab).sqrt() / ab.sqrt()  # |d x0 / d eps|
    for k, (items, counts, largest, lam) in enumerate(
            ((bank.real.items, bank.real.counts, False, 0.5),
             (bank.gen.items, bank.gen.counts, True, 0.25)), start=1):
        _, arg_s, arg_j = class_extremes_ref(x0, labels, items, counts, largest)
        sq = 0.0
        for c in (0, 1):
            i, j = int(arg_s[c]), int(arg_j[c])
            x, m = x0[i], items[c, j]
            u, m_hat = x / x.norm(), m / m.norm()
            dcos = (m_hat - (u @ m_hat) * u) / x.norm()
            sq += float((lam / 2 * dcos * scale[i]).norm() ** 2)
        # The norms are computed in float32 (a few roundings of 2^-24 over D = 64 sums, plus the
        # float32 copy of abar): about 1e-7 measured on AVX512 and default kernels; 1e-6 is ~17
        # float32 roundings, any x86-64 CPU and thread count.
        assert float(got[k]) == pytest.approx(sq ** 0.5, rel=1e-6), k


def test_holdout_is_the_last_items_of_each_class_and_leaves_the_first():
    from ddfast.errors import ConfigError
    from ddfast.eval.protocol import first_per_class
    from ddfast.train import holdout_indices, training_indices

    labels = torch.tensor([0, 1, 0, 1, 0, 2, 2, 1, 0])
    assert holdout_indices(labels, 1).tolist() == [6, 7, 8]
    assert training_indices(labels, 0, 1).tolist() == [0, 1, 2, 3, 4, 5]
    assert training_indices(labels, 1, 1).tolist() == [0, 1, 5]  # then the first of each class
    assert training_indices(labels, 0, 0).tolist() == list(range(9))
    # The random-real baseline (the first IPC of each class) never meets the holdout.
    big = torch.arange(300) % 7
    held = set(holdout_indices(big, 20).tolist())
    assert len(held) == 140 and not held & set(first_per_class(big, 10, 7).tolist())
    assert sorted(held | set(training_indices(big, 0, 20).tolist())) == list(range(300))
    with pytest.raises(ConfigError, match=r"data.holdout=2 would leave classes \[2\]"):
        training_indices(labels, 0, 2)
    with pytest.raises(ConfigError, match="data.holdout must not be negative"):
        resolve("smoke", {"data.holdout": "-1"})


def test_stage_learning_rate_warms_up_then_stays_or_falls_along_a_cosine():
    from ddfast.trainer import StageSpec, stage_lr

    kw = dict(name="pretrain", steps=110, batch_size=8, lr=2e-3, weight_decay=0.0, warmup=10,
              ema_decay=0.9, label_dropout=0.1)
    const, cos = StageSpec(**kw), StageSpec(**kw, decay="cosine")
    for spec in (const, cos):  # the warm-up is the same line under both
        assert [stage_lr(spec, s) for s in (0, 4, 9)] == pytest.approx([2e-4, 1e-3, 2e-3])
    assert [stage_lr(const, s) for s in (10, 60, 109)] == [2e-3, 2e-3, 2e-3]
    # half a cosine over the 100 steps after warm-up: full rate, half way, near zero
    assert stage_lr(cos, 10) == pytest.approx(2e-3)
    assert stage_lr(cos, 60) == pytest.approx(1e-3)
    assert stage_lr(cos, 109) == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    lrs = [stage_lr(cos, s) for s in range(10, 110)]
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))
