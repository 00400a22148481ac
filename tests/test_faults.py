"""Real signals against the whole job (subprocesses): SIGTERM stops training at the end of a
step with a checkpoint and a clean exit; SIGKILL at ten points of the job chosen here, each
followed by --resume, still ends with exactly the outputs of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The smoke preset with more pretraining steps, so that there is time to hit training.
ARGS = ["-m", "ddfast.train", "--preset", "smoke", "--run.progress", "off",
        "--pretrain.steps", "120", "--run.ckpt_every", "15", "--out"]
OUTPUTS = ("model/transformer/diffusion_pytorch_model.safetensors", "distilled/manifest.json")


def job(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *ARGS, str(out), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outputs(out: Path) -> dict[str, bytes]:
    files = [out / name for name in OUTPUTS] + sorted((out / "distilled").rglob("*.png"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    proc = job(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return outputs(out)


def test_sigterm_stops_training_with_a_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    proc = job(out)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("[pretrain] step"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert (out / "ckpt" / "pretrain.safetensors").is_file()
    assert not (out / "distilled").exists()  # it stopped in training, not later
    resumed = job(out, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert outputs(out) == reference


# Where the ten kills land: (a line the job prints, seconds to wait after it). The lines come in
# this order across resumes, so the kills walk through every stage: data, pretraining around its
# checkpoints, the end of a stage while its model is written, fine-tuning, sampling, evaluation.
KILL_POINTS = [("ddfast: run folder", 0.0), ("[pretrain] step 10", 0.05),
               ("[pretrain] step 30", 0.0), ("[pretrain] step 60", 0.1),
               ("[pretrain] step 90", 0.2), ("[pretrain] step 120", 0.0),
               ("[finetune] step 10", 0.05), ("[finetune] step 20", 0.0),
               ("[sample] attention", 0.3), ("[eval]", 0.3)]


def test_sigkill_at_ten_points_then_resume_gives_identical_outputs(reference, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    for attempt, (trigger, delay) in enumerate(KILL_POINTS):
        proc = job(out, *(["--resume"] if attempt else []))
        seen = False
        for line in proc.stdout:
            if line.startswith(trigger):
                seen = True
                break
        assert seen, f"the job ended before printing {trigger!r}"
        time.sleep(delay)
        proc.kill()
        proc.communicate(timeout=60)
        # Whatever is on disk under a final name is whole: every PNG decodes.
        for png in (out / "distilled").rglob("*.png"):
            Image.open(png).load()
    final = job(out, "--resume")
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-2000:]
    assert outputs(out) == reference
    assert not list(out.rglob("*.tmp"))
