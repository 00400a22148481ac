"""The results study end to end at its smoke scale: every reported figure comes from a cell."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from ddfast.errors import ConfigError
from ddfast.study import METHODS, SCALES, Study, main
from ddfast.study_report import PROTOCOL_NAMES, logged_seconds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(out)]) == 0
    return out


def _cell(out, key):
    return json.loads((out / "work" / "evals" / f"{key}.json").read_text())


def _val(out, key):  # a held-out accuracy cell
    return json.loads((out / "work" / "sampling" / f"{key}-dc.json").read_text())["acc_best"]


def test_results_are_read_from_the_cells(study_dir):
    res = json.loads((study_dir / "results.json").read_text())
    scale = SCALES["smoke"]["digits"]
    rows = res["rows"]
    ipcs = {*scale.ipc, *scale.ipc_once}
    assert {(r["method"], r["ipc"]) for r in rows} == {(m, i) for m in METHODS for i in ipcs}
    for r in rows:
        cell = _cell(study_dir, f"{r['method']}-r0-ipc{r['ipc']}-dc")
        assert r["accuracy"]["mean"] == cell["acc_best"] == r["repeats"][0]
        assert cell["epochs"] == scale.eval_epochs and cell["ipc"] == r["ipc"]
        assert 0.0 <= cell["coverage"] <= 1.0
        assert (cell["pairwise"] is None) == (r["ipc"] == 1)
    full = json.loads((study_dir / "work" / "full" / "result.json").read_text())
    assert res["full"]["accuracy"] == full["last"]
    assert [a["setting"] for a in res["ablations"]] == [
        "objective.lambda_r", "objective.lambda_g", "memory.real_capacity", "memory.gen_capacity"]
    for ab in res["ablations"]:
        assert [p["default"] for p in ab["points"]] == [True, False]  # default, then x4
        assert all(p["accuracy"] is not None for p in ab["points"])
    md = (study_dir / "results.md").read_text()
    assert "| random real |" in md and "not run" not in md
    for rel in res["plots"] + res["grids"]:
        assert (study_dir / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["grids"]) == (len(METHODS) + len(scale.lambda_g_factors)
                                 + len(scale.exact_guidance) + 1  # + the closest samples
                                 + len(METHODS)  # + each method's prototype-selected set
                                 + (len(METHODS) - 1) * len(scale.larger_pools)  # larger pools
                                 + len(METHODS) - 1)  # + each generated method's anchored set
    # the lambda_g sweep: the default and each factor, every row read from its cell and sets
    sweep = res["lambda_g"]
    default = 0.008
    assert [p["lambda_g"] for p in sweep] == pytest.approx(
        sorted([default] + [default * f for f in scale.lambda_g_factors]))
    for p in sweep:
        key = "ours-step-r0-ipc10-dc" if p["default"] else f"ours-step{p['tag']}-r0-ipc10-dc"
        assert p["accuracy"] == _cell(study_dir, key)["acc_best"]
    assert next(p for p in sweep if p["default"])["pixel_change"] == {"mean": 0.0, "max": 0.0}
    study = Study("digits", "smoke", study_dir)
    x0, _ = study.method_set("ours-step", 0, 10)
    for _value, tag, extra in study.lambda_g_points():  # recomputed from the sets themselves
        x, _ = study.method_set("ours-step", 0, 10, extra, tag)
        p = next(p for p in sweep if p["tag"] == tag)
        diff = (x.double() - x0.double()).abs()
        assert p["pixel_change"] == pytest.approx({"mean": float(diff.mean()),
                                                   "max": float(diff.max())})
    assert "lambda_g.png" in res["plots"] and "| **0.008** |" in md
    real = _cell(study_dir, "random-r0-ipc10-dc")["acc_best"]
    assert f"| random real (same recipe) | {real:.1f} |" in md.split("lambda_g sweep")[1]
    # the mechanism: each memory method's curves, the mean over its runs' logged values
    mech = res["mechanism"]
    assert set(mech) == {"minimax", "ours-step", "ours-epoch"} and "mechanism.png" in res["plots"]
    lines = [json.loads(x) for x in
             (study_dir / "work" / "minimax-r0" / "metrics.jsonl").read_text().splitlines()]
    fine = [x for x in lines if x["stage"] == "finetune"]
    assert mech["minimax"]["step"] == [x["step"] for x in fine]
    assert mech["minimax"]["memory_cos_gen"] == pytest.approx([x["memory_cos_gen"] for x in fine])
    assert mech["minimax"]["grad_div"] == pytest.approx([x["grad_div"] for x in fine])
    assert "| Minimax (fifo) |" in md.split("The memories at the end")[1]


def test_quality_cells_measure_the_sets_they_name(study_dir):
    from ddfast.eval.diversity import features
    from ddfast.eval.quality import frechet_distance

    res = json.loads((study_dir / "results.json").read_text())
    scale = SCALES["smoke"]["digits"]
    q, top = scale.quality_per_class, max(scale.ipc)
    want = {f"random-ipc{q}", f"dit-ipc{q}"} | {f"{m}-r0-ipc{top}" for m in METHODS}
    assert {c["key"] for c in res["quality"]} == want
    cells = {c["key"]: c for c in res["quality"]}
    assert cells[f"dit-ipc{q}"]["n"] == cells[f"random-ipc{q}"]["n"] == 10 * q
    assert (study_dir / "work" / "dit-quality-r0" / "distilled").is_dir()  # its own sample
    # The real cell, recomputed here from the images it names.
    study = Study("digits", "smoke", study_dir)
    x, y = study.method_set("random", 0, q)
    _, model = study.full_classifier()
    xn = study._normalised(x)
    with torch.no_grad():
        fidelity = 100.0 * float((model(xn).argmax(1) == y).double().mean())
    test_f = study.test_features()
    assert test_f.shape[0] == study.data()[1].shape[0]
    real = cells[f"random-ipc{q}"]
    assert real["fidelity"] == pytest.approx(fidelity)
    assert real["fd"] == pytest.approx(frechet_distance(features(model, xn), test_f), rel=1e-9)
    for c in res["quality"]:
        assert 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1 and 0 <= c["coverage"] <= 1
    # Which way the real items face, recomputed against the training split's class means.
    from ddfast.eval.quality import class_means, mirror_agreement

    train = study.data()[0]
    per = mirror_agreement(x, y, class_means(train.images(range(len(train))), train.labels, 10))
    assert real["facing"]["per_class"] == pytest.approx({str(c): v for c, v in per.items()})
    assert real["facing"]["mean"] == pytest.approx(sum(per.values()) / 10)
    md = (study_dir / "results.md").read_text()
    assert f"| DiT (no fine-tune), IPC {q} (a sample of the generator) | {10 * q} |" in md
    assert f"| {real['coverage']:.3f} | {real['facing']['mean']:.2f} |" in md


def test_a_quality_cell_without_facing_gains_it_and_keeps_the_rest(study_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(study_dir, out)
    path = out / "work" / "quality" / "random-ipc8.json"
    cell = json.loads(path.read_text())
    old = {k: v for k, v in cell.items() if k != "facing"}
    path.write_text(json.dumps(old))  # as a cell measured before the measure existed
    study = Study("digits", "smoke", out)
    x, y = study.method_set("random", 0, 8)
    got = study.quality_cell("random-ipc8", x, y)
    assert got == json.loads(path.read_text()) == {**old, "facing": cell["facing"]}


def test_sampling_is_chosen_on_held_out_images_and_used_by_every_set(study_dir):
    from ddfast.train import holdout_indices

    res = json.loads((study_dir / "results.json").read_text())
    scale = SCALES["smoke"]["digits"]
    sw = res["sampling"]
    assert [(p["guidance_scale"], p["sampler"], p["steps"]) for p in sw["points"]] == [
        tuple(g) for g in scale.sampling_grid]
    best = min(sw["points"], key=lambda p: p["fd"])
    assert sw["chosen"] == best["settings"]
    for p in sw["points"]:  # each point is the cell of its own run, measured on the holdout
        cell = json.loads((study_dir / "work" / "sampling" /
                           f"val-g{p['guidance_scale']:g}-{p['sampler']}{p['steps']}.json")
                          .read_text())
        assert cell["against"] == "val" and cell["fd"] == p["fd"]
        assert cell["n"] == 10 * scale.val_per_class
    work = study_dir / "work"
    assert json.loads((work / "base" / "config.json").read_text())["data"]["holdout"] == 5
    base = json.loads((work / "base" / "summary.json").read_text())
    assert (base["training_images"], base["held_out"]) == (400, 50)  # 40 of each class kept
    for method in ("dit", "minimax", "ours-step", "dit-quality"):
        cfg = json.loads((work / f"{method}-r0" / "config.json").read_text())
        assert cfg["data"]["holdout"] == 5
        assert cfg["sample"]["guidance_scale"] == float(sw["chosen"]["sample.guidance_scale"])
        assert cfg["sample"]["sampler"] == sw["chosen"]["sample.sampler"]
    study = Study("digits", "smoke", study_dir)
    _, val_y, val_f = study.validation()
    train = study.data()[0]
    assert val_y.tolist() == train.labels[holdout_indices(train.labels, 5)].tolist()
    assert val_f.shape[0] == 50
    md = (study_dir / "results.md").read_text()
    assert "Sampling settings, chosen on 5 held-out training images per class" in md
    assert "sampling.png" in res["plots"]


def test_a_point_added_to_the_sampling_grid_is_measured_and_the_choice_made_again(
        study_dir, tmp_path, monkeypatch, capsys):
    import dataclasses
    import shutil

    out = tmp_path / "study"
    shutil.copytree(study_dir, out)
    old = json.loads((out / "work" / "sampling.json").read_text())
    cells = {p.name: p.read_bytes() for p in (out / "work" / "sampling").iterdir()}
    scale = SCALES["smoke"]["digits"]
    added = (3.0, "ddpm", 4)
    monkeypatch.setitem(SCALES["smoke"], "digits", dataclasses.replace(
        scale, sampling_grid=(*scale.sampling_grid, added)))
    capsys.readouterr()
    chosen = Study("digits", "smoke", out).sampling()
    log = capsys.readouterr().out
    assert "[study] run sampling-g3-ddpm4" in log
    rec = json.loads((out / "work" / "sampling.json").read_text())
    # the old points are read, not measured again; only the new one is sampled and measured
    assert rec["points"][:-1] == old["points"]
    assert (rec["points"][-1]["guidance_scale"], rec["points"][-1]["sampler"],
            rec["points"][-1]["steps"]) == added
    assert {p.name: p.read_bytes() for p in (out / "work" / "sampling").iterdir()
            if p.name in cells} == cells
    assert set(p.name for p in (out / "work" / "sampling").iterdir()) - set(cells) == {
        "val-g3-ddpm4.json"}
    best = min(rec["points"], key=lambda p: p["fd"])
    assert chosen == rec["chosen"] == best["settings"]
    assert ("now chooses" in log) == (best["settings"] != old["chosen"])
    # measured once: asked again, nothing is sampled and the record stays as it is
    before = (out / "work" / "sampling.json").read_bytes()
    assert Study("digits", "smoke", out).sampling() == chosen
    assert (out / "work" / "sampling.json").read_bytes() == before
    assert "[study] run sampling" not in capsys.readouterr().out


def test_the_runs_differ_by_method_and_share_one_model(study_dir):
    work = study_dir / "work"
    base = json.loads((work / "base" / "config.json").read_text())
    assert base["objective"]["method"] == "dit"
    for method, policy, timing in (("minimax", "fifo", "step"), ("ours-step", "adaptive", "step"),
                                   ("ours-epoch", "adaptive", "epoch")):
        cfg = json.loads((work / f"{method}-r0" / "config.json").read_text())
        assert cfg["model"]["dit"] == str(work / "base" / "pretrained")
        summary = json.loads((work / f"{method}-r0" / "summary.json").read_text())
        assert summary["policy"] == policy and cfg["memory"]["timing"] == timing
    dit = json.loads((work / "dit-r0" / "summary.json").read_text())
    assert dit["model"] is None  # sampled from the pretrained model without fine-tuning


def test_rerun_skips_finished_cells_and_report_marks_missing(study_dir):
    evals = study_dir / "work" / "evals"
    before = {p.name: p.stat().st_mtime_ns for p in evals.iterdir()}
    summaries = sorted((study_dir / "work").glob("*/summary.json"))
    runs_before = [p.read_text() for p in summaries]
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(study_dir)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in evals.iterdir()} == before
    assert sorted((study_dir / "work").glob("*/summary.json")) == summaries
    assert [p.read_text() for p in summaries] == runs_before  # no run was redone
    moved = evals / "minimax-r0-ipc10-dc.json"
    keep = moved.read_bytes()
    moved.unlink()
    try:
        assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(study_dir),
                     "--report"]) == 0
        md = (study_dir / "results.md").read_text()
        lines = md.splitlines()
        row = next(line for line in lines if line.startswith("| Minimax"))
        header = next(line for line in lines if line.startswith("| method"))
        cells = dict(zip(header.split("|"), row.split("|"), strict=True))
        assert cells[" IPC 10 "].strip() == "not run"
        assert cells[" IPC 1 "].strip() != "not run"
    finally:
        moved.write_bytes(keep)


def test_a_run_with_other_settings_is_refused(study_dir):
    summary = study_dir / "work" / "dit-r0" / "summary.json"
    original = summary.read_text()
    data = json.loads(original)
    data["config_digest"] = "0" * 16
    summary.write_text(json.dumps(data))
    try:
        with pytest.raises(ConfigError, match="other settings"):
            Study("digits", "smoke", study_dir).distilled("dit", 0)
    finally:
        summary.write_text(original)


def test_bad_study_arguments(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no scale 'smoke' for fashion-mnist"):
        Study("fashion-mnist", "smoke", tmp_path)
    with pytest.raises(SystemExit):
        main(["--dataset", "cifar", "--out", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(tmp_path),
                 "--methods", "random,dsa"]) == 2
    assert "unknown method(s) dsa" in capsys.readouterr().err
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(tmp_path),
                 "--ipc", "7"]) == 2
    assert "IPC 7 is not in this scale: pass a subset of 1, 10, 20" in capsys.readouterr().err
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(tmp_path),
                 "--ipc", "one"]) == 2
    assert "--ipc 'one': pass comma-separated integers" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_ipc_restricts_a_study_to_the_cells_of_those_ipcs(study_dir):
    evals = study_dir / "work" / "evals"
    kept = {k: (evals / f"{k}.json").read_bytes()
            for k in ("random-r0-ipc1-dc", "random-r0-ipc10-dc")}
    for k in kept:
        (evals / f"{k}.json").unlink()
    try:
        assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(study_dir),
                     "--methods", "random", "--ipc", "1"]) == 0
        assert (evals / "random-r0-ipc1-dc.json").is_file()
        assert not (evals / "random-r0-ipc10-dc.json").exists()
        # the same classifier seed on the same set: the recomputed cell is the committed one
        assert _cell(study_dir, "random-r0-ipc1-dc")["acc_best"] == pytest.approx(
            json.loads(kept["random-r0-ipc1-dc"])["acc_best"], abs=1e-9)
    finally:
        for k, data in kept.items():
            (evals / f"{k}.json").write_bytes(data)


def test_the_idc_recipe_runs_only_at_its_ipcs(study_dir, tmp_path, monkeypatch):
    """A scale with ``small_ipc`` evaluates those IPCs under the IDC recipe as well, and no other
    IPC (the ``ipc_once`` one included); the report marks those it never evaluates with "-",
    and cells not yet computed as not run."""
    import dataclasses
    import shutil

    out = tmp_path / "study"
    shutil.copytree(study_dir, out)
    scale = dataclasses.replace(SCALES["smoke"]["digits"], protocols=("dc", "small"),
                                small_ipc=(1,), select_protocols=("dc", "small"))
    monkeypatch.setitem(SCALES["smoke"], "digits", scale)
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(out),
                 "--methods", "random"]) == 0
    small = sorted(p.name for p in (out / "work" / "evals").glob("*-small.json"))
    assert small == ["random-r0-ipc1-small.json", "select-real-r0-ipc1-small.json"]
    picked = _cell(out, "select-real-r0-ipc1-small")  # the selected set under this recipe too
    assert picked["protocol"] == "small" and picked["ipc"] == 1
    sel = {(r["method"], r["ipc"]): r for r in json.loads((out / "results.json").read_text())
           ["selected"] if r["protocol"] == "small"}
    assert set(sel) == {(m, 1) for m in METHODS}
    assert sel[("random", 1)]["repeats"] == [picked["acc_best"]]
    assert sel[("dit", 1)]["accuracy"] is None  # not computed by this process
    idc = (out / "results.md").read_text().split("Prototype selection")[1].split("IDC recipe")[1]
    assert f"| real images nearest the prototypes | {picked['acc_best']:.1f} (" in idc
    assert "| DiT (no fine-tune), prototype selection | not run | - |" in idc
    cell = _cell(out, "random-r0-ipc1-small")
    assert cell["protocol"] == "small" and cell["ipc"] == 1
    rows = {(r["method"], r["ipc"]): r for r in json.loads((out / "results.json").read_text())
            ["rows"] if r["protocol"] == "small"}
    assert rows[("random", 1)]["repeats"] == [cell["acc_best"]]
    assert rows[("random", 10)]["accuracy"] is None and rows[("dit", 1)]["accuracy"] is None
    assert [r["evaluated"] for r in rows.values() if r["method"] == "random"] == [
        ipc == 1 for ipc in sorted({*scale.ipc, *scale.ipc_once})]
    table = (out / "results.md").read_text().split("IDC recipe")[1].split("\n\n")[1]
    assert "| random real | " + f"{cell['acc_best']:.1f} | - | - |" in table  # IPC 1, 10, 20
    assert "| DiT (no fine-tune) | not run | - | - |" in table
    # the DC cells are the committed ones, untouched
    assert _cell(out, "random-r0-ipc1-dc") == _cell(study_dir, "random-r0-ipc1-dc")


def test_repeats_limits_every_recipe_and_selection_follows_each_recipes_repeats(tmp_path):
    cpu = Study("fashion-mnist", "cpu", tmp_path / "a")
    points = list(cpu.select_points())
    assert {(m, r, i, p) for m, r, i, p in points} == {
        (m, r, i, p) for m in METHODS for r in range(3) for i in (1, 10) for p in ("dc", "small")}
    assert len(points) == len(set(points))
    assert cpu.select_key("dit", 2, 10, "small") == "select-dit-p200-r2-ipc10-small"
    assert cpu.select_key("random", 0, 1) == "select-real-r0-ipc1-dc"
    assert cpu.select_key("dit", 2, 10, "small", 1000) == "select-dit-p1000-r2-ipc10-small"
    assert set(cpu.larger_pool_points()) == {
        (m, r, 10, p, 1000) for m in METHODS[1:] for r in range(3) for p in ("dc", "small")}
    assert len(list(cpu.larger_pool_points())) == 24
    one = Study("fashion-mnist", "cpu", tmp_path / "b", repeats=1)
    assert one.scale.repeats_of("dc") == one.scale.repeats_of("small") == 1
    assert {r for _, r, _, _ in one.select_points()} == {0}
    assert list(one.select_points(("random",), {10}))[0] == ("random", 0, 10, "dc")
    digits = Study("digits", "cpu", tmp_path / "c", repeats=2)  # its IDC recipe runs once
    assert (digits.scale.repeats_of("dc"), digits.scale.repeats_of("small")) == (2, 1)


def test_a_larger_pool_not_above_the_selection_pool_is_refused():
    cpu = SCALES["cpu"]["fashion-mnist"]  # select_pool 200, larger_pools (1000,)
    assert dataclasses.replace(cpu, larger_pools=(201, 1000)).larger_pools == (201, 1000)
    with pytest.raises(ValueError, match=r"larger_pools \[200\] are not above select_pool"):
        dataclasses.replace(cpu, larger_pools=(200, 1000))
    with pytest.raises(ValueError, match="larger_pools needs select_pool"):
        dataclasses.replace(cpu, select_pool=0)
    with pytest.raises(ValueError, match=r"larger_pool_ipc \(50,\) names IPCs"):
        dataclasses.replace(cpu, larger_pool_ipc=(50,))
    assert dataclasses.replace(cpu, select_pool=0, larger_pools=()).larger_pools == ()


def test_a_full_classifier_of_other_settings_is_refused(study_dir):
    rec = study_dir / "work" / "full" / "result.json"
    original = rec.read_text()
    data = json.loads(original)
    data["batch_size"] = 7
    rec.write_text(json.dumps(data))
    try:
        with pytest.raises(ConfigError, match="full-data classifier of 1 epochs at batch 7"):
            Study("digits", "smoke", study_dir).full_classifier()
    finally:
        rec.write_text(original)


def test_an_ipc_measured_once_samples_the_method_runs_model(study_dir):
    """IPC 20 (the smoke scale's ipc_once) comes from runs of its own that sample the model of
    the method's repeat-0 run: the method runs keep sampling IPC 1 and 10 only."""
    work = study_dir / "work"
    (ipc,) = SCALES["smoke"]["digits"].ipc_once
    for method in ("dit", "minimax", "ours-step", "ours-epoch"):
        cfg = json.loads((work / f"{method}-r0-ipc{ipc}" / "config.json").read_text())
        source = work / ("base/pretrained" if method == "dit" else f"{method}-r0/model")
        assert cfg["model"]["dit"] == str(source) and cfg["objective"]["method"] == "dit"
        assert cfg["sample"]["ipc"] == [ipc] and cfg["sample"]["seed"] == 0
        assert json.loads((work / f"{method}-r0" / "config.json").read_text())["sample"]["ipc"] \
            == [1, 10]
        manifest = json.loads((work / f"{method}-r0-ipc{ipc}" / "distilled" / "manifest.json")
                              .read_text())
        assert manifest["ipc"] == ipc
        assert _cell(study_dir, f"{method}-r0-ipc{ipc}-dc")["ipc"] == ipc
    assert not (work / "evals" / f"dit-r1-ipc{ipc}-dc.json").exists()


def _committed_only(src, dst):
    """dst: a copy of the study folder holding only what .gitignore lets a commit carry."""
    import shutil

    shutil.copytree(src, dst)
    keep = {"summary.json", "config.json", "result.json", "metrics.jsonl", "distilled"}
    for run in (dst / "work").iterdir():
        if not run.is_dir() or run.name in ("evals", "quality", "sampling", "lambda_g",
                                            "select", "anchored"):
            continue
        for child in run.iterdir():
            kept = (child.name in keep or (run.name, child.name) in
                    {("base", "pretrained"), ("full", "convnet3.safetensors")})
            if not kept:
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def test_a_clean_checkout_resumes_and_recomputes_only_missing_outputs(study_dir, tmp_path,
                                                                       capsys):
    out = tmp_path / "clone"
    _committed_only(study_dir, out)
    work = out / "work"
    evals = {p.name: p.read_bytes() for p in (work / "evals").iterdir()}

    def summaries():  # what the runs recorded, less the digest of their paths
        return {p: {k: v for k, v in json.loads(p.read_text()).items()
                    if k not in ("config_digest", "run_folder")}
                for p in work.glob("*/summary.json")}

    before_runs = summaries()
    capsys.readouterr()
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(out)]) == 0
    # The clone lies elsewhere: the runs' paths into the study are written anew, once.
    assert "run dit-r0: the study moved" in capsys.readouterr().out
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(out)]) == 0
    assert "the study moved" not in capsys.readouterr().out
    # Nothing was trained or evaluated again: the committed outputs were enough ...
    assert {p.name: p.read_bytes() for p in (work / "evals").iterdir()} == evals
    assert summaries() == before_runs
    assert not (work / "minimax-r0" / "model").exists()
    # ... and a run whose output is missing is computed again, with one log line per step,
    # the same losses as its committed log and the same images (same machine, same threads).
    run = work / "minimax-r0"
    before = (run / "metrics.jsonl").read_text()
    images = {p.relative_to(run): p.read_bytes() for p in (run / "distilled").rglob("*.png")}
    import shutil

    shutil.rmtree(run / "distilled")
    capsys.readouterr()
    Study("digits", "smoke", out).distilled("minimax", 0)
    log = capsys.readouterr().out
    assert "its distilled is not on disk" in log and "equal the committed ones" in log
    def rows(text):  # the log without its timings
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                for line in text.splitlines()]

    assert rows((run / "metrics.jsonl").read_text()) == rows(before)
    assert {p.relative_to(run): p.read_bytes() for p in (run / "distilled").rglob("*.png")} \
        == images


