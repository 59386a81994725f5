"""Run identity and what a run leaves behind for tracking.

A run is named from its experiment and (under multirun) the overrides that make it a trial, grouped in W&B
per experiment or sweep, and records the git commit and uncommitted diff that produced it. At the end its
checkpoints, LoRA files and exported pipelines become W&B artifacts (large files by reference) and the W&B
run is closed, so the next trial of a sweep in the same process starts its own run.

Nothing here may write a credential: values under secret-looking keys are scrubbed (`train.redaction.scrub`)
and the values of secret-looking environment variables (WANDB_API_KEY, HF_TOKEN, ...) are redacted from
every text written (diffs, configs, reports).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from callbacks.wandb_log import wandb_run
from train.redaction import REDACTED, is_secret_name, redact, redact_text, scrub_overrides  # noqa: F401

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Overrides that say where or how a run is logged, not what it trains: left out of trial names.
NAME_EXCLUDED = ("sweep", "experiment", "run_name", "paths.", "logger", "hydra.", "hydra/", "trainer.enable_progress_bar")
NAME_LIMIT = 96
SWEPT_KEYS_FILE = "swept_keys.json"  # in a sweep's folder: the keys its trials differ in, for their names


# ----- secrets (the rule lives in train/redaction.py) -----
class RedactSecrets(logging.Filter):
    """Logging filter on Hydra's handlers (conf/train.yaml): no log line, on screen or in <run>/*.log,
    carries a credential, whoever logs it (Hydra prints every trial's overrides)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


@contextlib.contextmanager
def scrubbed_argv() -> Iterator[None]:
    """W&B records the command line when a run starts: hide secret-looking overrides from it meanwhile."""
    saved = list(sys.argv)
    sys.argv[:] = [saved[0], *scrub_overrides(saved[1:])]
    try:
        yield
    finally:
        sys.argv[:] = saved


def _scrub_tree(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_name(k) else _scrub_tree(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        items = [_scrub_tree(v) for v in obj]
        return scrub_overrides(items) if items and all(isinstance(v, str) for v in items) else items
    return redact_text(obj) if isinstance(obj, str) else obj  # e.g. hydra.job.override_dirname


def scrub_yaml_file(path: Path) -> bool:
    """Rewrite a YAML file Hydra saved so no secret-looking key or override keeps its value; True if changed."""
    if not path.is_file():
        return False
    text = path.read_text()
    data = yaml.safe_load(text)
    clean = _scrub_tree(data)
    if clean == data:
        return False
    path.write_text(yaml.safe_dump(clean, sort_keys=False))
    return True


class ScrubSavedConfig(Callback):
    """Hydra callback: `.hydra/*.yaml` and the sweep's `multirun.yaml` are saved before the job starts;
    scrub them then, so a secret typed as an override never stays on disk."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        out = Path(config.hydra.runtime.output_dir)
        subdir = config.hydra.output_subdir
        files = [out / subdir / n for n in ("config.yaml", "overrides.yaml", "hydra.yaml")] if subdir else []
        if in_multirun():
            files.append(Path(config.hydra.sweep.dir) / "multirun.yaml")
        for f in files:
            if scrub_yaml_file(f):
                log.info("redacted secret-looking values in %s", f)


# ----- run identity -----
def hydra_config() -> DictConfig | None:
    """Hydra's own config when a Hydra app is running (None under the compose API or plain Python)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun(hc: DictConfig | None = None) -> bool:
    from hydra.types import RunMode

    hc = hc if hc is not None else hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def choice(group: str, hc: DictConfig | None = None) -> str | None:
    """The option picked for a config group (`experiment=NAME`, `sweep=NAME`), if any."""
    hc = hc if hc is not None else hydra_config()
    return None if hc is None else hc.runtime.choices.get(group)


def name_prefix(hc: DictConfig | None = None) -> str:
    return choice("experiment", hc) or choice("sweep", hc) or "run"


def _short(value: str) -> str:
    """0.0017692267954532756 -> 0.001769: sampled floats are unreadable in names (the config keeps them)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and ("." in value or "e" in value.lower()) else value


def override_slug(overrides: Sequence[str], keys: Iterable[str] | None = None, limit: int = NAME_LIMIT) -> str:
    """`optimizer.lr=0.001,data.batch_size=32`: the overrides that tell trials apart, usable as a folder name.

    With `keys` (the sweeper's parameters) only those keys are kept; otherwise every override except the
    ones about where and how a run is logged. Long slugs keep a hash of the full text, so they stay unique.
    """
    wanted = set(keys) if keys is not None else None
    items = []
    for o in scrub_overrides(overrides):
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if (wanted is not None and key not in wanted) or (wanted is None and key.startswith(NAME_EXCLUDED)):
            continue
        items.append(f"{key}={_short(value)}")
    slug = re.sub(r"[^\w.,=+@%-]+", "_", ",".join(items))  # only characters safe in folder names and shells
    if len(slug) > limit:
        slug = slug[: limit - 9] + "~" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return slug


def trial_run_name(prefix: str, num: int, overrides: Sequence[str], keys: Iterable[str] | None = None) -> str:
    """`<experiment or sweep>-<job number>-<swept overrides>`: unique per trial, stable across requeues."""
    slug = override_slug(overrides, keys)
    return f"{prefix}-{num}" + (f"-{slug}" if slug else "")


def run_name_from_context(environ: dict[str, str] | None = None) -> str | None:
    """The run name a sweep gives a trial (Hydra multirun job, or a W&B sweep agent's run); None otherwise."""
    env = os.environ if environ is None else environ
    hc = hydra_config()
    if in_multirun(hc):
        keys_file = Path(str(hc.sweep.dir)) / SWEPT_KEYS_FILE  # written by train.ops.sweep.SweepSummary
        keys = json.loads(keys_file.read_text())["swept"] if keys_file.is_file() else None
        return trial_run_name(name_prefix(hc), int(hc.job.num), list(hc.overrides.task), keys=keys)
    if env.get("WANDB_SWEEP_ID") and env.get("WANDB_RUN_ID"):
        return f"{name_prefix(hc)}-{env['WANDB_RUN_ID']}"
    return None


def single_run_name(environ: dict[str, str] | None = None) -> str:
    """Outside sweeps: the launcher's name (FOUNDRY_RUN_NAME, a SLURM or torchrun job id) or a timestamp,
    after the experiment's name when there is one."""
    env = os.environ if environ is None else environ
    if env.get("FOUNDRY_RUN_NAME") not in (None, "", "none"):
        return env["FOUNDRY_RUN_NAME"]
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        if env.get(var) not in (None, "", "none"):
            base = f"job-{env[var]}"
            break
    else:
        base = time.strftime("%Y%m%d-%H%M%S")
    experiment = choice("experiment")
    return f"{experiment}-{base}" if experiment else (base if base.startswith("job-") else f"run-{base}")


def wandb_identity(cfg: DictConfig, hc: DictConfig | None = None,
                   environ: dict[str, str] | None = None) -> dict[str, Any]:
    """W&B group, job_type and tags: the trials of one sweep share a group; the config may set each."""
    env = os.environ if environ is None else environ
    hc = hc if hc is not None else hydra_config()
    node = cfg.get("logger") or {}
    experiment, sweep = choice("experiment", hc), choice("sweep", hc)
    sweep_name = cfg.get("sweep_name") or sweep
    if in_multirun(hc):
        group, job_type = Path(str(hc.sweep.dir)).name, "sweep-trial"
    elif env.get("WANDB_SWEEP_ID"):
        group, job_type = f"{sweep_name or 'sweep'}-{env['WANDB_SWEEP_ID']}", "sweep-trial"
    else:
        group, job_type = experiment, "train"
    method = str(cfg.get("method", {}).get("_target_", "")).split(".")
    tags = list(node.get("tags") or [])
    tags += [f"experiment:{experiment}"] if experiment else []
    tags += [f"sweep:{sweep_name}"] if job_type == "sweep-trial" and sweep_name else []
    tags += [f"method:{method[-2]}"] if len(method) >= 2 else []
    tags += [f"model:{cfg.model.get('preset') or 'pretrained'}"] if cfg.get("model") else []
    return {"group": node.get("group") or group, "job_type": node.get("job_type") or job_type,
            "tags": list(dict.fromkeys(t[:64] for t in tags))}


# ----- what produced the run -----
def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=True).stdout


@functools.lru_cache(maxsize=4)
def git_state(repo: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Commit, branch, dirty flag, untracked files and the diff against HEAD (secrets redacted, so a line
    assigning a secret-looking name no longer applies as a patch: credentials matter more).

    Cached: the code a process runs is the code it imported, however the tree changes during a sweep."""
    try:
        commit = _git(["rev-parse", "HEAD"], repo).strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "diff": ""}
    status = _git(["status", "--porcelain"], repo).splitlines()
    return {"commit": commit, "branch": _git(["rev-parse", "--abbrev-ref", "HEAD"], repo).strip(),
            "dirty": bool(status), "untracked": [s[3:] for s in status if s.startswith("??")],
            "diff": redact_text(_git(["diff", "HEAD"], repo))}  # also `api_key = "..."` typed into code


def record_run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """At the start of a run (rank 0): the resolved config and the git state it ran from, in the run dir."""
    from lightning.pytorch.utilities import rank_zero_only

    from train.build import resolved_config  # lazy: Hydra imports this module at start-up; torch loads later

    if rank_zero_only.rank != 0:
        return {}
    (run_dir / "config.resolved.yaml").write_text(redact(yaml.safe_dump(resolved_config(cfg), sort_keys=False)))
    state = dict(git_state()) if cfg.get("tracking", {}).get("git", True) else {"commit": None, "diff": ""}
    diff = state.pop("diff", "")
    if diff:
        (run_dir / "git.diff").write_text(diff)
    (run_dir / "git.json").write_text(json.dumps({**state, "diff_file": "git.diff" if diff else None}, indent=2))
    return state


# ----- W&B: samples table, artifacts, closing the run -----
def _artifact_name(run_name: str, what: str) -> str:
    return re.sub(r"[^\w.-]+", "_", f"{run_name}-{what}")[:120]


def _add(artifact, path: Path, min_ref_bytes: int, name: str) -> None:
    """Large files are logged by reference (file://, checksummed, not copied); small ones are uploaded."""
    if path.stat().st_size >= min_ref_bytes:
        artifact.add_reference(path.resolve().as_uri(), name=name)
    else:
        artifact.add_file(str(path), name=name)


def find_outputs(run_dir: Path) -> dict[str, list[Path]]:
    """Checkpoints, exported pipeline folders (a model_index.json) and LoRA/adapter .safetensors files."""
    pipelines = sorted(p.parent for p in run_dir.rglob("model_index.json"))
    inside = lambda p: any(d in p.parents for d in pipelines)  # noqa: E731
    return {"checkpoints": sorted((run_dir / "checkpoints").glob("*.ckpt")),
            "pipelines": pipelines,
            "lora": sorted(p for p in run_dir.rglob("*.safetensors") if not inside(p) and "wandb" not in p.parts)}


def log_artifacts(run, run_dir: Path, run_name: str, summary: dict[str, Any], min_ref_mb: float = 10.0) -> list[str]:
    """Log the run's outputs as W&B artifacts; returns their names."""
    import wandb

    min_ref = int(min_ref_mb * 2**20)
    metadata = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and v is not None}
    outputs, logged = find_outputs(run_dir), []
    if outputs["checkpoints"]:
        art = wandb.Artifact(_artifact_name(run_name, "checkpoints"), type="model", metadata=metadata)
        for p in outputs["checkpoints"]:
            _add(art, p, min_ref, p.name)
        logged.append(run.log_artifact(art, aliases=["latest"]).name)
    for folder in outputs["pipelines"]:  # a pipeline is many large files: always by reference
        art = wandb.Artifact(_artifact_name(run_name, f"pipeline-{folder.name}"), type="pipeline", metadata=metadata)
        art.add_reference(folder.resolve().as_uri(), name=folder.name)
        logged.append(run.log_artifact(art).name)
    if outputs["lora"]:
        art = wandb.Artifact(_artifact_name(run_name, "lora"), type="lora", metadata=metadata)
        for p in outputs["lora"]:
            _add(art, p, min_ref, str(p.relative_to(run_dir)))
        logged.append(run.log_artifact(art).name)
    return logged


def finish_run(trainer, cfg: DictConfig, run_dir: Path, summary: dict[str, Any]) -> None:
    """End of a successful run: final metrics, git diff and artifacts to W&B, then close the W&B run."""
    run = wandb_run(trainer)
    if run is None:
        return
    tracking = cfg.get("tracking") or {}
    run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if (run_dir / "git.diff").is_file():
        run.save(str(run_dir / "git.diff"), base_path=str(run_dir), policy="now")
    if tracking.get("artifacts", True):
        names = log_artifacts(run, run_dir, cfg.run_name, summary, tracking.get("reference_min_mb", 10.0))
        log.info("W&B artifacts: %s", ", ".join(names) or "none")
    run.finish()


def close_wandb(ok: bool) -> None:
    """Close a W&B run left open (a failed trial): marked failed, and the next trial gets a fresh run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if ok else 1)
