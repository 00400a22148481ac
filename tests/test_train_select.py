"""The training job's selection stage (``--sample.select prototypes`` and ``anchored``), end to end
on real digits: the pool, the cached feature network, the picks, the anchored samples, the table
rows, and resuming."""

import json
from pathlib import Path

import pytest
import torch

from ddfast.config import resolve
from ddfast.data.cache import default_cache_dir
from ddfast.errors import OutputError
from ddfast.eval import load_folder_set
from ddfast.select import (
    feature_epochs,
    feature_network,
    feature_network_name,
    image_features,
    pool_size,
    prototype_pick,
)
from ddfast.train import open_data, run, training_indices

SELECT = {"sample.select": "prototypes", "sample.ipc": "1,2", "sample.pool": "5",
          "sample.feature_epochs": "3"}


def smoke(out: Path, **overrides):
    return resolve("smoke", {"run.out": str(out), "run.progress": "off", **overrides})


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    out = tmp_path_factory.mktemp("select") / "run"
    return out, run(smoke(out, **SELECT))


def test_pool_settings_and_feature_network_choice():
    assert pool_size(0, 10) == 200 and pool_size(30, 10) == 30
    with pytest.raises(ValueError, match="smaller than the largest IPC 10"):
        pool_size(5, 10)
    assert feature_epochs(0, 55_000) == 4 and feature_epochs(0, 1442) == 134
    assert feature_epochs(7, 55_000) == 7
    assert feature_network_name(("resnetap10", "convnet6", "resnet18")) == "convnet6"
    assert feature_network_name(("resnet18",)) == "convnet3"


def test_selected_sets_are_the_prototype_picks_of_the_pool(selected, capsys):
    out, summary = selected
    cfg = smoke(out, **SELECT)
    pool = json.loads((out / "pool" / "manifest.json").read_text())
    distilled = json.loads((out / "distilled" / "manifest.json").read_text())
    assert pool["ipc"] == 5 and len(pool["images"]) == 50
    # the pool is drawn with the distilled set's seeds: its first IPC images are that set's
    first = {(im["class"], im["index"]): im["seed"] for im in pool["images"] if im["index"] < 2}
    assert first == {(im["class"], im["index"]): im["seed"] for im in distilled["images"]}

    # The picks, recomputed from the cached feature network (read back, not trained again).
    source, test = open_data(cfg, "train"), open_data(cfg, "test")
    idx = training_indices(source.labels, cfg.data.max_per_class, cfg.data.holdout)
    capsys.readouterr()
    model, normalise, record = feature_network(
        source, idx, test, network="convnet3", epochs=3, seed=0, device=torch.device("cpu"),
        dataset="digits", cache_dir=default_cache_dir())
    assert "feature network from" in capsys.readouterr().out
    assert summary["selected"]["feature_network"]["test_accuracy"] == record["accuracy"]
    real_f = image_features(model, normalise, source.images(idx.tolist()))
    px, py, _ = load_folder_set(out / "pool", ipc=5)
    pool_f = image_features(model, normalise, px)
    for k in (1, 2):
        folder = out / "selected" / f"ipc{k}"
        manifest = json.loads((folder / "manifest.json").read_text())
        pick = prototype_pick(pool_f, py, real_f, source.labels[idx], k, seed=0)
        assert [pool["images"][p]["file"] for p in pick.tolist()] == \
            [im["pool_file"] for im in manifest["images"]]
        for im in manifest["images"]:  # each image is the pool file's bytes
            assert (folder / im["file"]).read_bytes() == \
                (out / "pool" / im["pool_file"]).read_bytes()
        x, y, _ = load_folder_set(folder, ipc=k)
        assert torch.equal(y, torch.arange(10).repeat_interleave(k))
        assert len(list((out / "grids" / f"selected-ipc{k}").glob("*.png"))) == 10

    # Evaluated beside the paper's sampler and random real images, every IPC.
    table = (out / "eval" / "results.md").read_text()
    for k in (1, 2):
        assert f"| ours | {k} |" in table and f"| random real | {k} |" in table
        assert f"| ours + prototypes (pool 5) | {k} |" in table
        assert f"IPC {k} convnet3: ours + prototypes (pool 5)" in table
        rec = json.loads((out / "eval" / f"selected-ipc{k}" / "results.json").read_text())
        assert rec["num_train"] == 10 * k and rec["method"] == "ours + prototypes (pool 5)"
    report = (out / "report.md").read_text()
    assert "ours + prototypes" in report and "Prototype-selected sets" in report
    for k in (1, 2):  # every grid the report shows is there
        shown = [line.split("](")[1][:-1] for line in report.splitlines()
                 if line.startswith(f"![{k}-")]
        assert len(shown) == 10 and all((out / rel).is_file() for rel in shown)
    assert set(summary["selected"]["sets"]) == {"1", "2"}