def test_a_report_without_a_runs_distilled_set_keeps_its_grid(study_dir, tmp_path):
    out = tmp_path / "clone"
    _committed_only(study_dir, out)
    import shutil

    grid = out / "grids" / "dit.png"
    before = grid.read_bytes()
    shutil.rmtree(out / "work" / "dit-r0" / "distilled")
    res = Study("digits", "smoke", out).report()
    assert "grids/dit.png" in res["grids"] and grid.read_bytes() == before
    scale = SCALES["smoke"]["digits"]
    assert len(res["grids"]) == (len(METHODS) + len(scale.lambda_g_factors)
                                 + len(scale.exact_guidance) + 1  # + the closest samples
                                 + len(METHODS)  # + each method's prototype-selected set
                                 + (len(METHODS) - 1) * len(scale.larger_pools)  # larger pools
                                 + len(METHODS) - 1)  # + each generated method's anchored set
    assert not (out / "work" / "dit-r0" / "distilled").exists()  # nothing was sampled again


def test_the_exact_draw_weighs_each_item_by_its_class_probability_to_the_guidance():
    from ddfast.study import exact_draw

    # Two classes of four pool items; own = p(own class | x).
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    own = torch.tensor([0.9, 0.5, 0.1, 1.0, 0.6, 1.0, 0.3, 0.2])
    top = exact_draw(own, labels, 2, math.inf, 0, 2)
    assert top.tolist() == [0, 4, 3, 5]  # class by class, highest first, ties by position
    a, b = exact_draw(own, labels, 2, 2.0, 7, 2), exact_draw(own, labels, 2, 2.0, 7, 2)
    assert torch.equal(a, b) and (labels[a] == torch.tensor([0, 0, 1, 1])).all()
    assert len(set(a.tolist())) == 4  # without replacement
    # One item per class drawn many times: frequencies follow own^(g-1), normalised per class.
    n = 4000
    for g in (1.0, 2.0, 4.0):
        counts = torch.zeros(8)
        for d in range(n):
            counts[exact_draw(own, labels, 1, g, d, 2)] += 1
        for c in (0, 1):
            members = (labels == c).nonzero().flatten()
            w = own[members].double() ** (g - 1)
            expect = n * w / w.sum()
            sd = (expect * (1 - w / w.sum())).sqrt()  # binomial spread of each count
            assert ((counts[members].double() - expect).abs() <= 5 * sd + 1).all(), (g, c)
    with pytest.raises(ConfigError, match="fewer than IPC 5"):
        exact_draw(own, labels, 5, 2.0, 0, 2)


