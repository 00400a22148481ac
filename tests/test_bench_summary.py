"""bench/summarize.py: the arithmetic of the README's benchmark tables."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "bench_summarize", Path(__file__).resolve().parents[1] / "bench" / "summarize.py")
summarize = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(summarize)


def bench(name, group, median, **extra):
    param = name.split("[", 1)[1][:-1] if "[" in name else None
    return {"name": name, "group": group, "param": param, "stats": {"median": median},
            "extra_info": extra}


REPORT = {
    "machine_info": {"gpu": "Some GPU", "gpu_copy_gbps": 2000.0, "cpu_copy_gbps": 20.0,
                     "gpu_bf16_tflops": 500.0},
    "benchmarks": [
        bench("test_prune_adaptive_ref", "prune", 2.0, bytes=4e9, device="cuda"),
        bench("test_prune_adaptive_cuda", "prune", 0.01, bytes=4e9, device="cuda"),
        bench("test_prune_adaptive_cpp", "prune", 0.5, bytes=4e9, device="cpu"),
        bench("test_finetune_ref[64]", "finetune", 0.4, images=64, gflop=64 * 500.0),
        bench("test_finetune_ddfast[64]", "finetune", 0.1, images=64, gflop=64 * 500.0),
        bench("test_sample_ref", "sample", 2.0, images=1, gflop=24322.0),
        bench("test_sample_ddfast", "sample", 8.0, images=32, gflop=32 * 24322.0),
    ],
}


def test_rates_shares_and_ratios():
    rows = {(r["group"], r["provider"]): r for r in summarize.rows(REPORT)}
    cuda = rows["prune", "cuda"]
    assert cuda["gbps"] == pytest.approx(400.0) and cuda["copy_share"] == pytest.approx(0.2)
    assert cuda["speedup"] == pytest.approx(200.0)
    assert rows["prune", "cpp"]["copy_share"] == pytest.approx(8.0 / 20.0)  # the CPU's copy rate
    fine = rows["finetune", "ddfast"]
    assert fine["images_per_s"] == pytest.approx(640.0) and fine["speedup"] == pytest.approx(4.0)
    assert fine["floor_share"] == pytest.approx(64 * 500.0 / 1e3 / 0.1 / 500.0)
    # Sampling is compared per image: 4 images/s against 0.5.
    assert rows["sample", "ddfast"]["speedup"] == pytest.approx(8.0)
    table = summarize.markdown(REPORT)
    assert "Some GPU" in table and "| sample |  | ddfast | 8000.000 |" in table


def test_empty_report_is_an_error(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text('{"benchmarks": []}')
    assert summarize.main([str(path)]) == 1
    assert "no benchmarks" in capsys.readouterr().err


def test_several_files_merge_into_one_table(tmp_path, capsys):
    import json

    ops = {"machine_info": REPORT["machine_info"], "benchmarks": REPORT["benchmarks"][:3]}
    train = {"machine_info": {}, "benchmarks": REPORT["benchmarks"][3:]}
    paths = []
    for name, report in (("train.json", train), ("ops.json", ops)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(report))
    assert summarize.main([str(p) for p in paths]) == 0
    assert capsys.readouterr().out == summarize.markdown(REPORT)
