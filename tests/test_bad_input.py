"""Bad inputs and faults the README's table lists that no other file covers: a NaN loss, a full
disk, a batch that does not split over the processes."""

import errno
import json

import pytest
import torch

import ddfast.io as io_mod
import ddfast.trainer as trainer_mod
from ddfast.checkpoint import load_checkpoint
from ddfast.config import resolve
from ddfast.distributed import Dist
from ddfast.errors import ConfigError, OutputError
from ddfast.io import write_json
from ddfast.train import main, run


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = trainer_mod.train_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real_step(*args, **kwargs)
        return out * float("nan") if calls["n"] == 25 else out

    monkeypatch.setattr(trainer_mod, "train_step", poisoned)
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--out", str(out), "--run.progress", "off",
                 "--run.ckpt_every", "10", "--run.log_every", "10"]) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 30" in err and "checkpoint" in err and "resume" in err
    ck = load_checkpoint(out / "ckpt" / "pretrain.safetensors")
    assert ck["step"] == 20  # the last checkpoint before the bad window, intact
    monkeypatch.undo()
    summary = run(resolve("smoke", {"run.out": str(out), "run.progress": "off",
                                    "run.ckpt_every": 10, "run.log_every": 10}), resume=True)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_full_disk_names_the_fix_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_json(target, {"old": True})

    class FullFile:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_mod, "open", FullFile, raising=False)
    with pytest.raises(OutputError, match="No space left on device.*free disk space"):
        write_json(target, {"new": True})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


def test_batch_that_does_not_split_over_processes():
    assert Dist(1, 3, 1).shard(9) == slice(3, 6)
    with pytest.raises(ConfigError, match="batch size 8 is not divisible by the 3 processes"):
        Dist(0, 3, 0).shard(8)
    x = torch.arange(6)
    assert torch.equal(x[Dist.single().shard(6)], x)


def test_class_names_become_safe_distinct_folders():
    from ddfast.sample import class_specs

    names = ["../../etc", "a/b", "..", "a\\b", "", "ok"]
    folders = [c.folder for c in class_specs(names, list(range(len(names))))]
    assert len(set(folders)) == len(folders)
    for folder in folders:
        assert folder and "/" not in folder and "\\" not in folder and folder not in (".", "..")
        assert not folder.startswith(".")
