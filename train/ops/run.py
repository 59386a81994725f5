"""build -> fit -> summarize. Importable, so tests drive the exact code the CLI runs."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from data.webdataset import expand_urls
from train.build import build_module, resolved_config
from train.checkpoint import checkpoint_step, resolve_ckpt_path
from train.ops.launch import apply_plan, dry_run, make_plan
from train.ops.tracking import finish_run, record_run
from train.ops.trainer import build_datamodule, build_trainer
from train.ops.validate import check_offload_room, fit_short_run, validate

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a terminated job


def current_run_dir(cfg: DictConfig) -> Path:
    """Hydra's run directory when Hydra is running (identical on every rank), else paths.run_dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.run_dir)


def configured_urls(cfg: DictConfig) -> list[str] | None:
    """The shard list the user configured (None: the built-in digits world or a folder the data module builds)."""
    return expand_urls(cfg.data.urls) if cfg.data.get("urls") else None


def train(cfg: DictConfig) -> dict[str, Any]:
    note = fit_short_run(cfg)  # short runs are allowed: their warmup shrinks, with one line saying so
    if note:
        log.warning(note)
    validate(cfg)  # bad values fail here, in one line, before any model or worker is built
    run_dir = current_run_dir(cfg)
    urls = configured_urls(cfg)
    if cfg.get("launcher") and cfg.launcher.get("dry_run"):
        return {"dry_run": dry_run(cfg, urls, run_dir)}
    plan = make_plan(cfg, urls)
    apply_plan(cfg, plan)  # global batch -> per-device batch and accumulation; shards vs ranks
    run_dir.mkdir(parents=True, exist_ok=True)
    record_run(cfg, run_dir)  # resolved config + git commit/diff, before anything can fail
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    module.run_config = resolved_config(cfg)
    check_offload_room(cfg, sum(p.numel() for p in module.trainable_parameters()),
                       sum(p.numel() for p in module.parameters()), plan.world_size)
    datamodule = build_datamodule(cfg, module)
    datamodule.setup("fit")  # bad shard paths fail here, before the trainer starts any worker
    trainer = build_trainer(cfg, run_dir)
    ckpt = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    if ckpt:
        log.info("resuming from %s at step %s", ckpt, checkpoint_step(ckpt))
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except SIGTERMException:
        raise SystemExit(PREEMPTED_EXIT_CODE) from None  # the checkpoint is saved; the scheduler may requeue
    summary = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    for cb in trainer.callbacks:
        summary.update(getattr(cb, "last_metrics", {}))
    summary.update({"global_step": trainer.global_step, "train_seconds": time.perf_counter() - t0,
                    "run_dir": str(run_dir), "resumed_from": ckpt})
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        log.info("run summary: %s", run_dir / "summary.json")
    finish_run(trainer, cfg, run_dir, summary)  # W&B: final metrics, artifacts, close the run (rank 0)
    return summary
