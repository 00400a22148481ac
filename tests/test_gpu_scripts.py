"""bench/gpu-generators.sh on the CPU at the smoke scale: candidate generators trained and judged,
their cells packed for committing without weights; and the study's --compile leaves results'
settings alone."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ddfast.study import Study

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                    reason="needs bash and tar")
def test_candidate_generators_are_packed_without_weights(tmp_path):
    out, study = tmp_path / "out", tmp_path / "study"
    env = {**os.environ, "DATASET": "digits", "SCALE": "smoke", "STUDY_OUT": str(study),
           "NAMES": "probes,longer", "DDFAST_GEN_COMPILE": "0", "DDFAST_GEN_PARALLEL": "0",
           "DDFAST_WHEELS": str(tmp_path / "none"), "PYTHON": sys.executable,
           "DDFAST_GPU_BUDGET": "600"}
    script = str(REPO / "bench" / "gpu-generators.sh")
    # One after another: both read this study's generator and sampling choice, which the first
    # computes (a committed study holds them, so that on a GPU they run side by side).
    done = subprocess.run(["bash", script, str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["probes", "longer"]
    assert [s["exit"] for s in steps] == [0, 0]
    probe = Study("digits", "smoke", study).scale.generator_probes[0][0]
    with tarfile.open(out / "generators.tar") as tar:
        names = tar.getnames()
    # Runs and their sets, no weights, no evaluations (they run where the sets go back to).
    assert not [n for n in names if n.endswith((".safetensors", ".pt"))]
    assert any(n.endswith("generators/longer/work/base/metrics.jsonl") for n in names)
    for run in ("generators/longer/work/dit-r0", f"generators/longer/work/dit{probe}-r0",
                f"work/dit{probe}-r0"):
        assert any(n.endswith(f"{run}/distilled/manifest.json") for n in names), run
    assert not [n for n in names if "/evals/" in n]
    assert any(n.endswith("generators/longer/work/sampling.json") for n in names)

    # The sets evaluated elsewhere: the tar unpacked into a copy of the study without the
    # candidate's weights, then the same names without --runs-only. Side by side, each step's
    # log joins the main one, steps.json holds both, and nothing is trained or drawn again.
    there = tmp_path / "there"
    shutil.copytree(study, there / "study", ignore=shutil.ignore_patterns("generators"))
    with tarfile.open(out / "generators.tar") as tar:  # paths as the script saw the study's
        tar.extractall(there / "unpacked", filter="data")
    shutil.copytree(there / "unpacked" / str(study).lstrip("/"), there / "study",
                    dirs_exist_ok=True)
    again = tmp_path / "again"
    done = subprocess.run(["bash", script, str(again)],
                          env={**env, "STUDY_OUT": str(there / "study"),
                               "DDFAST_GEN_PARALLEL": "1", "DDFAST_GEN_EVALUATE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((again / "steps.json").read_text())
    assert sorted(s["step"] for s in steps) == ["longer", "probes"]
    log = (again / "generators.log").read_text()
    assert "----- probes" in log and "----- longer" in log
    assert "ddfast: run folder" not in log  # (the copy moved: its runs' paths are rewritten)
    assert not (there / "study" / "generators" / "longer" / "work" / "base" / "pretrained").exists()
    for work in (there / "study" / "work", there / "study" / "generators" / "longer" / "work"):
        cell = json.loads((work / "evals" / f"dit{probe}-r0-ipc10-dc.json").read_text())
        cfg = json.loads((work / f"dit{probe}-r0" / "config.json").read_text())
        assert cell["ipc"] == 10 and cfg["sample"]["guidance_interval"] == [0, 500]
    assert (there / "study" / "generators" / "longer" / "work" / "evals"
            / "dit-r0-ipc10-dc.json").is_file()
    assert sorted(p.name for p in again.iterdir()) == ["generators.log", "generators.tar",
                                                        "steps.json"]


def test_compile_is_not_a_setting_of_the_results(tmp_path):
    plain = Study("digits", "smoke", tmp_path / "a")
    compiled = Study("digits", "smoke", tmp_path / "a", compile=True)
    assert compiled.base["run.compile"] == "true" and "run.compile" not in plain.base
    a = plain.config("base", {"objective.method": "dit"})
    b = compiled.config("base", {"objective.method": "dit"})
    assert b.run.compile and not a.run.compile and a.digest() == b.digest()
