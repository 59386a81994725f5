"""Assemble a run around the trained module: data, callbacks, loggers, strategy, plugins and the Lightning trainer."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from callbacks.last_checkpoint import LastCheckpoint
from callbacks.progress_line import ProgressLine
from callbacks.run_status import RunStatus
from train.build import _kwargs, resolved_config
from train.checkpoint import AtomicCheckpointIO
from train.module import DiffusionModule
from train.ops.csvlog import ResumableCSVLogger
from train.ops.tracking import git_state, scrubbed_argv, wandb_identity


def build_datamodule(cfg: DictConfig, module: DiffusionModule) -> L.LightningDataModule:
    """The data group; data that needs the model (DreamBooth class images, rollout prompts) gets it here."""
    comps = module.components
    native = {"resolution": comps.resolution} if cfg.data.get("resolution") is None else {}
    comps.spec.check_resolution(comps, int(cfg.data.get("resolution") or comps.resolution))  # packing, VAE factor
    datamodule = instantiate(cfg.data, _convert_="all", **native)  # resolution null: the model's native size;
    # _convert_=all: plain containers, so checkpoints (which store the data hyperparameters) load weights-only
    datamodule.set_tokenizer(module.components.tokenizer)
    given = getattr(datamodule, "urls", None) is not None or getattr(datamodule, "mixture_cfg", None)
    if given and hasattr(datamodule, "check_model"):
        # cached-latent shards must match this model's encoders: refused here, before any training
        text_trains = any(p.requires_grad for p in module.text_encoder.parameters())
        datamodule.check_model(module.components, text_trains)
    if hasattr(datamodule, "attach_model"):
        datamodule.attach_model(module)
    return datamodule


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    callbacks = []
    for node in (cfg.get("callbacks") or {}).values():  # `enabled: false` switches one off, keeping its settings
        node = OmegaConf.to_container(node, resolve=True) if node is not None else None
        if node is not None and node.pop("enabled", True):
            callbacks.append(instantiate(node))
    callbacks.append(LastCheckpoint())  # always on: final state saved; a preempted run loses at most a batch
    callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}",
                                     auto_insert_metric_name=False, every_n_train_steps=cfg.checkpoint.every_n_steps,
                                     save_top_k=cfg.checkpoint.keep_last, monitor="step", mode="max", save_last=True))
    return callbacks


def build_logger(cfg: DictConfig):
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return False
    identity: dict[str, Any] = {}
    if "WandbLogger" in node._target_:
        os.environ.setdefault("WANDB_SILENT", "true")
        if node.get("offline", True):
            os.environ["WANDB_MODE"] = "offline"
        identity = wandb_identity(cfg)  # group / job_type / tags per experiment and sweep
    logger = instantiate(node, **identity)
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)  # Lightning passes it; W&B warns that it is ignored
    git = git_state() if cfg.get("tracking", {}).get("git", True) else {}
    with scrubbed_argv():  # the first call starts the W&B run, which records the command line
        logger.log_hyperparams({**resolved_config(cfg), "git": {k: git.get(k) for k in ("commit", "branch", "dirty")}})
    if cfg.get("tracking", {}).get("csv", False) and "CSVLogger" not in node._target_:
        # the same metrics as plain CSV beside W&B: foundry-report and scripts read them without a W&B install
        return [logger, ResumableCSVLogger(save_dir=cfg.paths.run_dir, name="csv", version="")]
    return logger


def build_strategy(cfg: DictConfig):
    """conf/strategy/: a Lightning strategy name, or a strategy object (train/strategies.py) built from its node."""
    node = cfg.get("strategy") or {}
    if "_target_" in node:
        strategy = instantiate(node, _convert_="all")  # plain dicts: DeepSpeed edits and serialises its config
        if isinstance(getattr(strategy, "config", None), dict):  # DeepSpeed: our loaders batch inside the stream
            strategy.config.setdefault("train_micro_batch_size_per_gpu", int(cfg.data.batch_size))
        return strategy
    return node.get("name", "auto")


def build_plugins() -> list[Any]:
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # our LastCheckpoint saves at a batch boundary and requeues (callbacks/last_checkpoint)
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    kwargs, callbacks = _kwargs(cfg.trainer), build_callbacks(cfg, run_dir)
    callbacks.append(RunStatus(run_dir))  # RUN/status.json: state, step, ETA (foundry-ui, scripts)
    if not sys.stdout.isatty():  # a log file: a plain line every 30 s instead of a bar that shows only at the end
        kwargs["enable_progress_bar"] = False
        callbacks.append(ProgressLine())
    return L.Trainer(**kwargs, default_root_dir=str(run_dir), max_epochs=-1, num_sanity_val_steps=0,
                     callbacks=callbacks, logger=build_logger(cfg), strategy=build_strategy(cfg), plugins=build_plugins())
