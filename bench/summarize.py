"""Turn a pytest-benchmark JSON into the README's table: median time, GB/s, the share of the
device's measured copy bandwidth, and the speed-up over the reference measured in the same run.

    pytest bench --benchmark-only --benchmark-json=bench-ops.json
    python bench/summarize.py bench-ops.json > bench-ops.md
    python bench/summarize.py bench-train.json bench-ops.json > bench.md   # one table of both

Several files from one machine merge into one table (machine facts from the first that has them).
"""

from __future__ import annotations

import argparse
import json
import sys


def provider_of(name: str) -> str:
    """test_class_extremes_ref_compiled[B8...] -> "ref_compiled"; ..._cpp[...] -> "cpp"."""
    base = name.split("[", 1)[0]
    for provider in ("ref_compiled", "ref", "cpp", "triton", "cuda", "ddfast"):
        if base.endswith("_" + provider):
            return provider
    return base


def rows(report: dict) -> list[dict]:
    machine = report.get("machine_info", {})
    out = []
    for bench in report["benchmarks"]:
        provider = provider_of(bench["name"])
        params = bench.get("param") or ""
        seconds = bench["stats"]["median"]
        nbytes = bench.get("extra_info", {}).get("bytes")
        device = bench.get("extra_info", {}).get("device")
        on_gpu = device == "cuda" if device else provider in ("triton", "cuda")
        copy = machine.get("gpu_copy_gbps" if on_gpu else "cpu_copy_gbps")
        gbps = nbytes / seconds / 1e9 if nbytes else None
        info = bench.get("extra_info", {})
        images, gflop = info.get("images"), info.get("gflop")
        peak = machine.get("gpu_bf16_tflops")
        out.append({"group": bench.get("group") or "", "shape": params, "provider": provider,
                    "ms": seconds * 1e3, "gbps": gbps,
                    "copy_share": gbps / copy if gbps and copy else None,
                    "images_per_s": images / seconds if images else None,
                    "floor_share": gflop / 1e3 / seconds / peak if gflop and peak else None})
    for row in out:
        ref = next((r for r in out if r["group"] == row["group"] and r["shape"] == row["shape"]
                    and r["provider"] == "ref"), None)
        if ref and row["images_per_s"] and ref["images_per_s"]:  # per image, as batches differ
            row["speedup"] = row["images_per_s"] / ref["images_per_s"]
        else:
            row["speedup"] = ref["ms"] / row["ms"] if ref else None
    return out


def markdown(report: dict) -> str:
    machine = report.get("machine_info", {})
    device = machine.get("gpu") or machine.get("cpu", "CPU")
    lines = [f"Device: {device}; torch {machine.get('torch')}; triton {machine.get('triton')}; "
             f"copy bandwidth GPU {machine.get('gpu_copy_gbps')} GB/s, "
             f"CPU {machine.get('cpu_copy_gbps')} GB/s; bf16 matmul "
             f"{machine.get('gpu_bf16_tflops')} TFLOP/s.", "",
             "| operation | shape | provider | median ms | GB/s | share of copy | images/s | "
             "share of FLOP floor | vs ref |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(value, spec, suffix=""):
        return "" if value is None else format(value, spec) + suffix

    for row in sorted(rows(report), key=lambda r: (r["group"], r["shape"], r["provider"])):
        lines.append(f"| {row['group']} | {row['shape']} | {row['provider']} | "
                     f"{row['ms']:.3f} | {fmt(row['gbps'], '.1f')} | "
                     f"{fmt(row['copy_share'], '.0%')} | {fmt(row['images_per_s'], '.1f')} | "
                     f"{fmt(row['floor_share'], '.0%')} | {fmt(row['speedup'], '.1f', 'x')} |")
    return "\n".join(lines) + "\n"


def merge(reports: list[dict]) -> dict:
    """One report of several runs' benchmarks, with the first non-empty machine_info."""
    machine = next((r["machine_info"] for r in reports if r.get("machine_info")), {})
    return {"machine_info": machine,
            "benchmarks": [b for r in reports for b in r.get("benchmarks", [])]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+",
                        help="files written by pytest --benchmark-json, from one machine")
    args = parser.parse_args(argv)
    reports = []
    for path in args.json:
        with open(path) as f:
            reports.append(json.load(f))
    report = merge(reports)
    if not report["benchmarks"]:
        print(f"{', '.join(args.json)} hold(s) no benchmarks", file=sys.stderr)
        return 1
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
