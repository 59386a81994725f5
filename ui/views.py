"""foundry-ui's helpers for pages and actions: the Plotly figures, a run's own overrides (to resume it), and the
checks that a chosen output folder or base model is one the app may use."""
from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
import yaml

from ui import forms, runs
from ui.jobs import Conflict


def curves_figure(details: list[dict], metric: str | None = None) -> str:
    """A Plotly figure (JSON) of one metric for several runs, or every train/val curve of one run."""
    fig = go.Figure()
    if metric:
        for d in details:
            pts = d["curves"].get(metric, [])
            fig.add_scatter(x=[s for s, _ in pts], y=[v for _, v in pts], mode="lines+markers", name=d["name"])
        fig.update_layout(title=metric)
    else:
        d = details[0]
        for key in sorted(d["curves"]):
            if key.startswith(("train/loss", "val/", "eval/")):
                pts = d["curves"][key]
                fig.add_scatter(x=[s for s, _ in pts], y=[v for _, v in pts], mode="lines+markers", name=key,
                                visible=True if key == "train/loss" else "legendonly")
    fig.update_layout(height=360, margin={"l": 40, "r": 10, "t": 40, "b": 30}, xaxis_title="step", template="plotly_white")
    return fig.to_json()


def run_overrides(run: Path) -> list[str]:
    """The overrides the run was launched with (Hydra's .hydra/overrides.yaml): launching them again resumes it."""
    path = run / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        raise Conflict(f"run '{run.name}' has no readable {path.relative_to(run)}; resume it from the command line "
                       "with the same run_name") from None
    keep = [o for o in overrides if isinstance(o, str) and not o.startswith(("paths.output_dir=", "run_name="))]
    for o in keep:
        try:
            forms.check_override(o)
        except forms.BadInput as err:
            raise Conflict(f"run '{run.name}' was launched with an override foundry-ui does not replay ({err}); resume "
                           "it from the command line with the same run_name") from None
    return [*keep, f"paths.output_dir={run.parent}", f"run_name={run.name}"]


def output_root(roots: runs.Roots, chosen: str) -> Path:
    if not chosen:
        return roots.paths[0]
    for root in roots.paths:
        if str(root) == chosen:
            return root
    raise forms.BadInput(f"output folder '{chosen}' is not one foundry-ui serves ({', '.join(map(str, roots.paths))})")


def base_model(roots: runs.Roots, base: str) -> Path:
    """The wizard's base: a run id from the list, or a local diffusers folder."""
    if base and base[0].isdigit() and "/" in base:
        return runs.resolve_run(roots, base)
    path = Path(base).expanduser()
    if not (path / "model_index.json").is_file():
        raise forms.BadInput(f"base model '{base}' is neither a finished run nor a diffusers folder with "
                             "model_index.json; pick a run from the list or give a local folder")
    return path.resolve()


def clock(seconds) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def esc(text: str) -> str:
    return html.escape(text)
