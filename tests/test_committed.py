"""The committed results: each run's recorded settings are the ones its digest names, they name
no machine's folders, and the candidate generators' from-scratch runs are the ones the study
asks for (so that ``--generators`` reads them instead of refusing them)."""

import json
from pathlib import Path

import pytest

from ddfast.config import Config
from ddfast.study import Study

RESULTS = Path(__file__).resolve().parent.parent / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("**/work/*/summary.json")
              if (p.parent / "config.json").is_file())

pytestmark = pytest.mark.skipif(not RUNS, reason="no committed results beside the tests "
                                                 "(an installed copy of the tests)")


def _strings(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _strings(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _strings(value)
    elif isinstance(tree, str):
        yield tree


@pytest.mark.parametrize("folder", RUNS, ids=lambda p: p.relative_to(RESULTS).as_posix())
def test_a_committed_run_is_what_its_digest_names(folder):
    config = json.loads((folder / "config.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert Config.from_dict(config).digest() == summary["config_digest"]
    absolute = [s for s in _strings(config) if s.startswith("/") or s[1:3] == ":\\"]
    assert not absolute, f"{folder}: settings name a machine's folders: {absolute}"


def test_the_candidates_from_scratch_runs_are_the_ones_the_study_asks_for():
    study = Study("fashion-mnist", "cpu", RESULTS / "fashion-mnist", progress=False)
    checked = 0
    for name in study.scale.generators:
        sub = study.generator_study(name)
        stored = sub.work / "base" / "config.json"
        if not stored.is_file():  # a candidate not trained yet
            continue
        expected = sub.config("base", {"objective.method": "dit", "sample.ipc": "1"},
                              pretrain_only=True).digest()
        assert Config.from_dict(json.loads(stored.read_text())).digest() == expected, name
        checked += 1
    assert checked >= 5  # mini, micro-p2, mini-gpu, s-gpu, micro-noflip are committed


def test_the_latent_study_trains_the_latent_candidate_of_the_cpu_study():
    """The cpu-latent study's generator is the cpu study's latent-f4 candidate: one run's
    settings (so either study's committed run answers the other's)."""
    cpu = Study("fashion-mnist", "cpu", RESULTS / "fashion-mnist", progress=False)
    latent = Study("fashion-mnist", "cpu-latent", RESULTS / "fashion-mnist-latent", progress=False)
    base = {"objective.method": "dit", "sample.ipc": "1"}
    candidate = cpu.generator_study("latent-f4").config("base", base, pretrain_only=True)
    assert latent.config("base", base, pretrain_only=True).digest() == candidate.digest()
    assert cpu.config("base", base, pretrain_only=True).digest() != candidate.digest()
