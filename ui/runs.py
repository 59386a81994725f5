"""Runs as foundry-ui shows them, read from the files the CLI writes (nothing here writes into a run):
status.json (callbacks/run_status.py), summary.json, csv/metrics.csv, samples/step_*.png, eval/*.json,
config.resolved.yaml, git.json, main.log. foundry-report's reader (train/ops/report.py) does the parsing.

A run's id is its path under one of the output roots, `<root index>/<relative path>`; `resolve_run` refuses an id
that leaves its root (path traversal) with a one-line error."""
from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from train.ops.report import is_run_dir, last_eval, load_run

MAX_DEPTH = 3  # outputs/<run>, outputs/sweeps/<sweep>/<trial>, outputs/recipes/<name>/<run>
STEP_PNG = re.compile(r"step_(\d+)\.png$")
KEY_METRICS = ("val/prompt_accuracy", "val/independent_accuracy_g2", "val/frechet", "train/loss")


class NotFound(LookupError):
    """An id or file that is not under the output roots; the message names it."""


@dataclass(frozen=True)
class Roots:
    paths: tuple[Path, ...]

    @classmethod
    def of(cls, paths) -> Roots:
        return cls(tuple(Path(p).resolve() for p in paths))

    def run_id(self, run: Path) -> str:
        run = run.resolve()
        for i, root in enumerate(self.paths):
            if run.is_relative_to(root):
                return f"{i}/{run.relative_to(root).as_posix()}"
        raise NotFound(f"{run} is not under the output folders ({', '.join(map(str, self.paths))})")


def inside(base: Path, rel: str) -> Path:
    """base/rel, refused if it resolves (symlinks and '..' included) outside base."""
    base = base.resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base) or "\x00" in rel:
        raise NotFound(f"'{rel}' is outside {base}; only files inside the run folders are served")
    return path


def resolve_run(roots: Roots, run_id: str) -> Path:
    index, _, rel = run_id.partition("/")
    if not index.isdigit() or int(index) >= len(roots.paths) or not rel:
        raise NotFound(f"no run '{run_id}'; run ids look like 0/<run_name> (GET /api/runs lists them)")
    path = inside(roots.paths[int(index)], rel)
    if not is_run_dir(path):
        raise NotFound(f"no run '{run_id}' (no run files in {path})")
    return path


def discover(roots: Roots) -> list[Path]:
    """Every run folder under the roots (sweep trials and recipe runs included), newest first."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = [c for c in folder.iterdir()  # a symlinked folder may lead outside the roots: not followed
                        if c.is_dir() and not c.is_symlink() and not c.name.startswith(".")]
        except OSError:
            return
        for child in children:
            if is_run_dir(child) and not (child / "sweep_summary.json").exists():
                found.append(child)
            elif depth < MAX_DEPTH and child.name not in ("wandb", "checkpoints", "samples", "prereq_data"):
                walk(child, depth + 1)

    for root in roots.paths:
        if root.is_dir():
            walk(root, 1)
    return sorted(found, key=lambda p: _mtime(p), reverse=True)


def _mtime(run: Path) -> float:
    for name in ("status.json", "main.log", "summary.json", "config.resolved.yaml"):
        if (run / name).exists():
            return (run / name).stat().st_mtime
    return run.stat().st_mtime


def pid_alive(pid: int | None, host: str | None = None) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return False  # no pid, a malformed one, or one that names a process group (0, -1) or init
    if host and host != socket.gethostname():
        return True  # a run on another machine (a shared outputs folder): its status file is all there is
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def run_state(run: Path, status: dict | None = None) -> str:
    """running | finishing (closing evaluation) | finished | failed | preempted (resumable) | interrupted (killed;
    resumable when it has a checkpoint) | unknown (a run from before status files)."""
    status = read_status(run) if status is None else status
    state = status.get("state")
    alive = pid_alive(status.get("pid"), status.get("host"))
    if state == "running":
        return "running" if alive else "interrupted"
    if state == "finished":
        return "finished" if (run / "summary.json").exists() or not alive else "finishing"
    if state in ("failed", "preempted"):
        return state
    return "finished" if (run / "summary.json").exists() else "unknown"


def grids(run: Path) -> list[tuple[int, str]]:
    """[(step, file name)] of the run's sample grids, by step."""
    out = []
    for p in (run / "samples").glob("step_*.png"):
        m = STEP_PNG.search(p.name)
        if m:
            out.append((int(m.group(1)), p.name))
    return sorted(out)