def test_the_generators_closest_samples_are_pool_samples_nearest_the_random_real_set(study_dir):
    from ddfast.eval.protocol import load_folder_set

    study = Study("digits", "smoke", study_dir)
    res = study.report()
    n = study.scale.matched_pool
    cells = [_cell(study_dir, f"matched-p{n}-r{r}-ipc10-dc") for r in range(study.scale.repeats)]
    assert res["matched"]["pool"] == n and res["matched"]["repeats"] == [c["acc_best"]
                                                                          for c in cells]
    assert "the generator's closest samples" in (study_dir / "results.md").read_text()
    x, y = study.matched_set()
    px, py, _ = load_folder_set(study_dir / "work" / f"dit-r0-ipc{n}" / "distilled", ipc=n)
    rx, ry = study.method_set("random", 0, 10)
    assert torch.equal(y, ry)  # in the random-real set's order
    # Every image is a pool sample of its class, none twice; the first real image of each class
    # got the pool sample nearest it in the full-data classifier's features.
    flat = px.flatten(1)
    hits = [int((flat == img.flatten()).all(1).nonzero()[0]) for img in x]
    assert len(set(hits)) == len(hits) and torch.equal(py[hits], y)
    pf, rf = study._features(px), study._features(rx)
    for c in range(10):
        first = int((ry == c).nonzero()[0])
        members = (py == c).nonzero().flatten()
        d = torch.cdist(rf[first:first + 1].double(), pf[members].double())[0]
        assert torch.equal(px[members[d.argmin()]], x[first])
    # Its samples are the from-scratch model's at the study's setting, repeat 0's seeds: the
    # first ten of each class are the dit set of repeat 0.
    first10 = torch.cat([px[py == c][:10] for c in range(10)])
    assert torch.equal(first10, study.method_set("dit", 0, 10)[0])


