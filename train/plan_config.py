"""The memory planner on a composed run config (train/plan.py does the planning): which settings the run would use,
per device, and the plan for them. `foundry-plan`, `launcher.dry_run=true` and `model.gradient_checkpointing=auto`
come through here."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from models.adapters import AdapterSpec
from models.components import Components
from models.real_sizes import REAL_SIZES
from train.plan import (ONE_PASS_METHODS, MemoryPlan, Settings, parts_for_components, parts_for_real_size,
                        plan_memory)


def _select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def is_cached(urls: Any) -> bool:
    """True when the configured shards are a latent cache (`foundry-shards encode` writes cache.json beside them)."""
    if not urls or not isinstance(urls, str):
        return False
    folder = Path(urls.split("{")[0].split("*")[0]).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    return (folder / "cache.json").is_file()


def settings_from_config(cfg: DictConfig, resolution: int) -> Settings:
    """The plan's settings as the run would use them (per device)."""
    accelerator = str(_select(cfg, "trainer.accelerator", "auto"))
    cuda = accelerator != "cpu"  # `auto` plans for the GPU the run is meant for, also from a machine without one
    zero = _select(cfg, "strategy.config.zero_optimization", {}) or {}
    devices = _select(cfg, "trainer.devices", 1)
    devices = devices if isinstance(devices, int) else (torch.cuda.device_count() or 1)
    checkpointing = _select(cfg, "model.gradient_checkpointing", False)
    return Settings(
        batch=int(_select(cfg, "data.batch_size", 1)), resolution=int(resolution),
        precision=str(_select(cfg, "trainer.precision", "32-true")),
        adapter=AdapterSpec(**OmegaConf.to_container(cfg.adapter, resolve=True)) if cfg.get("adapter") else AdapterSpec(),
        gradient_checkpointing=checkpointing is True, quantize=str(_select(cfg, "model.quantize", "none")),
        quantize_text_encoder=bool(_select(cfg, "model.quantize_text_encoder", False)),
        block_swap=int(_select(cfg, "model.block_swap", 0)), optimizer=str(_select(cfg, "optimizer.name", "adamw")),
        zero_stage=int(zero.get("stage", 0)) if str(_select(cfg, "strategy._target_", "")).endswith("DeepSpeed") else 0,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"),
        world_size=devices * int(_select(cfg, "trainer.num_nodes", 1)),
        ema=_select(cfg, "callbacks.ema") is not None, cached=is_cached(_select(cfg, "data.urls")),
        device="cuda" if cuda else "cpu", train_text_encoder=bool(_select(cfg, "model.train_text_encoder", False)))


def plans_real_size(cfg: DictConfig) -> bool:
    """A full-size preset (models/real_sizes.py): planned on the meta device, never built."""
    return _select(cfg, "model.preset") in REAL_SIZES and not _select(cfg, "model.pretrained")


def plan_for_config(cfg: DictConfig, comps: Components | None = None, gpu_memory_gb: float | None = None,
                    suggest: bool = True) -> MemoryPlan:
    """The plan for a composed run config: from its built base components (`comps`: built without the adapter and
    memory settings, which the plan applies itself), or on the meta device for a full-size preset."""
    budget = gpu_memory_gb or float(_select(cfg, "launcher.gpu_memory_gb", 24))
    if plans_real_size(cfg):
        preset = _select(cfg, "model.preset")
        parts = parts_for_real_size(preset)
        resolution = _select(cfg, "model.resolution") or REAL_SIZES[preset].resolution
    else:
        if comps is None:
            raise ValueError("plan_for_config: pass the run's base components (train.build.build_base)")
        parts, resolution = parts_for_components(comps), comps.resolution
    settings = settings_from_config(cfg, resolution)
    plan = plan_memory(parts, settings, budget, suggest=suggest)
    if settings.train_text_encoder:
        plan.notes.append("model.train_text_encoder=true: the text encoder's gradients and optimizer state are not "
                          "counted")
    if str(_select(cfg, "method._target_", "")).rsplit(".", 1)[-1] not in ONE_PASS_METHODS:
        plan.notes.append("this method runs more than one denoiser pass per step (teacher, reference or rollouts): "
                          "their activations are not counted")
    return plan
