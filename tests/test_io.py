"""Atomic outputs, run folders that are never overwritten silently, checkpoint round trips."""

import json

import pytest
import torch

from ddfast.checkpoint import load_checkpoint, save_checkpoint
from ddfast.errors import OutputError
from ddfast.io import append_jsonl, prepare_run_dir, read_jsonl, write_json


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_json(tmp_path / "a" / "x.json", {"k": 1})
    write_json(tmp_path / "a" / "x.json", {"k": 2})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": 2}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


def test_write_into_unwritable_place_names_the_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="--out"):
        write_json(blocker / "sub" / "x.json", {})
    assert blocker.read_text() == "x"


def test_run_folder_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    cfg = json.dumps({"optim": {"lr": 1}, "run": {"device": "cpu"}})
    assert prepare_run_dir(out, config_json=cfg, resume=False, overwrite=False) is False
    (out / "result.txt").write_text("keep me")
    with pytest.raises(OutputError, match="--resume"):
        prepare_run_dir(out, config_json=cfg, resume=False, overwrite=False)
    assert (out / "result.txt").read_text() == "keep me"
    # a setting that does not change results may differ on resume; one that does may not
    moved = json.dumps({"optim": {"lr": 1}, "run": {"device": "cuda"}})
    assert prepare_run_dir(out, config_json=moved, resume=True, overwrite=False) is True
    changed = json.dumps({"optim": {"lr": 2}, "run": {"device": "cpu"}})
    with pytest.raises(OutputError, match="optim.lr"):
        prepare_run_dir(out, config_json=changed, resume=True, overwrite=False)
    assert prepare_run_dir(out, config_json=changed, resume=False, overwrite=True) is False
    assert not (out / "result.txt").exists()


def test_a_run_written_before_a_setting_existed_resumes_at_its_neutral_value(tmp_path):
    out = tmp_path / "old"
    # no holdout, no refresh, no guidance interval (a tuple setting, written as a JSON list)
    old = {"data": {"source": "digits"}, "memory": {"timing": "epoch"}, "sample": {"steps": 50}}
    prepare_run_dir(out, config_json=json.dumps(old), resume=False, overwrite=False)
    now = {"data": {"source": "digits", "holdout": 0},
           "memory": {"timing": "epoch", "refresh_every": 0},
           "sample": {"steps": 50, "guidance_interval": [], "select": "none", "pool": 0,
                      "feature_epochs": 0, "strength": 0.0}}
    assert prepare_run_dir(out, config_json=json.dumps(now), resume=True, overwrite=False)
    now["memory"]["refresh_every"] = 5  # not what the old run did
    with pytest.raises(OutputError, match="memory.refresh_every"):
        prepare_run_dir(out, config_json=json.dumps(now), resume=True, overwrite=False)


def test_foreign_folder_is_never_deleted(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="holds no ddfast run"):
        prepare_run_dir(out, config_json="{}", resume=False, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_jsonl_ignores_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1}]


def test_checkpoint_round_trip_restores_optimizer_and_generator(tmp_path):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w, b], lr=0.1)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        opt.zero_grad()
        ((torch.randn(2, 5, generator=gen) @ w + b) ** 2).sum().backward()
        opt.step()
    memory = {"real.items": torch.randn(2, 4, 6), "real.policy": "adaptive", "real.capacity": 4}
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, step=3, params={"w": w, "b": b}, ema={"w": w * 0.5},
                    optimizer=opt, generator=gen, memory=memory, extra={"stage": "x"})
    ck = load_checkpoint(path)
    assert ck["step"] == 3 and ck["extra"] == {"stage": "x"}
    assert torch.equal(ck["params"]["w"], w.detach()) and torch.equal(ck["ema"]["w"], w * 0.5)
    assert ck["memory"]["real.policy"] == "adaptive" and ck["memory"]["real.capacity"] == 4
    assert torch.equal(ck["memory"]["real.items"], memory["real.items"])

    # continuing from the checkpoint equals continuing the original
    w2 = torch.nn.Parameter(ck["params"]["w"].clone())
    b2 = torch.nn.Parameter(ck["params"]["b"].clone())
    opt2 = torch.optim.AdamW([w2, b2], lr=0.1)
    from ddfast.checkpoint import optimizer_from_tensors

    optimizer_from_tensors(opt2, *ck["optimizer"])
    gen2 = torch.Generator()
    gen2.set_state(ck["rng"])
    for o, ws, bs, g in ((opt, w, b, gen), (opt2, w2, b2, gen2)):
        o.zero_grad()
        ((torch.randn(2, 5, generator=g) @ ws + bs) ** 2).sum().backward()
        o.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_damaged_checkpoint_names_the_fix(tmp_path):
    path = tmp_path / "ck.safetensors"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(OutputError, match="--overwrite"):
        load_checkpoint(path)


def test_outputs_get_the_mode_plain_files_get(tmp_path):
    """Atomic writes go through a private temporary file; the result must still be as readable
    as a file written with open() under the same umask."""
    import os

    from ddfast.io import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    (tmp_path / "b.txt").write_text("plain")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == \
        (tmp_path / "b.txt").stat().st_mode & 0o777
    assert os.access(tmp_path / "a.json", os.R_OK)