def test_prototype_selection_picks_each_methods_pool_samples_nearest_the_real_centres(
        study_dir):
    from ddfast.eval.protocol import load_folder_set
    from ddfast.select import kmeans, prototype_pick

    study = Study("digits", "smoke", study_dir)
    res = study.report()
    n, (big,) = study.scale.select_pool, study.scale.larger_pools
    assert {(r["method"], r["ipc"], r["pool"]) for r in res["selected"]} == {
        (m, i, None if m == "random" else n) for m in METHODS for i in study.scale.select_ipc
    } | {(m, 10, big) for m in METHODS[1:]}  # the larger pool at IPC 10 only
    for row in res["selected"]:
        cell = _cell(study_dir, study.select_key(row["method"], 0, row["ipc"], "dc", row["pool"]))
        assert row["repeats"] == [cell["acc_best"]] and cell["ipc"] == row["ipc"]
    md = (study_dir / "results.md").read_text()
    assert "| ours (adaptive, per step), prototype selection |" in md
    assert f"| ours (adaptive, per step), prototype selection, pool {big} | - | " in md
    f, fy, idx = study.train_features()
    assert idx.numel() == 10 * 40  # max_per_class of each class, as every run trains on
    for method in ("dit", "ours-step"):
        x, y = study.selected_set(method, 0, 10)
        pool = study_dir / "work" / f"{method}-r0-ipc{n}" / "distilled"
        px, py, _ = load_folder_set(pool, ipc=n)
        pick = prototype_pick(study._features(px), py, f, fy, 10)
        assert torch.equal(x, px[pick]) and torch.equal(y, py[pick])
        assert pick.unique().numel() == 100  # none twice, ten of each class
        manifest = json.loads((study.select_folder(method, 0, 10) / "manifest.json").read_text())
        assert [(pool / m["pool_file"]).read_bytes() for m in manifest["images"][:3]] == [
            (study.select_folder(method, 0, 10) / m["file"]).read_bytes()
            for m in manifest["images"][:3]]
    # The pool of a fine-tuned method is sampled from its run's model: its first ten of each
    # class are the method's own IPC-10 set.
    first10 = torch.cat([px[py == c][:10] for c in range(10)])
    assert torch.equal(first10, study.method_set("ours-step", 0, 10)[0])
    # The larger pool draws the same seeds on: its first n of each class are the pool of n, and
    # its pick is the prototypes' nearest samples among all of it.
    bx, by, _ = load_folder_set(study_dir / "work" / f"ours-step-r0-ipc{big}" / "distilled",
                                ipc=big)
    assert torch.equal(torch.cat([bx[by == c][:n] for c in range(10)]), px)
    x, y = study.selected_set("ours-step", 0, 10, big)
    pick = prototype_pick(study._features(bx), by, f, fy, 10)
    assert torch.equal(x, bx[pick]) and torch.equal(y, by[pick])
    assert not torch.equal(x, study.selected_set("ours-step", 0, 10)[0])  # more to pick from
    # The real row at IPC 1: each class's training image nearest its one centre, the mean.
    x, y = study.selected_set("random", 0, 1)
    train, _, _ = study.data()
    for c in range(10):
        members = (fy == c).nonzero().flatten()
        centre = kmeans(f[members], 1)
        nearest = idx[members[torch.cdist(centre, f[members].double())[0].argmin()]]
        assert torch.equal(x[c], train.images([int(nearest)])[0]) and int(y[c]) == c