def test_a_lost_selected_set_is_made_again_identically(selected, tmp_path):
    import shutil

    reference, _ = selected
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    want = (out / "selected" / "ipc2" / "manifest.json").read_bytes()
    shutil.rmtree(out / "selected" / "ipc2")
    shutil.rmtree(out / "eval" / "selected-ipc2")
    (out / "summary.json").unlink()
    with pytest.raises(OutputError, match="differs in sample.pool"):
        run(smoke(out, **{**SELECT, "sample.pool": "6"}), resume=True)
    run(smoke(out, **SELECT), resume=True)
    assert (out / "selected" / "ipc2" / "manifest.json").read_bytes() == want
    assert (out / "eval" / "selected-ipc2" / "results.json").is_file()


ANCHORED = {"sample.select": "anchored", "sample.ipc": "1,2", "sample.feature_epochs": "3"}


def test_anchored_sets_start_each_sample_from_its_prototypes_mean_item(tmp_path):
    """``--sample.select anchored``: no pool; each IPC's set equals the run's own model sampled
    from the anchors recomputed here (the cached feature network's k-means clusters, each
    answered by the mean of its training images), with the distilled set's seeds."""
    from ddfast.data.cache import to_model_range
    from ddfast.diffusion import Diffusion
    from ddfast.models import load_dit, null_label
    from ddfast.sample import class_specs, write_distilled
    from ddfast.select import ANCHOR_STRENGTH, cluster_anchors

    out = tmp_path / "run"
    summary = run(smoke(out, **ANCHORED))
    cfg = smoke(out, **ANCHORED)
    assert not (out / "pool").exists()
    assert summary["selected"]["rule"] == "anchored" and summary["selected"]["pool"] is None
    assert summary["selected"]["strength"] == ANCHOR_STRENGTH == 0.2
    source, test = open_data(cfg, "train"), open_data(cfg, "test")
    idx = training_indices(source.labels, cfg.data.max_per_class, cfg.data.holdout)
    model, normalise, _ = feature_network(
        source, idx, test, network="convnet3", epochs=3, seed=0, device=torch.device("cpu"),
        dataset="digits", cache_dir=default_cache_dir())
    real_f = image_features(model, normalise, source.images(idx.tolist()))
    real_y = torch.as_tensor(source.labels)[idx]
    dit = load_dit(out / "model")
    classes = class_specs(source.class_names, list(range(10)))
    distilled = json.loads((out / "distilled" / "manifest.json").read_text())
    for k in (1, 2):
        folder = out / "selected" / f"ipc{k}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["anchored"] == {"strength": 0.2} and len(manifest["images"]) == 10 * k
        assert [im["seed"] for im in manifest["images"]] == \
            [im["seed"] for im in distilled["images"] if im["index"] < k]
        anchors = cluster_anchors(
            real_f, real_y,
            lambda c: to_model_range(source.images(idx[real_y == c].tolist())), k, seed=0)
        x, _, _ = load_folder_set(folder, ipc=k)
        ref = tmp_path / f"ref{k}"
        write_distilled(ref, dit, None, Diffusion(), classes, k,
                        latent_shape=tuple(x.shape[1:]), null_label=null_label(dit), scale=1.0,
                        steps=cfg.sample.steps, sampler=cfg.sample.sampler,
                        guidance_scale=cfg.sample.guidance_scale,
                        guidance_channels=cfg.sample.guidance_channels, seed=cfg.sample.seed,
                        batch_size=cfg.sample.batch_size, device=torch.device("cpu"),
                        anchors=anchors, strength=0.2)
        want, _, _ = load_folder_set(ref, ipc=k)
        # The same model, anchors, seeds and batches on one machine: the same bytes.
        assert torch.equal(x, want)
        plain, _, _ = load_folder_set(out / "distilled", ipc=k)
        assert not torch.equal(x, plain)  # not the paper's sampler's set
    table = (out / "eval" / "results.md").read_text()
    for k in (1, 2):
        assert f"| ours + anchored (strength 0.2) | {k} |" in table
        assert f"| random real | {k} |" in table
    assert "Anchored sets" in (out / "report.md").read_text()
