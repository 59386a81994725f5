"""`foundry-train`: the Hydra app. With no arguments it trains the digits demo on this machine.

`foundry-train -m sweep=NAME` runs a sweep (conf/sweep/NAME.yaml); each trial returns `objective`.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("foundry")


def default_run_name() -> str:
    """Same name on every process of one launch: set by the first process, or by the job scheduler.

    Sweep trials are named from the sweep and their overrides (train/tracking.py) and never through the
    environment, which every trial of an in-process multirun shares.
    """
    from train.tracking import in_multirun, run_name_from_context, single_run_name

    name = run_name_from_context()
    if name is not None and in_multirun():
        return name
    name = name or single_run_name()
    os.environ["FOUNDRY_RUN_NAME"] = name  # Lightning's child processes inherit it
    return name


def register_resolvers() -> None:
    from train.sweep import objective_direction

    if not OmegaConf.has_resolver("foundry_run_name"):
        OmegaConf.register_new_resolver("foundry_run_name", default_run_name, use_cache=True)
    if not OmegaConf.has_resolver("foundry_direction"):
        OmegaConf.register_new_resolver("foundry_direction", objective_direction)


def _bind_run_dir(cfg: DictConfig) -> None:
    """paths.run_dir := the folder Hydra made for this job (a trial's own folder under multirun)."""
    from train.tracking import hydra_config

    hc = hydra_config()
    if hc is not None and hc.runtime.output_dir:
        with open_dict(cfg):
            cfg.paths.run_dir = str(hc.runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from train.nonfinite import NonFiniteError
    from train.run import train
    from train.sweep import check_trial_launch, objective_value
    from train.tracking import close_wandb, in_multirun

    multirun = in_multirun()
    _bind_run_dir(cfg)
    ok = False
    try:
        check_trial_launch(cfg, multirun)
        summary = train(cfg)
        ok = True
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming it and the fix
        log.error("foundry-train: %s", e)
        if multirun:
            raise  # the sweeper records this trial as failed and goes on with the next
        sys.exit(2)
    except NonFiniteError as e:  # diverged: the message says what to change; the last good checkpoint is kept
        log.error("foundry-train: %s", e)
        if multirun:
            raise
        sys.exit(3)
    finally:
        close_wandb(ok)
    if summary.get("dry_run"):
        return None
    objective = objective_value(summary, cfg.objective, strict=multirun)
    log.info("objective %s = %s", cfg.objective, objective)
    return objective


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