def resumable(run: Path) -> bool:
    return (run / "checkpoints" / "last.ckpt").exists() or (run / "checkpoints" / "last.ckpt.old").exists()


def downloads(run: Path) -> list[str]:
    """Files a person downloads: checkpoints, exports (diffusers folders' weights, LoRA and kohya files)."""
    pats = ("checkpoints/last.ckpt", "export*/**/*.safetensors", "export*/**/*.json", "lora*/**/*.safetensors",
            "*.safetensors")
    files = {p.relative_to(run).as_posix() for pat in pats for p in run.glob(pat) if p.is_file()}
    return sorted(files)


def summary_row(roots: Roots, run: Path) -> dict:
    status = read_status(run)
    summary = _json(run / "summary.json")
    evals = sorted((run / "eval").glob("digits_step_*.json"))
    metrics = {k: v for k, v in summary.items() if k in KEY_METRICS}
    if evals and not metrics:
        metrics = {k: v for k, v in _json(evals[-1]).items() if k in KEY_METRICS}
    step, total = status.get("step", summary.get("global_step")), status.get("max_steps")
    state = run_state(run, status)
    g = grids(run)
    return {"id": roots.run_id(run), "name": run.name, "path": str(run), "state": state,
            "resumable": resumable(run) and state in ("preempted", "interrupted", "failed"),
            "step": step, "max_steps": total,
            "progress": round(step / total, 4) if step is not None and total else None,
            "eta_seconds": status.get("eta_seconds") if state == "running" else None,
            "samples_per_sec": status.get("samples_per_sec"), "loss": status.get("loss"),
            "error": status.get("error"), "metrics": metrics, "last_grid": g[-1][1] if g else None,
            "updated_at": status.get("updated_at") or _mtime(run)}


def queued_row(run: Path, job: dict) -> dict:
    """A run the queue has not started yet (no run files): the same keys as summary_row."""
    return {"id": None, "name": run.name, "path": str(run), "state": job["state"], "job": job["id"],
            "resumable": False, "step": None, "max_steps": None, "progress": None, "eta_seconds": None,
            "samples_per_sec": None, "loss": None, "error": None, "metrics": {}, "last_grid": None,
            "updated_at": job["created"]}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def flat_config(run: Path) -> dict[str, str]:
    """config.resolved.yaml as dotted keys -> values (for the config view and the compare diff)."""
    try:
        cfg = yaml.safe_load((run / "config.resolved.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = json.dumps(node) if not isinstance(node, str) else node

    walk(cfg, "")
    return out


def config_diff(runs: list[Path]) -> list[dict]:
    """The keys whose values differ between the runs (paths.* and run_name are run-specific, kept out)."""
    flats = [flat_config(r) for r in runs]
    keys = sorted(set().union(*flats))
    rows = []
    for key in keys:
        if key.startswith(("paths.", "hydra.")) or key == "run_name":
            continue
        values = [f.get(key, "—") for f in flats]
        if any(str(run) in v for run, v in zip(runs, values)):
            continue  # a value naming the run's own folder (logger.save_dir, ...) differs by construction
        if len(set(values)) > 1:
            rows.append({"key": key, "values": values})
    return rows


def detail(roots: Roots, run: Path) -> dict:
    files = load_run(run)
    row = summary_row(roots, run)
    git = _json(run / "git.json")
    return {**row, "curves": {k: v for k, v in files.curves.items() if not k.startswith("data/skipped/")},
            "grids": grids(run), "last_eval": last_eval(files), "evals": files.evals,
            "prompt_eval": files.prompt_eval, "config": flat_config(run),
            "git": {k: git.get(k) for k in ("commit", "branch", "dirty") if k in git},
            "downloads": downloads(run), "summary": files.summary}


def log_tail(run: Path, lines: int = 200) -> str:
    """The last lines of the run's log (Hydra's main.log, else the queue's launch.log)."""
    for name in ("main.log", "launch.log"):
        path = run / name
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * 1024))
                text = f.read().decode("utf-8", "replace")
            return "\n".join(text.splitlines()[-lines:])
    return ""


def age(ts: float | None) -> str:
    if not ts:
        return ""
    s = int(time.time() - ts)
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else f"{s // 3600} h ago"
