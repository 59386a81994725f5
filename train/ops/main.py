"""`foundry-train`: the Hydra app. With no arguments it trains the digits demo on this machine.

`foundry-train -m sweep=NAME` runs a sweep (conf/sweep/NAME.yaml); each trial returns `objective`.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, open_dict

from train.ops.console import install
from train.ops.listing import listing
from train.ops.objective import check_trial_launch, objective_value
from train.ops.resolvers import CONF_DIR, register_resolvers
from train.ops.tracking import close_wandb, hydra_config, in_multirun

log = logging.getLogger("foundry")


def _bind_run_dir(cfg: DictConfig) -> None:
    """paths.run_dir := the folder Hydra made for this job (a trial's own folder under multirun)."""
    hc = hydra_config()
    if hc is not None and hc.runtime.output_dir:
        with open_dict(cfg):
            cfg.paths.run_dir = str(hc.runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    # lazy: torch, Lightning and diffusers load once a run starts, so `--help`, `--cfg job` and launchers stay fast
    from train.nonfinite import NonFiniteError
    from train.ops.run import train

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
    install()
    if sys.argv[1:] == ["list"]:  # experiments, models, methods, strategies... one line each, from conf/
        print(listing(CONF_DIR))
        return
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
