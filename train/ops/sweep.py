"""Sweeps: the objective's direction, a per-trial record and sweep summary, and `foundry-sweep`.

Hydra multirun runs the trials (`foundry-train -m sweep=NAME` with the Optuna sweeper, or plain
`foundry-train -m key=a,b` grids; `hydra/launcher=submitit_slurm` on a cluster). Each trial returns the
configured objective; its direction comes from the metric's name. A `SweepSummary` Hydra callback writes
`trial.json` per trial (failed ones with their error) and `sweep_summary.json` with the best trial, so a
failed trial is reported, never silently dropped.

`foundry-sweep wandb conf/sweep/NAME.yaml` turns the same sweep file into a W&B sweep config (validated
with W&B's own sweep schema, offline) whose agent runs `foundry-train sweep=NAME <params as overrides>`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from train.ops.objective import SweepError, objective_direction
from train.ops.resolvers import compose_config
from train.ops.tracking import SWEPT_KEYS_FILE, in_multirun, redact, scrub_overrides

log = logging.getLogger(__name__)

SWEEP_DIR = Path(__file__).resolve().parents[2] / "conf" / "sweep"
WANDB_METHOD = {"TPESampler": "bayes", "CmaEsSampler": "bayes", "RandomSampler": "random", "GridSampler": "grid"}
AGENT_PROGRAM = "train/ops/main.py"  # what `foundry-train` runs; W&B records it as the sweep's program


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys a sweep varies (`a=1,2`, `choice(...)`, `interval(...)`, ...), in order, parsed by Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return list(dict.fromkeys(o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()))


def check_direction(config: DictConfig) -> None:
    """An Optuna sweep must optimise `objective` the right way: plain `hydra/sweeper=optuna` minimizes."""
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if direction is None or isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction):
        return
    direction = getattr(direction, "name", str(direction))
    wanted = objective_direction(config.objective)
    if direction != wanted:
        raise SweepError(f"hydra.sweeper.direction={direction} but objective={config.objective} is to {wanted}: "
                         f"use hydra/sweeper=optuna_objective (direction follows the objective) or set "
                         f"hydra.sweeper.direction={wanted}")


# ----- per-trial records and the sweep summary -----
def sweep_direction(config: DictConfig) -> str | None:
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if direction in ("maximize", "minimize"):
        return direction
    try:
        return objective_direction(config.objective)
    except SweepError:
        return None


def trial_record(config: DictConfig, job_return) -> dict[str, Any]:
    from hydra.core.utils import JobStatus

    ok = job_return.status == JobStatus.COMPLETED
    value = job_return._return_value  # the objective, or the exception of a failed trial
    error = None if ok else redact(f"{type(value).__name__}: {value}".splitlines()[0])
    return {"num": int(config.hydra.job.num), "run_name": str(config.run_name),
            "run_dir": str(config.hydra.runtime.output_dir), "overrides": scrub_overrides(job_return.overrides or []),
            "status": "COMPLETED" if ok else "FAILED", "objective": str(config.objective),
            "value": float(value) if ok and value is not None else None, "error": error}


def write_summary(sweep_dir: Path, objective: str | None = None, direction: str | None = None) -> dict[str, Any]:
    """Collect every trial.json under the sweep folder into sweep_summary.json (written atomically)."""
    trials = sorted((json.loads(p.read_text()) for p in sweep_dir.glob("*/trial.json")), key=lambda t: t["num"])
    done = [t for t in trials if t["status"] == "COMPLETED" and t["value"] is not None]
    best = None
    if done and direction:
        best = (max if direction == "maximize" else min)(done, key=lambda t: t["value"])
    summary = {"sweep_dir": str(sweep_dir), "objective": objective or (trials[0]["objective"] if trials else None),
               "direction": direction, "n_trials": len(trials), "n_completed": len(done),
               "n_failed": sum(t["status"] == "FAILED" for t in trials), "best": best, "trials": trials}
    results = sweep_dir / "optimization_results.yaml"  # the Optuna sweeper's own verdict, when present
    if results.is_file():
        summary["optuna"] = yaml.safe_load(results.read_text())
    tmp = sweep_dir / "sweep_summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(sweep_dir / "sweep_summary.json")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"sweep {summary['sweep_dir']}: {summary['n_completed']}/{summary['n_trials']} trials completed, "
             f"{summary['n_failed']} failed; objective {summary['objective']} ({summary['direction'] or '?'})"]
    for t in summary["trials"]:
        shown = f"{t['value']:.4f}" if t["value"] is not None else f"FAILED ({t['error']})"
        lines.append(f"  #{t['num']} {t['run_name']}: {shown}")
    best = summary["best"]
    lines.append(f"best: #{best['num']} {best['run_name']} = {best['value']:.4f} ({best['run_dir']})" if best
                 else "best: none (no trial completed)")
    return "\n".join(lines)


def _rank_zero(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return all(env.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


class SweepSummary(Callback):
    """Hydra callback: one record per trial (also under submitit, on the shared filesystem) and a summary."""
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
            if o.get_key_element() == "run_name" and not o.is_sweep_override():
                raise SweepError("run_name is fixed under multirun: every trial would share (and resume) one "
                                 "folder; leave it unset, trials are named from the sweep and their overrides")
        check_direction(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
        keys = swept_keys([*params, *config.hydra.overrides.task])
        (sweep_dir / SWEPT_KEYS_FILE).write_text(json.dumps({"swept": keys}))  # trials are named after these

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        if not in_multirun() or not _rank_zero():
            return
        record = trial_record(config, job_return)
        Path(record["run_dir"], "trial.json").write_text(json.dumps(record, indent=2))
        if record["status"] == "FAILED":
            log.error("trial #%d %s FAILED: %s", record["num"], record["run_name"], record["error"])
        write_summary(Path(config.hydra.sweep.dir), str(config.objective), sweep_direction(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = write_summary(sweep_dir, str(config.objective), sweep_direction(config))
        log.info("%s\nsummary: %s", format_summary(summary), sweep_dir / "sweep_summary.json")


# ----- the W&B sweep bridge -----
def compose_sweep(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The config `foundry-train -m sweep=NAME` would run with, Hydra's node included."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{path}: no such sweep file; give one of conf/sweep/*.yaml "
                         f"({', '.join(sorted(f.name for f in SWEEP_DIR.glob('*.yaml')))})")
    if p.resolve().parent != SWEEP_DIR.resolve():
        raise SweepError(f"{path}: sweep files must live in {SWEEP_DIR} (foundry-train loads them as sweep=NAME); "
                         "move it there")
    return compose_config([f"sweep={p.stem}", *overrides], return_hydra_config=True)


def wandb_parameter(dist: Any) -> dict[str, Any]:
    """An Optuna distribution (as the Optuna sweeper parses Hydra's sweep syntax) -> a W&B parameter."""
    from optuna import distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return {"values": list(dist.choices)}
    if isinstance(dist, d.LogUniformDistribution):
        return {"distribution": "log_uniform_values", "min": dist.low, "max": dist.high}
    if isinstance(dist, d.UniformDistribution):
        return {"distribution": "uniform", "min": dist.low, "max": dist.high}
    if isinstance(dist, d.IntLogUniformDistribution):
        return {"distribution": "q_log_uniform_values", "min": dist.low, "max": dist.high, "q": 1}
    if isinstance(dist, d.IntUniformDistribution):
        if dist.step == 1:
            return {"distribution": "int_uniform", "min": dist.low, "max": dist.high}
        return {"values": list(range(dist.low, dist.high + 1, dist.step))}
    if isinstance(dist, d.DiscreteUniformDistribution):
        return {"distribution": "q_uniform", "min": dist.low, "max": dist.high, "q": dist.q}
    raise SweepError(f"{type(dist).__name__}: no W&B equivalent; use choice(), interval() or tag(log, interval())")


def to_wandb_sweep(cfg: DictConfig, name: str, project: str | None = None, entity: str | None = None) -> dict:
    """The W&B sweep config for a composed sweep: same search space, metric, direction and fixed settings."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    sweeper = cfg.hydra.sweeper
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    if not params:
        raise SweepError(f"sweep={name}: hydra.sweeper.params is empty; list the parameters to search there")
    dists, fixed = create_params_from_overrides(params)
    target = str(sweeper.get("_target_", ""))
    if "optuna" in target.lower():
        sampler = str(sweeper.sampler.get("_target_", "")).rsplit(".", 1)[-1]
        if sampler not in WANDB_METHOD:
            raise SweepError(f"hydra.sweeper.sampler={sampler}: W&B has no equivalent; use tpe, random or grid")
        method, direction = WANDB_METHOD[sampler], sweeper.direction
    else:  # Hydra's basic sweeper: every combination
        method, direction = "grid", objective_direction(cfg.objective)
    if not isinstance(direction, str):
        raise SweepError(f"hydra.sweeper.direction={direction}: W&B sweeps optimise one metric")
    parameters = {k: wandb_parameter(v) for k, v in dists.items()}
    if method == "grid" and any("values" not in p for p in parameters.values()):
        raise SweepError(f"sweep={name}: a grid needs discrete parameters (choice(...) or a,b,c), not intervals")
    parameters.update({k: {"value": v} for k, v in fixed.items()})
    config = {"name": str(cfg.get("sweep_name") or name), "program": AGENT_PROGRAM, "method": method,
              "metric": {"name": str(cfg.objective), "goal": direction}, "parameters": parameters,
              "command": ["${env}", "foundry-train", f"sweep={name}", "logger=wandb", "logger.offline=false",
                          "${args_no_hyphens}"]}
    config.update({k: v for k, v in (("project", project), ("entity", entity)) if v})
    return config


def wandb_violations(config: dict) -> list[str]:
    """W&B's own sweep-config schema check (the `sweeps` package behind `wandb sweep`), offline."""
    import warnings

    with warnings.catch_warnings():  # sweeps 0.2 declares a pydantic-v1 config key; harmless
        warnings.simplefilter("ignore", UserWarning)
        from sweeps import schema_violations_from_proposed_config

    return schema_violations_from_proposed_config(config)


def build_wandb_sweep(path: str | Path, project: str | None = None, entity: str | None = None) -> tuple[dict, int]:
    """(validated W&B sweep config, the sweep file's trial count) for a conf/sweep file."""
    cfg = compose_sweep(path)
    config = to_wandb_sweep(cfg, Path(path).stem, project, entity)
    problems = wandb_violations(config)
    if problems:
        raise SweepError(f"{path}: W&B rejects the sweep config: {'; '.join(problems)}")
    return config, int(cfg.hydra.sweeper.get("n_trials") or 0)


def create_wandb_sweep(config: dict, project: str | None, entity: str | None) -> str:
    """Register the sweep with the W&B server (needs network and `wandb login`)."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "dryrun", "disabled"):
        raise SweepError(f"WANDB_MODE={mode}: creating a sweep needs the W&B server; unset WANDB_MODE and "
                         "`wandb login`, or drop --create and run `wandb sweep FILE` where you are online")
    import wandb

    return wandb.sweep(sweep=config, project=project, entity=entity)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="foundry-sweep", description="Sweep helpers (see train/ops/sweep.py).")
    sub = ap.add_subparsers(dest="command", required=True)
    wb = sub.add_parser("wandb", help="print (or --create) the W&B sweep for a conf/sweep/*.yaml file")
    wb.add_argument("sweep_file")
    wb.add_argument("--project", default=None)
    wb.add_argument("--entity", default=None)
    wb.add_argument("--out", help="also write the W&B sweep config here (for `wandb sweep FILE`)")
    wb.add_argument("--create", action="store_true", help="register it with W&B (online) and print the agent command")
    sm = sub.add_parser("summary", help="print (and rewrite) a multirun's sweep_summary.json")
    sm.add_argument("sweep_dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "summary":
            if not Path(args.sweep_dir, "sweep_summary.json").is_file():
                raise SweepError(f"{args.sweep_dir}: no sweep_summary.json; give a folder made by foundry-train -m")
            old = json.loads(Path(args.sweep_dir, "sweep_summary.json").read_text())
            print(format_summary(write_summary(Path(args.sweep_dir), old["objective"], old["direction"])))
            return 0
        config, n_trials = build_wandb_sweep(args.sweep_file, args.project, args.entity)
        text = redact(yaml.safe_dump(config, sort_keys=False))
        print(text, end="")
        if args.out:
            Path(args.out).write_text(text)
        print(f"# valid W&B sweep config ({config['method']}, {len(config['parameters'])} parameters). Online: "
              f"`wandb sweep {args.out or 'FILE'}`, then `wandb agent --count {n_trials or 'N'} ENTITY/PROJECT/ID`",
              file=sys.stderr)
        if args.create:
            sweep_id = create_wandb_sweep(config, args.project, args.entity)
            where = "/".join(x for x in (args.entity, args.project, sweep_id) if x)
            print(f"created sweep {sweep_id}; run agents with: wandb agent --count {n_trials or 'N'} {where}",
                  file=sys.stderr)
    except SweepError as e:
        print(f"foundry-sweep: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the W&B client failing offline, a bad login, ...: one line, no credentials
        print(f"foundry-sweep: {type(e).__name__}: {redact(str(e)).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