def test_anchored_sets_start_from_the_prototype_clusters_at_the_held_out_strength(study_dir):
    from ddfast.diffusion import image_seed
    from ddfast.select import kmeans

    study = Study("digits", "smoke", study_dir)
    res = study.report()
    rec = json.loads((study_dir / "work" / "anchored.json").read_text())
    # The strength: the grid point whose from-scratch IPC-10 set scores best on the held-out
    # images (its cells), ties to the higher.
    vals = {g: _val(study_dir, f"val-anchored-dit-s{g:g}-r0-ipc10") for g in (0.3, 0.6)}
    assert [p["strength"] for p in rec["points"]] == [0.3, 0.6]
    assert [p["val_accuracy"] for p in rec["points"]] == [vals[0.3], vals[0.6]]
    assert rec["chosen"] == max(vals, key=lambda g: (vals[g], g)) == res["anchored"]["strength"]
    g = rec["chosen"]
    assert {(r["method"], r["ipc"]) for r in res["anchored"]["rows"]} == {
        (m, i) for m in METHODS if m != "random" for i in study.scale.select_ipc}
    for row in res["anchored"]["rows"]:
        cell = _cell(study_dir, study.anchored_key(row["method"], 0, row["ipc"], "dc", g))
        assert row["repeats"] == [cell["acc_best"]]
    md = (study_dir / "results.md").read_text()
    assert f"| ours (adaptive, per step), anchored (strength {g:g}) |" in md
    assert "The anchored start's strength, chosen on the held-out images" in md
    # The anchors: each class's k-means clusters (prototype selection's centres) answered by
    # the mean of their training images in [-1, 1].
    f, fy, idx = study.train_features()
    train, _, _ = study.data()
    anchors = study.anchors(10)
    for c in (0, 9):
        members = (fy == c).nonzero().flatten()
        centres = kmeans(f[members], 10)
        assign = torch.cdist(f[members].double(), centres).argmin(dim=1)
        images = train.images(idx[members].tolist()).float() / 127.5 - 1.0
        want = torch.stack([images[assign == j].mean(0) for j in range(10)])
        torch.testing.assert_close(anchors[c], want, rtol=0, atol=1e-6)  # fp32 means in [-1, 1]
    # The set: repeat r's seeds, the chosen strength, ten per class.
    folder = study_dir / "work" / "anchored" / f"ours-step-s{g:g}-r0-ipc10"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["anchored"] == {"strength": g}
    assert [m["seed"] for m in manifest["images"]] == [
        image_seed(0, c, i) for c in range(10) for i in range(10)]
    x, y = study.anchored_set("ours-step", 0, 10)
    assert x.shape[0] == 100 and torch.equal(y, torch.arange(10).repeat_interleave(10))
    assert not torch.equal(x, study.method_set("ours-step", 0, 10)[0])
    # A set written under other settings is refused, not evaluated as this study's.
    saved = (folder / "manifest.json").read_text()
    try:
        for field, value, message in (("seed", 5, "seed 5"),
                                      ("anchored", {"strength": 0.9}, "not strength"),
                                      ("sampler", {"name": "ddim", "steps": 7,
                                                   "guidance_scale": 2.0}, "sampler")):
            (folder / "manifest.json").write_text(json.dumps({**manifest, field: value}))
            with pytest.raises(ConfigError, match=message):
                study.anchored_set("ours-step", 0, 10)
    finally:
        (folder / "manifest.json").write_text(saved)
    assert "grids/anchored-ours-step.png" in res["grids"]
    assert (study_dir / "grids" / "anchored-ours-step.png").is_file()


def test_a_selected_set_of_other_settings_is_refused_not_evaluated(study_dir, tmp_path):
    study = Study("digits", "smoke", study_dir)
    study.report()
    folder = study.select_folder("ours-step", 0, 10)
    study._check_selection(folder, "ours-step", 0, 10)  # the study's own passes
    with pytest.raises(ConfigError, match="not drawn with repeat 1's seeds"):
        study._check_selection(folder, "ours-step", 1, 10)
    (big,) = study.scale.larger_pools  # the larger pool's pick is not the pool of 12's
    study._check_selection(study.select_folder("ours-step", 0, 10, big), "ours-step", 0, 10, big)
    with pytest.raises(ConfigError, match=f"a pool of {big} per class, not 12"):
        study._check_selection(study.select_folder("ours-step", 0, 10, big), "ours-step", 0, 10)
    changes = {"pool_ipc": (study.scale.select_pool + 1, "a pool of"),
               "sampler": ({"name": "ddim", "steps": 50, "guidance_scale": 2.0}, "sampler"),
               "ipc": (5, "5 images per class")}
    for field, (value, message) in changes.items():
        copy = tmp_path / field
        shutil.copytree(folder, copy)
        rec = json.loads((copy / "manifest.json").read_text())
        (copy / "manifest.json").write_text(json.dumps({**rec, field: value}))
        with pytest.raises(ConfigError, match=message):
            study._check_selection(copy, "ours-step", 0, 10)


def test_the_exact_generator_reference_is_drawn_from_the_training_pool(study_dir):
    study = Study("digits", "smoke", study_dir)
    study.report()  # from the cells as they are (other tests rebuild it with cells held back)
    res = json.loads((study_dir / "results.json").read_text())
    points = list(study.exact_points())
    assert [k for *_, k in points] == ["exact-g2-d0-ipc10-dc", "exact-g2-d1-ipc10-dc",
                                       "exact-ginf-d0-ipc10-dc"]
    assert [(p["guidance"], p["draws"]) for p in res["exact"]] == [(2.0, 2), ("inf", 1)]
    for p, want in zip(res["exact"], ([0, 1], [0]), strict=True):
        cells = [_cell(study_dir, f"exact-g{'inf' if p['guidance'] == 'inf' else '2'}-d{d}"
                                  f"-ipc10-dc") for d in want]
        assert p["repeats"] == [c["acc_best"] for c in cells]
        assert [c["seed"] for c in cells] == want and all(c["ipc"] == 10 for c in cells)
    # The sets: ten training images per class (never a held-out one), their own labels; the
    # inf set is each class's most confident, by the full-data classifier.
    from ddfast.train import training_indices

    train, _, _ = study.data()
    labels = torch.as_tensor(train.labels)
    cfg = study.config("probe", {})
    pool = training_indices(labels, cfg.data.max_per_class, cfg.data.holdout)
    images = train.images(pool.tolist())
    x0, y0 = study.exact_set(2.0, 0)
    x1, _ = study.exact_set(2.0, 1)
    assert y0.tolist() == [c for c in range(10) for _ in range(10)]
    assert not torch.equal(x0, x1)
    assert torch.equal(study.exact_set(2.0, 0)[0], x0)
    flat = images.flatten(1)
    for img, c in zip(x0, y0, strict=True):
        hit = (flat == img.flatten()).all(1).nonzero().flatten()
        assert hit.numel() and (labels[pool[hit]] == c).any()
    xi, yi = study.exact_set(math.inf, 0)
    _, model = study.full_classifier()
    with torch.no_grad():
        p_pool = model(study._normalised(images)).softmax(1)[torch.arange(len(pool)),
                                                              labels[pool]]
        p_set = model(study._normalised(xi)).softmax(1)[torch.arange(len(yi)), yi]
    # Batches of other sizes may round the float32 logits differently: a few 1e-6 of a logit
    # of tens, scaled by p (1 - p) <= 1/4 in p; 1e-4 is well above that and far below the
    # gaps between the confidences of different images.
    for c in range(10):
        tenth = p_pool[labels[pool] == c].sort(descending=True).values[9]
        assert (p_set[yi == c] >= tenth - 1e-4).all()
    md = (study_dir / "results.md").read_text().splitlines()
    chosen = json.loads((study_dir / "work" / "sampling.json").read_text())["chosen"]
    mark = " (the study's)" if float(chosen["sample.guidance_scale"]) == 2.0 else ""
    for label, draws in ((f"exact generator, guidance 2{mark}", 2),
                         ("exact generator, guidance inf", 1), ("random real", 1)):
        line = next(x for x in md if x.startswith(f"| {label} | {draws} | "))
        assert "not run" not in line
    # its grids: draw 0 of each guidance, the set the cells of draw 0 trained on
    from ddfast.study_report import _write_grid

    for g in (2.0, math.inf):
        ref = _write_grid(study_dir / "ref.png", study.exact_set(g, 0)[0], 10).read_bytes()
        assert (study_dir / "grids" / f"exact-g{g:g}.png").read_bytes() == ref


