"""`foundry-train`: the Hydra app. With no arguments it trains the digits demo on this machine."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("foundry")


def default_run_name() -> str:
    """Same name on every process of one launch: set by the first process, or by the job scheduler."""
    for var in ("FOUNDRY_RUN_NAME", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            name = value if var == "FOUNDRY_RUN_NAME" else f"job-{value}"
            break
    else:
        name = time.strftime("run-%Y%m%d-%H%M%S")
    os.environ["FOUNDRY_RUN_NAME"] = name  # Lightning's child processes inherit it
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("foundry_run_name"):
        OmegaConf.register_new_resolver("foundry_run_name", default_run_name, use_cache=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from train.run import train

    try:
        summary = train(cfg)
    except (FileNotFoundError, ValueError) as e:  # bad input: one line naming it and the fix
        log.error("foundry-train: %s", e)
        sys.exit(2)
    objective = summary.get(cfg.objective)
    log.info("objective %s = %s", cfg.objective, objective)
    return objective


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
