"""The evaluation protocol: subset rule, loading, schedule, bookkeeping, seeds and the CLI.

Real digits data and the real networks/augmentation; runs are a few epochs of ConvNet-3 at 8 px.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddfast.data import open_source
from ddfast.errors import ConfigError, DataError
from ddfast.eval import (
    check_classes,
    epochs_for_ipc,
    evaluate,
    load_folder_set,
    load_source_set,
    mean_std,
    merge_tables,
    summarize_curve,
    write_results,
)
from ddfast.eval import protocol as protocol_mod
from ddfast.eval.__main__ import main


@pytest.fixture(scope="module")
def digits():
    """IPC-3 random-real train set and the first 60 test images (kept small: 2 CPU cores)."""
    train, test = open_source("digits", "train"), open_source("digits", "test")
    x, y, names = load_source_set(train, 3)
    idx = torch.arange(60)
    return x, y, test.images(idx), test.labels[idx], names


def _png(path, value, size=(6, 6), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, fill).save(path)


def test_epochs_for_ipc_table():
    table = {1: 3000, 2: 2000, 10: 2000, 11: 1500, 50: 1500, 51: 1000, 200: 1000, 201: 500,
             500: 500, 501: 300, 1300: 300}
    assert {ipc: epochs_for_ipc(ipc) for ipc in table} == table
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="IPC"):
            epochs_for_ipc(bad)


def test_first_ipc_files_in_sorted_filename_order(tmp_path):
    # Files created out of name order; the pixel value says which file was read.
    names = {"b.png": 20, "10.png": 10, "c.png": 30, "a.png": 15}
    for cls in ("cat", "dog"):
        for fname, value in names.items():
            _png(tmp_path / cls / fname, value + (100 if cls == "dog" else 0))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    x, y, classes = load_folder_set(tmp_path, ipc=2)
    assert classes == ["cat", "dog"]
    assert x.shape == (4, 1, 6, 6) and x.dtype == torch.uint8
    # sorted: 10.png, a.png, b.png, c.png -> the first two are 10 and 15
    assert x[:, 0, 0, 0].tolist() == [10, 15, 110, 115]
    assert y.tolist() == [0, 0, 1, 1]
    x_all, _, _ = load_folder_set(tmp_path)
    assert x_all[:4, 0, 0, 0].tolist() == [10, 15, 20, 30]
    with pytest.raises(DataError, match="fewer than IPC 5"):
        load_folder_set(tmp_path, ipc=5)


def test_source_subset_is_first_ipc_items_per_class():
    src = open_source("digits", "train")
    x, y, _ = load_source_set(src, 3)
    for c in range(10):
        first = torch.nonzero(src.labels == c).flatten()[:3]
        assert torch.equal(x[y == c], src.images(first))


def test_manifest_maps_sanitised_folders_to_class_names(tmp_path):
    # Manifest order differs from sorted folder order, and folders are sanitised names.
    classes = [{"index": 0, "name": "T-shirt/top", "cond_label": 0, "folder": "T-shirt_top"},
               {"index": 1, "name": "Ankle boot", "cond_label": 1, "folder": "Ankle_boot"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": classes}))
    _png(tmp_path / "T-shirt_top" / "00000.png", 7, mode="RGB")
    _png(tmp_path / "Ankle_boot" / "00000.png", 9, mode="RGB")
    x, y, names = load_folder_set(tmp_path, ipc=1)
    assert names == ["T-shirt/top", "Ankle boot"]
    assert x.shape == (2, 3, 6, 6) and x[:, 0, 0, 0].tolist() == [7, 9] and y.tolist() == [0, 1]
    # Forced grayscale for a grayscale test set.
    assert load_folder_set(tmp_path, ipc=1, channels=1)[0].shape == (2, 1, 6, 6)


def test_class_mismatch_is_an_error_listing_both(tmp_path, capsys):
    with pytest.raises(DataError, match=r"\['a', 'b'\].*\['a', 'c'\]"):
        check_classes(["a", "b"], ["a", "c"])
    check_classes(["a", "b"], ["a", "b"])
    for cls in ("cat", "dog"):
        _png(tmp_path / "set" / cls / "0.png", 1)
    rc = main(["--train", str(tmp_path / "set"), "--source", "digits", "--epochs", "1",
               "--repeats", "1", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "cat" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mixed_sizes_are_an_error(tmp_path):
    _png(tmp_path / "a" / "0.png", 1, size=(6, 6))
    _png(tmp_path / "a" / "1.png", 1, size=(8, 8))
    with pytest.raises(DataError, match="differ in size"):
        load_folder_set(tmp_path)


def test_lr_milestones_on_the_optimizer(digits, monkeypatch):
    x, y, tx, ty, _ = digits
    monkeypatch.setattr(protocol_mod, "_accuracy", lambda *a: 0.0)  # testing is not the point
    res = evaluate(x, y, tx, ty, networks=["convnet3"], repeats=1, epochs=12,
                   protocol="small", device="cpu", seed=0, batch_size=64)
    lrs = res["networks"]["convnet3"]["runs"][0]["lrs"]
    # milestones 2*12//3 = 8 and 5*12//6 = 10: lr x0.2 from epoch 8 (0-based), again from 10
    expected = [0.01] * 8 + [0.002] * 2 + [0.0004] * 2
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert len(res["networks"]["convnet3"]["runs"][0]["curve"]) == 1  # IDC small: at the end


def test_best_and_last_follow_the_recorded_curve(digits, monkeypatch):
    x, y, tx, ty, _ = digits
    scripted = iter([20.0, 60.0, 40.0, 30.0])  # up, then down
    monkeypatch.setattr(protocol_mod, "_accuracy", lambda *a: next(scripted))
    # imagenet-subset's cadence (every epochs // 100) on the small recipe's 8 px images
    every_epoch = dataclasses.replace(protocol_mod.get_protocol("small"), test_every_percent=True)
    monkeypatch.setitem(protocol_mod.PROTOCOL_PRESETS, "small", every_epoch)
    res = evaluate(x, y, tx, ty, networks=["convnet3"], repeats=1,
                   epochs=4, protocol="small", device="cpu", seed=0)
    run = res["networks"]["convnet3"]["runs"][0]
    assert [p["acc"] for p in run["curve"]] == [20.0, 60.0, 40.0, 30.0]
    assert (run["best"], run["best_epoch"], run["last"]) == (60.0, 2, 30.0)
    net = res["networks"]["convnet3"]
    assert net["best_mean"] == 60.0 and net["last_mean"] == 30.0
    curve = [{"epoch": e, "acc": a} for e, a in [(3, 10.0), (6, 70.0), (9, 70.0), (10, 5.0)]]
    assert summarize_curve(curve) == {"best": 70.0, "best_epoch": 6, "last": 5.0}


def test_mean_std_over_repeats(digits):
    mean, std = mean_std([50.0, 60.0, 70.0])
    assert mean == pytest.approx(60.0) and std == pytest.approx(np.sqrt(200 / 3))  # population
    x, y, tx, ty, _ = digits
    res = evaluate(x, y, tx, ty, networks=["convnet3"], repeats=3, epochs=2, protocol="small",
                   device="cpu", seed=1)
    net = res["networks"]["convnet3"]
    bests = [r["best"] for r in net["runs"]]
    lasts = [r["last"] for r in net["runs"]]
    assert net["best_mean"] == pytest.approx(np.mean(bests))
    assert net["best_std"] == pytest.approx(np.std(bests))
    assert net["last_mean"] == pytest.approx(np.mean(lasts))
    assert net["last_std"] == pytest.approx(np.std(lasts))
    # distinct seeds per repeat give distinct runs
    seeds = [r["seed"] for r in net["runs"]]
    assert len(set(seeds)) == 3
    losses = [tuple(p["train_loss"] for p in r["curve"]) for r in net["runs"]]
    assert len(set(losses)) == 3


def test_same_seed_same_result(digits):
    x, y, tx, ty, _ = digits
    kw = dict(networks=["convnet3"], repeats=1, epochs=2, protocol="small", device="cpu")
    a = evaluate(x, y, tx, ty, seed=5, **kw)["networks"]["convnet3"]["runs"][0]
    b = evaluate(x, y, tx, ty, seed=5, **kw)["networks"]["convnet3"]["runs"][0]
    c = evaluate(x, y, tx, ty, seed=6, **kw)["networks"]["convnet3"]["runs"][0]
    assert a["curve"] == b["curve"] and a["seed"] == b["seed"]
    assert c["seed"] != a["seed"] and c["curve"] != a["curve"]


def test_bad_arguments_raise_config_errors(digits):
    x, y, tx, ty, _ = digits
    kw = dict(networks=["convnet3"], repeats=1, epochs=1, device="cpu", seed=0)
    with pytest.raises(ConfigError, match="protocol"):
        evaluate(x, y, tx, ty, protocol="tiny", **kw)
    with pytest.raises(ConfigError, match="repeats"):
        evaluate(x, y, tx, ty, protocol="small", **{**kw, "repeats": 0})
    with pytest.raises(DataError, match="channels"):
        evaluate(x, y, tx.repeat(1, 3, 1, 1), ty, protocol="small", **kw)


def test_merge_tables_rows_and_columns():
    def rec(method, ipc, nets):
        return {"method": method, "ipc": ipc,
                "networks": {n: {"best_mean": 50.0 + i, "best_std": 1.0, "last_mean": 40.0,
                                 "last_std": 0.5} for i, n in enumerate(nets)}}
    table = merge_tables([rec("ours", 10, ["convnet6", "resnet18"]), rec("random", 50,
                                                                         ["resnet18"])])
    lines = table.splitlines()
    assert lines[0] == "| Method | IPC | convnet6 | resnet18 |"
    assert lines[2] == "| ours | 10 | 50.00 ± 1.00 (40.00 ± 0.50) | 51.00 ± 1.00 (40.00 ± 0.50) |"
    assert lines[3] == "| random | 50 | - | 50.00 ± 1.00 (40.00 ± 0.50) |"


def test_write_results(tmp_path):
    res = {"networks": {"convnet3": {"best_mean": 1.0, "best_std": 0.0, "last_mean": 1.0,
                                     "last_std": 0.0, "runs": []}}}
    record = write_results(tmp_path, res, method="ours", ipc=1)
    assert json.loads((tmp_path / "results.json").read_text()) == record
    assert "| ours | 1 |" in (tmp_path / "results.md").read_text()


def test_cli_random_real_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["--source", "digits", "--ipc", "10", "--epochs", "2", "--repeats", "1",
               "--out", str(out), "--method", "random", "--device", "cpu"])
    assert rc == 0
    record = json.loads((out / "results.json").read_text())
    assert (record["method"], record["ipc"], record["epochs"]) == ("random", 10, 2)
    assert record["num_train"] == 100 and record["num_test"] == 355
    run = record["networks"]["convnet3"]["runs"][0]
    assert [p["epoch"] for p in run["curve"]] == [2]  # IDC's small recipe tests at the end
    assert 0.0 <= run["best"] <= 100.0 and record["dsa_mode"] == "idc"
    md = (out / "results.md").read_text()
    assert "| random | 10 |" in md
    printed = capsys.readouterr().out
    assert "| random | 10 |" in printed and str(out / "results.md") in printed


def test_cli_distilled_tree_against_a_test_tree_at_two_ipcs(tmp_path, capsys):
    # A distilled-style tree (manifest, sanitised folders) and a class-per-folder test tree.
    train, test = open_source("digits", "train"), open_source("digits", "test")
    classes = []
    for c, name in enumerate(train.class_names):
        folder = f"digit_{name}"
        classes.append({"index": c, "name": name, "cond_label": c, "folder": folder})
        for i, k in enumerate(torch.nonzero(train.labels == c).flatten()[:2].tolist()):
            Image.fromarray(train.images([k])[0, 0].numpy()).save(
                _mkdir(tmp_path / "set" / folder) / f"{i:05d}.png")
        for i, k in enumerate(torch.nonzero(test.labels == c).flatten()[:3].tolist()):
            Image.fromarray(test.images([k])[0, 0].numpy()).save(
                _mkdir(tmp_path / "test" / name) / f"{i}.png")
    (tmp_path / "set" / "manifest.json").write_text(json.dumps({"classes": classes}))
    out = tmp_path / "eval"
    rc = main(["--train", str(tmp_path / "set"), "--test", str(tmp_path / "test"), "--ipc",
               "1,2", "--epochs", "1", "--repeats", "1", "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    for ipc in (1, 2):
        record = json.loads((out / f"ipc{ipc}" / "results.json").read_text())
        assert (record["method"], record["ipc"], record["num_train"]) == ("ours", ipc, 10 * ipc)
        assert record["num_test"] == 30 and record["resolution"] == 8
    lines = (out / "results.md").read_text().splitlines()
    assert lines[2].startswith("| ours | 1 |") and lines[3].startswith("| ours | 2 |")


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_dc_protocol_recipe(digits, monkeypatch):
    """DC/DSA's evaluate_synset: batch 256; for Epoch = 5 it runs range(6) passes, and after
    pass index Epoch // 2 + 1 = 3 builds a new SGD at lr x0.1 (momentum restarts); no CutMix,
    DSA augmentation, float32, tested once at the end."""
    x, y, tx, ty, _ = digits
    calls = []
    monkeypatch.setattr(protocol_mod, "_accuracy", lambda *a: calls.append(1) or 42.0)
    used_cutmix = []
    import ddfast.eval.augment as augment_mod

    real_cutmix = augment_mod.cutmix
    monkeypatch.setattr(augment_mod, "cutmix",
                        lambda *a, **k: used_cutmix.append(1) or real_cutmix(*a, **k))
    optimisers = []
    real_sgd = torch.optim.SGD

    def counted_sgd(*a, **k):
        optimisers.append(k)
        return real_sgd(*a, **k)

    monkeypatch.setattr(torch.optim, "SGD", counted_sgd)
    res = evaluate(x, y, tx, ty, networks=["convnet3"], repeats=1, epochs=6, protocol="dc",
                   device="cpu", seed=0, dataset="digits")
    run = res["networks"]["convnet3"]["runs"][0]
    assert run["lrs"] == pytest.approx([0.01] * 4 + [0.001] * 2, rel=1e-9)
    assert [o["lr"] for o in optimisers] == pytest.approx([0.01, 0.001])  # a new SGD
    assert all(o["momentum"] == 0.9 and o["weight_decay"] == 5e-4 for o in optimisers)
    assert [p["epoch"] for p in run["curve"]] == [6] and len(calls) == 1
    assert run["best"] == run["last"] == 42.0
    assert res["batch_size"] == 256 and res["augment"] == "dsa" and res["flip"] is False
    assert res["dsa_mode"] == "S" and res["dataset"] == "digits"
    assert not used_cutmix
    dc = protocol_mod.get_protocol("dc")
    assert dc.epochs == 1001 and not dc.bf16  # DC's range(1000 + 1), in float32
    assert protocol_mod.milestones_for(dc, 1001) == [502]


def test_dc_protocol_defaults_to_1001_passes_and_flip_is_settable(digits, monkeypatch):
    x, y, tx, ty, _ = digits
    seen = {}

    def fake_train(*args, epochs, proto, augment, **kw):
        seen["epochs"], seen["proto"] = epochs, proto.name
        return {"best": 1.0, "last": 1.0, "curve": [], "lrs": []}

    monkeypatch.setattr(protocol_mod, "_train_one", fake_train)
    res = evaluate(x, y, tx, ty, networks=["convnet3"], repeats=1, epochs=0, protocol="dc",
                   device="cpu", seed=0, flip=True)
    assert seen == {"epochs": 1001, "proto": "dc"} and res["flip"] is True
    evaluate(x, y, tx, ty, networks=["convnet3"], repeats=1, epochs=0, protocol="small",
             device="cpu", seed=0)
    assert seen["epochs"] == 1000  # IDC's flat 1000 on small sets
    big = torch.zeros(30, 1, 8, 8)  # imagenet-subset keeps the epochs by IPC
    evaluate(big, y, tx, ty, networks=["convnet6"], repeats=1, epochs=0,
             protocol="imagenet-subset", device="cpu", seed=0)
    assert seen["epochs"] == epochs_for_ipc(3)


def test_train_classifier_returns_the_trained_model(digits):
    x, y, tx, ty, _ = digits
    record, model, prep = protocol_mod.train_classifier(x, y, tx, ty, epochs=2, seed=0,
                                                        device="cpu")
    with torch.no_grad():
        acc = 100.0 * (model(prep(tx)).argmax(1) == ty).double().mean().item()
    assert record["last"] == pytest.approx(acc)
    assert len(record["lrs"]) == 2


def test_dataset_statistics_and_flip_rules():
    """Known datasets are normalised with their own statistics (DC's and IDC's Fashion-MNIST
    values; digits' measured on its training split) and flipped by their own rule."""
    from ddfast.data import open_source
    from ddfast.eval.augment import DATASETS, default_flip, norm_stats

    train = open_source("digits", "train")
    x = train.images(range(len(train))).double() / 255.0
    mean, std = norm_stats(1, "digits")
    assert abs(x.mean().item() - mean[0]) < 1e-4 and abs(x.std().item() - std[0]) < 1e-4
    assert norm_stats(1, "fashion-mnist") == ((0.2861,), (0.3530,))
    assert norm_stats(1, None) == ((0.5,), (0.5,))
    assert default_flip(1, "fashion-mnist") and not default_flip(1, "digits")
    assert not default_flip(1, None) and default_flip(3, None)
    assert set(DATASETS) == {"fashion-mnist", "mnist", "digits"}
    unit = torch.full((2, 1, 8, 8), 0.5)
    _, test, _, _, flip = protocol_mod._prepare(unit, unit, protocol_mod.get_protocol("dc"),
                                                torch.device("cpu"), None, "fashion-mnist")
    assert flip is True
    torch.testing.assert_close(test, torch.full_like(unit, (0.5 - 0.2861) / 0.3530))


def test_small_recipe_is_idcs(digits, monkeypatch):
    """IDC on 28-32 px sets: batch 64, 1000 epochs, lr x0.2 at 2/3 and 5/6, its DSA variant,
    CutMix on about half of the batches (a coin per batch), one test at the end."""
    import ddfast.eval.augment as augment_mod

    small = protocol_mod.get_protocol("small")
    assert (small.batch_size, small.epochs, small.gamma, small.cutmix_p) == (64, 1000, 0.2, 0.5)
    assert small.dsa_mode == "idc" and not small.test_every_percent
    x, y, tx, ty, _ = digits
    mixed = []
    real_cutmix = augment_mod.cutmix
    monkeypatch.setattr(augment_mod, "cutmix",
                        lambda *a, **k: mixed.append(1) or real_cutmix(*a, **k))
    monkeypatch.setattr(protocol_mod, "_accuracy", lambda *a: 0.0)
    evaluate(x, y, tx, ty, networks=["convnet3"], repeats=1, epochs=200, protocol="small",
             device="cpu", seed=0, batch_size=64)
    assert 70 < len(mixed) < 130  # 200 batches, a fair coin each