def test_the_exact_generator_under_idc_and_through_the_studys_autoencoder(study_dir, tmp_path,
                                                                          monkeypatch):
    from ddfast.autoencoder import reconstruct
    from ddfast.models import load_vae
    from ddfast.study_report import _write_grid

    smoke = SCALES["smoke"]["digits"]
    base = {**smoke.base, "model.vae": "small-f4", "model.patch_size": "1",
            "pretrain.vae_steps": "20"}
    scale = dataclasses.replace(
        smoke, ipc=(10,), ipc_once=(), protocols=("dc", "small"), small_ipc=(10,),
        exact_guidance=(2.0,), exact_small=(2.0,), exact_roundtrip=(2.0,), exact_draws=1,
        base=base, sampling_grid=(), matched_pool=0, select_pool=0, larger_pools=(),
        anchor_grid=(), lambda_g_factors=(), ablations=False, quality_per_class=0,
        generators={}, generator_probes=())
    monkeypatch.setitem(SCALES["smoke"], "digits", scale)
    out = tmp_path / "latent"
    shutil.copytree(study_dir / "work" / "full", out / "work" / "full")  # not trained again
    study = Study("digits", "smoke", out)
    study.run_all(("random",))
    points = list(study.exact_points())
    assert [(p.protocol, p.roundtrip, p.key) for p in points] == [
        ("dc", False, "exact-g2-d0-ipc10-dc"), ("small", False, "exact-g2-d0-ipc10-small"),
        ("dc", True, "exact-roundtrip-g2-d0-ipc10-dc"),
        ("small", True, "exact-roundtrip-g2-d0-ipc10-small")]
    cells = {p.key: _cell(out, p.key) for p in points}
    assert [(c["protocol"], c["seed"], c["ipc"]) for c in cells.values()] == [
        (p.protocol, 0, 10) for p in points]
    # The round trip is the raw draw through the autoencoder the from-scratch DiT trained on.
    x, y = study.exact_set(2.0, 0)
    vae = load_vae(study.pretrained())
    trip, trip_y = study.exact_set(2.0, 0, roundtrip=True)
    assert torch.equal(trip_y, y) and torch.equal(trip, reconstruct(vae, x))
    assert not torch.equal(trip, x)
    own = load_vae(out / "work" / "base" / "vae").state_dict()
    assert all(torch.equal(v, own[k]) for k, v in vae.state_dict().items())
    # The report: a row per recipe and set, each draw against random real of the same seed.
    study.report()
    res = json.loads((out / "results.json").read_text())
    assert [(p["protocol"], p["set"], p["draws"]) for p in res["exact"]] == [
        ("dc", "images", 1), ("small", "images", 1), ("dc", "roundtrip", 1),
        ("small", "roundtrip", 1)]
    for p, point in zip(res["exact"], points, strict=True):
        real = _cell(out, f"random-r0-ipc10-{point.protocol}")["acc_best"]
        assert p["repeats"] == [cells[point.key]["acc_best"]]
        assert p["minus_random"] == [cells[point.key]["acc_best"] - real]
    # Every cell records the machine it ran on (rounding differs between kinds of CPU).
    from ddfast.study import device_name

    machine, count = device_name("cpu"), len(list((out / "work" / "evals").glob("*.json")))
    assert {c["machine"] for c in cells.values()} == {machine}
    assert res["eval_machines"] == [{"machine": machine, "cells": count}]
    assert f"Evaluation cells by machine: {machine} ({count})." in \
        (out / "results.md").read_text().splitlines()[0]
    md = (out / "results.md").read_text().split("What an exact generator would score")[1]
    for proto in ("dc", "small"):
        table = md.split(PROTOCOL_NAMES[proto] + ":\n\n")[1].split("\n\n")[0]
        want = [f"| exact generator, guidance 2{through} | 1 | "
                for through in ("", ", round trip through the autoencoder")] + \
            ["| random real | 1 | "]
        assert [any(line.startswith(w) for line in table.splitlines()) for w in want] == \
            [True] * 3, table
    for name, images in (("exact-g2", x), ("exact-roundtrip-g2", trip)):
        ref = _write_grid(tmp_path / "ref.png", images, 10).read_bytes()
        assert (out / "grids" / f"{name}.png").read_bytes() == ref
    # Without the autoencoder's weights the report keeps the round trip's grid, training nothing.
    shutil.rmtree(out / "work" / "base" / "pretrained" / "vae")
    (out / "grids" / "exact-roundtrip-g2.png").write_bytes(b"kept")
    Study("digits", "smoke", out).report()
    assert (out / "grids" / "exact-roundtrip-g2.png").read_bytes() == b"kept"
    assert not (out / "work" / "base" / "pretrained" / "vae").exists()


def test_exact_cells_the_scale_cannot_compute_are_refused():
    smoke = SCALES["smoke"]["digits"]  # pixel space, DC/DSA recipe alone
    with pytest.raises(ValueError, match="IDC recipe"):
        dataclasses.replace(smoke, exact_small=(2.0,))
    with pytest.raises(ValueError, match="autoencoder"):
        dataclasses.replace(smoke, exact_roundtrip=(2.0,))
    latent = dataclasses.replace(smoke, base={**smoke.base, "model.vae": "small-f4"},
                                 exact_roundtrip=(2.0,), protocols=("dc", "small"),
                                 exact_small=(4.0,))
    assert (latent.exact_roundtrip, latent.exact_small) == ((2.0,), (4.0,))


def test_a_candidates_study_leaves_the_exact_generator_to_the_study(study_dir):
    # The exact generator draws real images: a candidate's study of the methods (--generators
    # with --methods) would only repeat the study's cells.
    study = Study("digits", "smoke", study_dir)
    study.scale = dataclasses.replace(study.scale, protocols=("dc", "small"), exact_small=(2.0,),
                                      base={**study.scale.base, "model.vae": "small-f4"},
                                      exact_roundtrip=(2.0,))
    assert list(study.exact_points())
    sub = study.generator_study(next(iter(study.scale.generators)))
    assert list(sub.exact_points()) == []


