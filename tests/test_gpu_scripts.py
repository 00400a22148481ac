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
           "NAMES": "longer", "DDFAST_GEN_COMPILE": "0", "DDFAST_WHEELS": str(tmp_path / "none"),
           "PYTHON": sys.executable, "DDFAST_GPU_BUDGET": "600"}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu-generators.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps] == ["longer"] and steps[0]["exit"] == 0
    with tarfile.open(out / "generators.tar") as tar:
        names = tar.getnames()
        key = "generators/longer/work/evals/dit-r0-ipc10-dc.json"
        cell = next(n for n in names if n.endswith(key))
        packed = json.loads(tar.extractfile(cell).read())
    assert packed == json.loads((study / key).read_text())
    assert not [n for n in names if n.endswith((".safetensors", ".pt"))]
    assert any(n.endswith("generators/longer/work/base/metrics.jsonl") for n in names)


def test_compile_is_not_a_setting_of_the_results(tmp_path):
    plain = Study("digits", "smoke", tmp_path / "a")
    compiled = Study("digits", "smoke", tmp_path / "a", compile=True)
    assert compiled.base["run.compile"] == "true" and "run.compile" not in plain.base
    a = plain.config("base", {"objective.method": "dit"})
    b = compiled.config("base", {"objective.method": "dit"})
    assert b.run.compile and not a.run.compile and a.digest() == b.digest()
