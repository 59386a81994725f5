"""The Hydra app's config folder and resolvers, shared by `foundry-train` and `foundry-sweep`."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from train.ops.objective import objective_direction
from train.ops.tracking import in_multirun, run_name_from_context, single_run_name

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("foundry")


def default_run_name() -> str:
    """Same name on every process of one launch: set by the first process, or by the job scheduler.

    Sweep trials are named from the sweep and their overrides (train/ops/tracking.py) and never through the
    environment, which every trial of an in-process multirun shares.
    """
    name = run_name_from_context()
    if name is not None and in_multirun():
        return name
    name = name or single_run_name()
    os.environ["FOUNDRY_RUN_NAME"] = name  # Lightning's child processes inherit it
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("foundry_run_name"):
        OmegaConf.register_new_resolver("foundry_run_name", default_run_name, use_cache=True)
    if not OmegaConf.has_resolver("foundry_direction"):
        OmegaConf.register_new_resolver("foundry_direction", objective_direction)


def compose_config(overrides: list[str], **kwargs):
    """The config `foundry-train` would run with these overrides (Hydra's compose API: no run folder is made)."""
    from hydra import compose, initialize_config_dir  # lazy: Hydra's app machinery only where a config is composed

    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), **kwargs)