def test_a_candidate_generator_is_measured_in_a_study_of_its_own(study_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "study"
    shutil.copytree(study_dir, out)
    scale = SCALES["smoke"]["digits"]
    name, over = next(iter(scale.generators.items()))
    args = ["--dataset", "digits", "--scale", "smoke", "--out", str(out)]
    assert main([*args, "--generators", name]) == 0
    sub = out / "generators" / name / "work"
    cfg = json.loads((sub / "base" / "config.json").read_text())
    assert cfg["pretrain"]["steps"] == int(over["pretrain.steps"])
    own = json.loads((out / "work" / "base" / "summary.json").read_text())["config_digest"]
    assert json.loads((sub / "base" / "summary.json").read_text())["config_digest"] != own
    assert not (sub / "full").exists()  # the study's full-data classifier, not one of its own
    # sampled at the study's chosen setting, and only at it
    chosen = json.loads((out / "work" / "sampling.json").read_text())["chosen"]
    sw = json.loads((sub / "sampling.json").read_text())
    assert sw["chosen"] == chosen and len(sw["points"]) == 1
    dit_cfg = json.loads((sub / "dit-r0" / "config.json").read_text())
    assert dit_cfg["model"]["dit"] == str(sub / "base" / "pretrained")
    assert dit_cfg["sample"]["guidance_scale"] == float(chosen["sample.guidance_scale"])
    res = json.loads((out / "results.json").read_text())
    rows = {g["name"]: g for g in res["generators"]}
    cell = json.loads((sub / "evals" / "dit-r0-ipc10-dc.json").read_text())
    assert cell["ipc"] == 10 and rows[name]["accuracy"] == cell["acc_best"]
    assert rows[name]["val"]["fd"] == sw["points"][0]["fd"]
    assert rows[name]["settings"]["steps"] == int(over["pretrain.steps"])
    ours = rows["this study's"]
    assert ours["accuracy"] == _cell(out, "dit-r0-ipc10-dc")["acc_best"]
    assert ours["settings"]["steps"] == int(scale.base["pretrain.steps"])
    assert ours["parameters"] == rows[name]["parameters"] > 0  # the same architecture
    # the training time is the log's: within the stage's own timing, the checkpoints aside
    logged = logged_seconds(sub / "base" / "metrics.jsonl", "pretrain",
                            cfg["pretrain"]["batch_size"])
    stage = json.loads((sub / "base" / "summary.json").read_text())["timings_s"]["pretrain"]
    assert rows[name]["pretrain_s"] == logged and 0 < logged <= stage
    md = (out / "results.md").read_text()
    assert "Candidate generators" in md and f"| {name} |" in md
    assert (out / "grids" / f"generator-{name}.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun computes nothing again
    before = {p: p.stat().st_mtime_ns for p in sub.rglob("*.json")}
    assert main([*args, "--generators", "all"]) == 0
    assert {p: p.stat().st_mtime_ns for p in sub.rglob("*.json")} == before
    # A candidate's quality cell from before the facing measure gains it from the set on disk,
    # with the candidate's weights gone (trained elsewhere) and its other values kept.
    qpath = sub / "quality" / "dit-r0-ipc10.json"
    cell = json.loads(qpath.read_text())
    assert 0 <= cell["facing"]["mean"] <= 1
    qpath.write_text(json.dumps({k: v for k, v in cell.items() if k != "facing"}))
    shutil.rmtree(sub / "base" / "pretrained")
    assert main([*args, "--generators", name]) == 0
    assert json.loads(qpath.read_text()) == cell
    capsys.readouterr()
    assert main([*args, "--generators", f"{name},nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and f"candidates are {name}" in err


def test_a_stages_logged_time_counts_each_step_once_across_resumes(tmp_path):
    """A stage's log after a resume holds each window once (the resume drops the lines after
    its checkpoint), whichever invocation ran it: the time is every window's images over its
    rate, the other stages' lines apart."""
    lines = [{"stage": "vae", "step": 50, "images_per_s": 1.0},
             {"stage": "pretrain", "step": 50, "images_per_s": 100.0},
             {"stage": "pretrain", "step": 100, "images_per_s": 200.0},
             {"stage": "pretrain", "step": 150, "images_per_s": 50.0},
             {"stage": "pretrain", "step": 200, "images_per_s": 100.0},
             {"stage": "finetune", "step": 50, "images_per_s": 1.0}]
    path = tmp_path / "metrics.jsonl"
    # and the last line cut short by a kill, which the log's reader skips
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "pretrain", "st')
    batch = 4
    want = 50 * batch / 100 + 50 * batch / 200 + 50 * batch / 50 + 50 * batch / 100
    assert logged_seconds(path, "pretrain", batch) == pytest.approx(want)
    assert logged_seconds(path, "select", batch) is None
    assert logged_seconds(tmp_path / "none.jsonl", "pretrain", batch) is None


def test_a_latent_candidate_trains_its_autoencoder_and_measures_its_round_trip(study_dir,
                                                                              tmp_path):
    import shutil

    from ddfast.autoencoder import reconstruct
    from ddfast.data import open_source
    from ddfast.eval.protocol import load_source_set
    from ddfast.models import load_dit, load_vae

    out = tmp_path / "study"
    shutil.copytree(study_dir, out)
    name = "latent"
    args = ["--dataset", "digits", "--scale", "smoke", "--out", str(out)]
    assert main([*args, "--generators", name]) == 0
    sub = out / "generators" / name / "work"
    summary = json.loads((sub / "base" / "summary.json").read_text())
    assert summary["vae"]["latent_shape"] == [4, 2, 2]
    # every run of the candidate's study decodes with the autoencoder trained with its DiT
    vae = load_vae(sub / "base" / "vae")
    assert not (sub / "dit-r0" / "vae").exists()
    trip = json.loads((sub / "evals" / "roundtrip-r0-ipc10-dc.json").read_text())
    q = SCALES["smoke"]["digits"].val_per_class
    trip_val = json.loads((sub / "sampling" / f"roundtrip-ipc{q}.json").read_text())
    real_val = json.loads((sub / "sampling" / f"random-ipc{q}.json").read_text())
    assert trip_val["per_class"] == real_val["per_class"] == q
    # the round trip is of the random-real images: recomputed here, it is not those images
    x, _, _ = load_source_set(open_source("digits", "train"), 10)
    assert not torch.equal(reconstruct(vae, x), x)
    res = json.loads((out / "results.json").read_text())
    row = {g["name"]: g for g in res["generators"]}[name]
    assert row["roundtrip"]["accuracy"] == trip["acc_best"]
    assert row["roundtrip"]["val"]["fd"] == trip_val["fd"]
    assert row["roundtrip"]["real_val"]["fd"] == real_val["fd"]
    assert row["settings"]["latents"] == "small-f4 latents (4x2x2)"
    dit = load_dit(str(sub / "base" / "pretrained"))
    assert row["parameters"] == sum(t.numel() for t in dit.parameters())
    md = (out / "results.md").read_text()
    assert f"{name}'s autoencoder alone" in md and f"scores {trip['acc_best']:.1f}" in md
    # the edges' cells: the round trip sharpened to the real set's edge strength, the real set
    # blurred to the round trip's, each the strength it was moved to
    from ddfast.eval.edges import blur_to, edge_strength, sharpen_to

    edges = json.loads((sub / "sampling" / "roundtrip-edges.json").read_text())
    back = reconstruct(vae, x)
    assert edges["real"] == edge_strength(x) and edges["roundtrip"] == edge_strength(back)
    assert sharpen_to(back, edges["real"])[1] == edges["unsharp_amount"]
    assert blur_to(x, edges["roundtrip"])[1] == edges["blur_sigma"]
    sharp = json.loads((sub / "evals" / "roundtrip-sharp-r0-ipc10-dc.json").read_text())
    soft = json.loads((sub / "evals" / "random-blur-r0-ipc10-dc.json").read_text())
    assert row["roundtrip"]["sharp_accuracy"] == sharp["acc_best"]
    assert row["roundtrip"]["blur_accuracy"] == soft["acc_best"]
    assert f"scores {sharp['acc_best']:.1f}; the real images blurred" in md
    # a rerun computes nothing again
    before = {p: p.stat().st_mtime_ns for p in sub.rglob("*.json")}
    assert main([*args, "--generators", name]) == 0
    assert {p: p.stat().st_mtime_ns for p in sub.rglob("*.json")} == before
    # As in a clean checkout (no weights), a missing cell is computed without training the
    # generator or its autoencoder again: the round trip is measured, so it needs neither.
    shutil.rmtree(sub / "base" / "vae")
    shutil.rmtree(sub / "base" / "pretrained")
    probe = next(sub.glob("evals/dit-g*-r0-ipc10-dc.json"))
    probe.unlink()
    assert main([*args, "--generators", name]) == 0
    assert probe.is_file()
    assert not (sub / "base" / "vae").exists() and not (sub / "base" / "pretrained").exists()
    assert json.loads((sub / "evals" / "roundtrip-r0-ipc10-dc.json").read_text()) == trip
    # the edges' cells need the autoencoder's weights: without them, they are not computed
    (sub / "evals" / "random-blur-r0-ipc10-dc.json").unlink()
    assert main([*args, "--generators", name]) == 0
    assert not (sub / "evals" / "random-blur-r0-ipc10-dc.json").exists()
    assert not (sub / "base" / "vae").exists()
    # A run stopped after its autoencoder (no summary yet): the table reads the autoencoder's
    # own report.
    (sub / "base" / "summary.json").unlink()
    assert main([*args, "--report"]) == 0
    row = {g["name"]: g for g in json.loads((out / "results.json").read_text())["generators"]}
    assert row[name]["roundtrip"]["vae"] == summary["vae"]
    assert row[name]["roundtrip"]["vae"] == json.loads((sub / "base" / "vae.json").read_text())


def test_probes_draw_each_generator_at_other_settings_and_need_no_weights_once_drawn(
        study_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "study"
    shutil.copytree(study_dir, out)
    scale = SCALES["smoke"]["digits"]
    name = next(iter(scale.generators))
    (tag, over), = scale.generator_probes
    args = ["--dataset", "digits", "--scale", "smoke", "--out", str(out)]
    assert main([*args, "--probes", "--generators", name]) == 0
    rows = {g["name"]: g for g in json.loads((out / "results.json").read_text())["generators"]}
    for row, work in ((rows["this study's"], out / "work"),
                      (rows[name], out / "generators" / name / "work")):
        cell = json.loads((work / "evals" / f"dit{tag}-r0-ipc10-dc.json").read_text())
        assert row["probes"] == {tag: cell["acc_best"]}
        cfg = json.loads((work / f"dit{tag}-r0" / "config.json").read_text())
        assert cfg["sample"]["guidance_scale"] == float(over["sample.guidance_scale"])
        assert cfg["sample"]["guidance_interval"] == [0, 500]
        assert cfg["model"]["dit"] == str(work / "base" / "pretrained")
    md = (out / "results.md").read_text()
    assert "at g4, interval 0-500 |" in md and "never chosen from" in md
    assert json.loads((out / "results.json").read_text())["probes"] == []  # dit's alone: above
    # A fine-tuned method at the probe: its run fine-tunes as its cell's does, samples there.
    assert main(["--dataset", "digits", "--scale", "smoke", "--out", str(out), "--probes",
                 "--methods", "ours-step"]) == 0
    cfg = json.loads((out / "work" / f"ours-step{tag}-r0" / "config.json").read_text())
    own = json.loads((out / "work" / "ours-step-r0" / "config.json").read_text())
    assert cfg["optim"] == own["optim"] and cfg["memory"] == own["memory"]
    assert cfg["sample"]["guidance_interval"] == [0, 500]
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["probes"]}
    cell = json.loads((out / "work" / "evals" / f"ours-step{tag}-r0-ipc10-dc.json").read_text())
    assert rows["ours-step"]["probes"] == {tag: cell["acc_best"]}
    assert rows["ours-step"]["chosen"] == _cell(out, "ours-step-r0-ipc10-dc")["acc_best"]
    assert rows["minimax"]["probes"] == {tag: None}
    assert "The methods at the probe settings" in (out / "results.md").read_text()
    # The candidate trained elsewhere: its weights are not here, its sets are. Its cells are
    # computed from the sets, and nothing is trained.
    sub = out / "generators" / name / "work"
    shutil.rmtree(sub / "base" / "pretrained")
    shutil.rmtree(sub / "base" / "ckpt", ignore_errors=True)
    cells = {k: json.loads((sub / "evals" / f"{k}.json").read_text())
             for k in ("dit-r0-ipc10-dc", f"dit{tag}-r0-ipc10-dc")}
    for k in cells:
        (sub / "evals" / f"{k}.json").unlink()
    capsys.readouterr()
    assert main([*args, "--generators", name]) == 0
    log = capsys.readouterr().out
    assert "[study] run" not in log and "[study] evaluate dit-r0-ipc10-dc" in log
    assert not (sub / "base" / "pretrained").exists()
    for k, before in cells.items():
        again = json.loads((sub / "evals" / f"{k}.json").read_text())
        # the same set, seed and machine: the same classifier (less its timing)
        assert {**again, "seconds": 0} == {**before, "seconds": 0}


def test_a_candidates_own_study_runs_on_one_machine_and_is_evaluated_on_another(
        study_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "study"
    shutil.copytree(study_dir, out)
    name = next(iter(SCALES["smoke"]["digits"].generators))
    args = ["--dataset", "digits", "--scale", "smoke", "--out", str(out), "--generators", name,
            "--methods", "dit,ours-step", "--ipc", "10"]
    # The GPU's part: every run of the candidate's cells, no evaluation.
    assert main([*args, "--runs-only"]) == 0
    sub = out / "generators" / name / "work"
    for run in ("dit-r0", "ours-step-r0", "ours-step-lambda_g0-r0"):
        assert (sub / run / "distilled" / "manifest.json").is_file(), run
    assert not list(sub.glob("evals/ours-step*"))
    assert not (sub / "quality" / "ours-step-r0-ipc10.json").exists()
    # What comes back holds no weights: the sets are evaluated here from the finished runs.
    shutil.rmtree(sub / "base" / "pretrained")
    for model in sub.glob("*/model"):
        shutil.rmtree(model)
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "[study] run" not in log and "[study] evaluate ours-step-r0-ipc10-dc" in log
    cell = json.loads((sub / "evals" / "ours-step-r0-ipc10-dc.json").read_text())
    assert cell["ipc"] == 10
    res = json.loads((out / "generators" / name / "results.json").read_text())
    row = next(r for r in res["rows"] if (r["method"], r["ipc"], r["protocol"])
               == ("ours-step", 10, "dc"))
    assert row["accuracy"]["mean"] == cell["acc_best"]
    assert (out / "generators" / name / "results.md").is_file()


def test_sampling_chosen_by_held_out_accuracy_over_a_grid_with_an_interval(study_dir, tmp_path):
    import shutil
    from dataclasses import replace

    from ddfast.study_report import write_report

    out = tmp_path / "study"
    for part in ("base", "full"):  # the generator and the classifier; no sampling choice yet
        shutil.copytree(study_dir / "work" / part, out / "work" / part)
    study = Study("digits", "smoke", out)
    grid = (*study.scale.sampling_grid, (4.0, "ddim", 5, "0,500"))
    study.scale = replace(study.scale, sampling_grid=grid, sampling_criterion="accuracy",
                          val_per_class=10)
    chosen = study.sampling()
    rec = json.loads((out / "work" / "sampling.json").read_text())
    assert rec["criterion"].startswith("highest accuracy") and len(rec["points"]) == 3
    for p in rec["points"]:  # each scored by its own cell on the held-out images
        tag = f"-g{p['guidance_scale']:g}-{p['sampler']}{p['steps']}" + (
            "-interval0-500" if p.get("interval") else "")
        cell = json.loads((out / "work" / "sampling" / f"val{tag}-dc.json").read_text())
        assert cell["against"] == "val" and cell["ipc"] == 10
        assert p["val_accuracy"] == cell["acc_best"]
    best = max(rec["points"], key=lambda p: (p["val_accuracy"], -p["fd"]))
    assert chosen == best["settings"] == rec["chosen"]
    inter = next(p for p in rec["points"] if p.get("interval"))
    cfg = json.loads((out / "work" / "sampling-g4-ddim5-interval0-500" / "config.json")
                     .read_text())
    assert cfg["sample"]["guidance_interval"] == [0, 500]
    assert inter["settings"]["sample.guidance_interval"] == "0,500"
    # The first ten samples per class of a setting are its IPC-10 set (same image seeds).
    point = study.sampling_point()
    assert point[:3] == (best["guidance_scale"], best["sampler"], best["steps"])
    assert (len(point) == 4) == bool(best.get("interval"))
    write_report(study)
    md = (out / "results.md").read_text()
    assert "| interval |" in md and "held-out accuracy |" in md and "| 0-500 |" in md
    # A criterion the study does not know is refused, naming the known ones.
    study.scale = replace(study.scale, sampling_criterion="loss")
    study._sampling = None
    with pytest.raises(ConfigError, match="fd, accuracy"):
        study.sampling()
