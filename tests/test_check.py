"""python -m ddfast.check on the CPU: every section runs and passes, failures name a fix, and the
CUDA architecture rule holds."""

import json

import pytest

from ddfast import _ext, check


@pytest.mark.slow
def test_quick_cpu_check_passes_every_section(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    by_section = {s: [r for r in results if r["section"] == s] for s in check.SECTIONS}
    assert all(by_section.values()), {s: len(r) for s, r in by_section.items()}
    assert report["counts"]["fail"] == 0
    names = {r["name"]: r for r in results}
    # the compiled extension runs every op, each checked against the reference
    for op in check.OPS:
        assert names[f"backend {op}"]["values"]["chosen"] == "cpp"
    assert names["class_extremes cpp N8 D256 float32"]["status"] == "pass"
    assert names["class_extremes cpp ties"]["status"] == "pass"
    assert names["insert_memory cpp N8 adaptive"]["detail"] == "exact"
    # timings beside the reference, measured in the same run
    eager = names["finetune step eager B8"]["values"]
    assert eager["ms"] > 0 and eager["vs_reference"] > 0
    assert names["finetune step compiled B8"]["status"] == "skip"  # --quick
    assert names["attention kernel"]["values"]["kernels"]
    e2e = names["ddfast.train under torchrun (DDP)"]
    assert e2e["status"] == "pass" and e2e["values"]["images"] == 4
    assert all(0 <= a <= 100 for a in e2e["values"]["accuracy"].values())
    shown = capsys.readouterr().out
    assert "| section | check | status |" in shown and "0 failed" in shown


def test_no_compile_keeps_every_memory_size_and_skips_only_the_compiled_paths(tmp_path):
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--no-compile", "--sections", "parity,speed",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] is False and report["compile"] is False
    names = {r["name"]: r for r in report["results"]}
    for slots in check.CPU_SIZES.slots:  # --quick would keep the first only
        assert names[f"class_extremes cpp N{slots} D256 float32"]["status"] == "pass"
        assert names[f"insert_memory cpp N{slots} adaptive"]["detail"] == "exact"
    compiled = [r for r in report["results"] if "compiled" in r["name"]]
    assert len(compiled) == 2
    assert all(r["status"] == "skip" and r["detail"] == "--no-compile" for r in compiled)
    assert names["finetune step eager B8"]["status"] == "pass"
    assert names["sample eager 8 images"]["values"]["ms"] > 0


def test_failure_is_reported_with_a_hint(monkeypatch, capsys):
    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(_ext, "has_cuda", lambda: False)
    assert check.main(["--device", "cpu", "--sections", "environment"]) == 1
    shown = capsys.readouterr().out
    assert "FAILED environment / compiled extension" in shown
    assert "pip install ." in shown
    assert "FAILED environment / backend class_extremes" in shown  # falls back to ref


def test_bad_arguments(tmp_path, capsys):
    assert check.main(["--sections", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
    assert check.main(["--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("archs,cap,ok,why", [
    (["80", "90"], (9, 0), True, "natively"),
    (["80", "90"], (8, 6), True, "natively"),  # sm_80 cubin runs on sm_86
    (["80", "90"], (10, 0), True, "PTX"),  # newer major: the driver JITs compute_90
    (["90-real"], (10, 0), False, "none runs"),
    (["90a"], (9, 0), True, "natively"),
    (["90a"], (10, 0), False, "none runs"),  # arch-specific: exactly sm_90
    (["80-real", "90-virtual"], (12, 0), True, "compute_90"),
    (["90"], (8, 0), False, "none runs"),
    ([], (9, 0), False, "nothing"),
])
def test_arch_support(archs, cap, ok, why):
    got_ok, got_why = check.arch_support(archs, cap)
    assert got_ok is ok and why in got_why
