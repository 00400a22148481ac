"""The run report: ``report.md`` with pictures, rebuilt from a run folder's files alone.

    python -m ddfast.report RUN_DIR

reads ``config.json``, ``summary.json``, ``metrics.jsonl`` and ``eval/results.md`` and writes
``report.md`` beside them, with ``plots/losses.png`` (every loss term of each stage over its
steps), ``plots/memory.png`` (the mean pairwise cosine inside each memory over fine-tuning: lower
is more diverse), the class grids (real images above the distilled ones), the evaluation table
and the time of each stage. The job writes it at its end; the command rebuilds it, identically,
from the same files.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from ddfast.errors import OutputError
from ddfast.io import read_jsonl, write_bytes, write_text

__all__ = ["write_report", "main"]

TERMS = ("loss", "mse", "vb", "rep", "div", "kl")


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    # No timestamp or software tag in the file: the same data gives the same bytes.
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _plots(records: list[dict], plots: Path) -> list[tuple[str, str]]:
    """(title, relative path) of each plot written; none without log lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("vae", "pretrain", "finetune")
              if any(r.get("stage") == s for r in records)]
    written = []
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.6), squeeze=False)
        for ax, stage in zip(axes[0], stages, strict=True):
            rows = [r for r in records if r.get("stage") == stage]
            steps = [r["step"] for r in rows]
            for term in TERMS:
                values = [r.get(term, float("nan")) for r in rows]
                if any(v > 0 for v in values):  # a log axis shows only positive terms
                    ax.plot(steps, values, marker=".", label=term)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(stage)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        write_bytes(plots / "losses.png", _figure_bytes(fig))
        plt.close(fig)
        written.append(("Loss terms (mean over each log interval)", "plots/losses.png"))
    fine = [r for r in records if r.get("stage") == "finetune" and "memory_cos_real" in r]
    curves = (("memory.png", "Diversity of each memory during fine-tuning", "mean pairwise cosine",
               "memory diversity (lower is more diverse)", False,
               (("memory_cos_real", "real memory"), ("memory_cos_gen", "generated memory"))),
              ("gradients.png", "Gradient norm of each term at the end of each log interval",
               "|d term / d model output|", "how hard each term pushes the model", True,
               (("grad_diffusion", "diffusion loss"), ("grad_rep", "representativeness"),
                ("grad_div", "diversity"))))
    for name, caption, ylabel, title, log_y, keys in curves:
        rows = [r for r in fine if keys[0][0] in r]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        steps = [r["step"] for r in rows]
        for key, label in keys:
            values = [r[key] for r in rows]
            if not log_y or any(v > 0 for v in values):  # a log axis shows positive values only
                ax.plot(steps, values, marker=".", label=label)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        write_bytes(plots / name, _figure_bytes(fig))
        plt.close(fig)
        written.append((caption, f"plots/{name}"))
    return written


def report_markdown(config: dict, summary: dict, table: str | None,
                    plots: list[tuple[str, str]]) -> str:
    lines = [f"# ddfast run: {config.get('preset')}, method {summary.get('method')}", "",
             f"Config digest `{summary.get('config_digest')}`, device {summary.get('device')}, "
             f"attention kernels {', '.join(summary.get('attention') or []) or 'n/a'}.", ""]
    if table:
        lines += ["## Evaluation", "", table.strip(), ""]
    for title, rel in plots:
        lines += [f"## {title}", "", f"![{Path(rel).stem}]({rel})", ""]
    vae = summary.get("vae")
    if vae:
        held = vae.get("held_out_reconstruction")
        lines += ["## Autoencoder (trained in this run)", "",
                  f"`{vae['preset']}`, {vae['parameters']:,} parameters, latents "
                  f"{'x'.join(str(d) for d in vae['latent_shape'])} scaled by "
                  f"{vae['scaling_factor']:.4f}; squared error of its last steps "
                  f"{vae['last_steps']['mse']:.4f} (images in [-1, 1])"
                  + (f"; round trip of the {held['images']} held-out images: PSNR "
                     f"{held['psnr']:.2f} dB." if held else "."), ""]
    lines += ["## Class grids (real images on top, distilled below)", ""]
    lines += [f"![{Path(g).stem}](grids/{Path(g).name})" for g in summary.get("grids", [])]
    sel = summary.get("selected")
    if sel:
        net = sel.get("feature_network") or {}
        where = (f"in the features of a {net.get('network', 'ConvNet')} trained on every "
                 f"training image ({net.get('test_accuracy', float('nan')):.2f} % on the test "
                 "split)")
        if sel.get("rule") == "anchored":
            lines += ["", "## Anchored sets (real images on top, samples below)", "",
                      f"Each sample started from the mean training item of one k-means "
                      f"prototype {where}, noised to strength {sel.get('strength')}.", ""]
        else:
            lines += ["", "## Prototype-selected sets (real images on top, picked samples "
                      "below)", "", f"Picked from the pool `{Path(sel['pool']).name}/` {where}.",
                      ""]
        for k, folder in sel["grids"].items():
            lines += [f"IPC {k}:", ""]
            lines += [f"![{k}-{Path(g).stem}](grids/{Path(folder).name}/{Path(g).name})"
                      for g in summary.get("grids", [])]  # the same class files
            lines += [""]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary.get("timings_s", {}).items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots from the files of a finished run; returns its path."""
    run_dir = Path(run_dir)
    paths = {name: run_dir / name for name in ("config.json", "summary.json")}
    missing = [name for name, p in paths.items() if not p.is_file()]
    if missing:
        raise OutputError(f"{run_dir} holds no finished ddfast run ({', '.join(missing)} "
                          f"missing); run the job to the end first (add --resume to finish it)")
    config = json.loads(paths["config.json"].read_text())
    summary = json.loads(paths["summary.json"].read_text())
    records = read_jsonl(run_dir / "metrics.jsonl")
    results = run_dir / "eval" / "results.md"
    table = results.read_text() if results.is_file() else None
    plots = _plots(records, run_dir / "plots")
    path = run_dir / "report.md"
    write_text(path, report_markdown(config, summary, table, plots))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.report",
                                     description="Rebuild a run's report.md and its plots.")
    parser.add_argument("run_dir", help="the run folder (--out of python -m ddfast.train)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir)
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
