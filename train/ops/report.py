"""`foundry-report RUN_DIR... --out report.png`: compare runs from their local files, without any network.

For people without W&B access (or before `wandb sync`): loss curves from `csv/metrics.csv` or, when a run
logged to W&B offline, from its `wandb/offline-run-*/run-*.wandb` log (read by W&B's own reader,
`wandb leet inspect --json`); digits metrics per guidance scale from `eval/*.json` and `summary.json`;
the last sample grid from `samples/`. A sweep folder stands for all of its trials.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from train.ops.tracking import redact

log = logging.getLogger(__name__)

RUN_MARKERS = ("summary.json", "checkpoints", "samples", "eval", "csv", "wandb", "config.resolved.yaml")
MAX_GRIDS = 8


class ReportError(ValueError):
    """A path that holds no run; the message names it."""


@dataclass
class RunFiles:
    """What one run left on disk, as the report needs it."""
    name: str
    path: Path
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    source: str = "none"  # where the curves came from: csv | wandb | none
    summary: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # eval/digits_step_*.json, oldest first
    prompt_eval: dict = field(default_factory=dict)  # the newest eval/prompts*.json (foundry-eval --prompts, callback)
    grid: Path | None = None


def is_run_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in RUN_MARKERS)


def expand(paths: list[str]) -> list[Path]:
    """Run folders as given; a sweep folder (or any folder of runs) becomes its runs, in name order."""
    runs: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            raise ReportError(f"'{raw}' is not a folder; give run folders (outputs/<run_name>) or sweep folders "
                              "(outputs/sweeps/<name>-<time>)")
        children = [c for c in sorted(p.iterdir()) if is_run_dir(c)]
        if is_run_dir(p) and not (p / "sweep_summary.json").exists():
            runs.append(p)
        elif children:
            runs.extend(children)
        else:
            raise ReportError(f"'{raw}' holds no run files ({', '.join(RUN_MARKERS[:3])}, ...); give folders "
                              "written by foundry-train")
    return runs


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_csv_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger file: one row per logging call, a `step` column, empty cells elsewhere."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step", ""))
            for key, cell in row.items():
                value = _number(cell)
                if key not in ("step", "epoch") and step is not None and value is not None:
                    curves.setdefault(key, []).append((int(step), value))
    # a resumed run appends: steps it redid after the checkpoint appear twice, and the later row is the one kept
    return {key: sorted(dict(points).items()) for key, points in curves.items()}


def wandb_records(run_file: Path) -> list[dict]:
    """The records of a W&B offline run log, via W&B's own reader (no network, no login)."""
    res = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise ReportError(f"could not read '{run_file}' with `wandb leet inspect`: "
                          f"{redact(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no output')}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def read_wandb_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalar history of every offline run in the folder (a resumed run adds one), by trainer step."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in wandb_records(run_file):
            item = rec.get("history", {}).get("item") if rec.get("type") == "history" else None
            if not item:
                continue
            step = item.get("trainer/global_step", rec["history"].get("step", {}).get("num", 0))
            for key, value in item.items():
                if not key.startswith("_") and key != "trainer/global_step" and isinstance(value, (int, float)) \
                        and not isinstance(value, bool) and math.isfinite(value):
                    curves.setdefault(key, []).append((int(step), float(value)))
    return curves


def load_run(path: Path) -> RunFiles:
    run = RunFiles(name=redact(path.name), path=path)
    if (path / "summary.json").is_file():
        run.summary = json.loads((path / "summary.json").read_text())
    metrics_csv = path / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        run.curves, run.source = read_csv_curves(metrics_csv), "csv"
    elif list((path / "wandb").glob("offline-run-*/run-*.wandb")):
        try:
            run.curves, run.source = read_wandb_curves(path), "wandb"
        except ReportError as e:  # an old wandb without `leet`: still report evaluations and grids
            log.warning("%s: no curves (%s)", path, e)
    run.evals = [json.loads(p.read_text()) for p in sorted((path / "eval").glob("digits_step_*.json"))]
    prompt_files = sorted((path / "eval").glob("prompts*.json"), key=lambda p: p.stat().st_mtime)
    run.prompt_eval = json.loads(prompt_files[-1].read_text()) if prompt_files else {}
    grids = sorted((path / "samples").glob("step_*.png"))
    run.grid = grids[-1] if grids else None
    return run


def final_loss(run: RunFiles, metric: str = "train/loss") -> float | None:
    """Mean of the last tenth of the curve: the last single step is too noisy to compare runs by."""
    points = [v for _, v in sorted(run.curves.get(metric, []))]
    if not points:
        return None
    tail = points[-max(1, len(points) // 10):]
    return sum(tail) / len(tail)


def last_eval(run: RunFiles) -> dict:
    return run.evals[-1] if run.evals else {k: v for k, v in run.summary.items() if k.startswith("val/")}


def by_guidance(metrics: dict, prefix: str) -> list[tuple[float, float]]:
    """[(guidance, value)] from keys like val/prompt_accuracy_g3."""
    out = []
    for key, value in metrics.items():
        if key.startswith(prefix + "_g") and _number(key[len(prefix) + 2:]) is not None:
            out.append((float(key[len(prefix) + 2:]), float(value)))
    return sorted(out)


def table(runs: list[RunFiles], metric: str) -> str:
    """A markdown table of the numbers the figure shows."""
    lines = [f"| # | run | steps | {metric} (last 10%) | prompt accuracy | best guidance | Fréchet | curves |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for i, r in enumerate(runs):
        ev = last_eval(r)
        lines.append(f"| {i} | {r.name} | {r.summary.get('global_step', '-')} | {fmt(final_loss(r, metric))} | "
                     f"{fmt(ev.get('val/prompt_accuracy'))} | {fmt(ev.get('val/best_guidance'))} | "
                     f"{fmt(ev.get('val/frechet'))} | {r.source} |")
    return "\n".join(lines)


def prompt_table(runs: list[RunFiles]) -> str:
    """The prompt-set evaluations (rewards, FID/KID, held-out loss per guidance scale), one column per metric."""
    keys = sorted({k for r in runs for k, v in r.prompt_eval.items() if k.startswith("eval/") and
                   isinstance(v, (int, float))})
    lines = ["| # | run | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for i, r in enumerate(runs):
        cells = [f"{r.prompt_eval[k]:.4g}" if k in r.prompt_eval else "-" for k in keys]
        lines.append(f"| {i} | {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_labels(runs: list[RunFiles], width: int = 44) -> list[str]:
    """'#i <name>' without the prefix all names share (a sweep's name), so the differences show."""
    import os

    prefix = os.path.commonprefix([r.name for r in runs]) if len(runs) > 1 else ""
    prefix = prefix[: prefix.rfind("-") + 1] if "-" in prefix else ""
    return [f"#{i} {r.name[len(prefix):]}"[:width] for i, r in enumerate(runs)]


def render(runs: list[RunFiles], out: Path, metric: str = "train/loss", smooth: float = 0.9) -> Path:
    """One PNG: loss curves, digits metrics by guidance scale, and each run's last sample grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shown = [r for r in runs if r.grid is not None][:MAX_GRIDS]
    fig = plt.figure(figsize=(15, 9 if shown else 4.8), layout="constrained")
    rows = fig.subfigures(2 if shown else 1, 1, height_ratios=[1, 1.1] if shown else None)
    top = rows[0] if shown else rows
    ax_loss, ax_acc, ax_fd = top.subplots(1, 3)
    colors = plt.get_cmap("tab10")
    labels = short_labels(runs)
    positive = True  # a log axis for losses; rewards and margins can be negative
    for i, r in enumerate(runs):
        label, color = labels[i], colors(i % 10)
        points = sorted(r.curves.get(metric, []))
        if points:
            steps, values = zip(*points)
            positive = positive and min(values) > 0
            ema, smoothed = values[0], []
            for v in values:
                ema = smooth * ema + (1 - smooth) * v
                smoothed.append(ema)
            ax_loss.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
            ax_loss.plot(steps, smoothed, color=color, label=label)
        ev = last_eval(r)
        for ax, key in ((ax_acc, "val/prompt_accuracy"), (ax_fd, "val/frechet")):
            pts = by_guidance(ev, key)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=label)
    ax_loss.set(title=f"{metric} (EMA {smooth})", xlabel="step", yscale="log" if positive else "linear")
    ax_acc.set(title="digits prompt accuracy (last eval)", xlabel="guidance scale", ylim=(0, 1))
    ax_acc.axhline(0.1, color="grey", linestyle=":", linewidth=1, label="chance")
    ax_fd.set(title="Fréchet distance (judge features; lower is better)", xlabel="guidance scale")
    for ax in (ax_loss, ax_acc, ax_fd):
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes)
    if shown:
        axes = rows[1].subplots(1, len(shown), squeeze=False)[0]
        rows[1].suptitle("last sample grid per run (one row per prompt, digits 0-9 top to bottom)", fontsize=10)
        for ax, r in zip(axes, shown):
            ax.imshow(Image.open(r.grid).convert("RGB"), interpolation="nearest")
            ax.set_title(textwrap.fill(f"{labels[runs.index(r)]} ({r.grid.stem})", 34), fontsize=7)
            ax.axis("off")
    fig.suptitle(f"foundry-report: {len(runs)} run(s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="foundry-report", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders and/or sweep folders")
    ap.add_argument("--out", default="report.png", help="the PNG to write (default: report.png)")
    ap.add_argument("--metric", default="train/loss", help="the curve to compare (default: train/loss)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = [load_run(p) for p in expand(args.runs)]
    except ReportError as e:
        print(f"foundry-report: {e}", file=sys.stderr)
        return 2
    out = render(runs, Path(args.out), args.metric)
    print(redact(table(runs, args.metric)))
    if any(r.prompt_eval for r in runs):
        print(redact(prompt_table(runs)))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
