"""A run's objective (what `foundry-train` returns to a sweeper) and the checks a trial makes before it starts."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

from omegaconf import DictConfig

log = logging.getLogger(__name__)

MAXIMIZE = ("accuracy", "score", "reward", "clip", "precision", "recall", "auc", "psnr", "ssim")
MINIMIZE = ("loss", "frechet", "fid", "kid", "error", "nll", "mse", "lpips")


class SweepError(ValueError):
    """A sweep file or sweep setting that cannot work; the message names it and the fix."""


# ----- the objective -----
def objective_direction(metric: str) -> str:
    """'maximize' for accuracy-like metrics, 'minimize' for losses and distances, from the metric's name."""
    name = str(metric).rsplit("/", 1)[-1].lower()
    up, down = any(w in name for w in MAXIMIZE), any(w in name for w in MINIMIZE)
    if up != down:
        return "maximize" if up else "minimize"
    raise SweepError(f"objective={metric!r}: cannot tell whether to maximize or minimize it; use a metric named "
                     f"like {MAXIMIZE[:2]} (maximized) or {MINIMIZE[:2]} (minimized), or set hydra.sweeper.direction")


def objective_value(summary: dict[str, Any], key: str, strict: bool) -> float | None:
    """The run's objective; under a sweep a missing or non-finite one fails the trial with a clear message."""
    value = summary.get(key)
    if value is not None and math.isfinite(float(value)):
        return float(value)
    known = sorted(k for k in summary if "/" in k)
    message = (f"objective={key}: the run produced {value!r}; log that metric (callbacks.digits_eval gives val/*) "
               f"or set objective to one it logs: {known}")
    if strict:
        raise SweepError(message)
    log.warning(message)
    return None


def check_trial_launch(cfg: DictConfig, multirun: bool, environ: dict[str, str] | None = None) -> None:
    """Multirun trials run one after another in this process; a trial that spawns DDP ranks would have each
    rank re-launch the whole sweep (Lightning re-executes the command line)."""
    env = os.environ if environ is None else environ
    if not multirun or "SLURM_JOB_ID" in env or "TORCHELASTIC_RUN_ID" in env:
        return
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    many = (isinstance(devices, int) and devices > 1) or (isinstance(devices, Sequence) and not isinstance(
        devices, str) and len(devices) > 1) or nodes > 1
    if many:
        raise SweepError(f"trainer.devices={devices} under multirun: each rank would re-launch the sweep; sweep "
                         "single-device trials, or give each trial its own job with hydra/launcher=submitit_slurm")
