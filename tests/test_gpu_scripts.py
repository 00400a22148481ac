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
        key = "generators/longer/work/evals/dit-r0-ipc10-dc.json"
        cell = next(n for n in names if n.endswith(key))
        packed = json.loads(tar.extractfile(cell).read())
    assert packed == json.loads((study / key).read_text())
    assert not [n for n in names if n.endswith((".safetensors", ".pt"))]
    assert any(n.endswith("generators/longer/work/base/metrics.jsonl") for n in names)
    for work in (study / "work", study / "generators" / "longer" / "work"):  # both at the probe
        cell = json.loads((work / "evals" / f"dit{probe}-r0-ipc10-dc.json").read_text())
        cfg = json.loads((work / f"dit{probe}-r0" / "config.json").read_text())
        assert cell["ipc"] == 10 and cfg["sample"]["guidance_interval"] == [0, 500]

    # Side by side, once the cells exist: each step's log joins the main one, steps.json holds
    # both, and nothing is computed again.
    again = tmp_path / "again"
    done = subprocess.run(["bash", script, str(again)], env={**env, "DDFAST_GEN_PARALLEL": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((again / "steps.json").read_text())
    assert sorted(s["step"] for s in steps) == ["longer", "probes"]
    log = (again / "generators.log").read_text()
    assert "----- probes" in log and "----- longer" in log and "[study] run" not in log
    assert sorted(p.name for p in again.iterdir()) == ["generators.log", "generators.tar",
                                                        "steps.json"]


def test_compile_is_not_a_setting_of_the_results(tmp_path):
    plain = Study("digits", "smoke", tmp_path / "a")
    compiled = Study("digits", "smoke", tmp_path / "a", compile=True)
    assert compiled.base["run.compile"] == "true" and "run.compile" not in plain.base
    a = plain.config("base", {"objective.method": "dit"})
    b = compiled.config("base", {"objective.method": "dit"})
    assert b.run.compile and not a.run.compile and a.digest() == b.digest()
