"""The one place that turns a composed config into the trained module, and a checkpoint back into it.

`_target_` only at component roots. Building and restoring live together because they recurse into each other by
design: `model.pretrained=<run dir>` builds on a module restored from that run, which is rebuilt from its own saved
config. The trainer, loggers, callbacks and data around the module are assembled in train/ops/trainer.py.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from models.adapters import AdapterSpec, apply_adapter, has_peft_adapter, merge_adapters
from models.block_swap import BlockSwap
from models.components import Components, apply_speed_switches, build_components, load_pretrained
from models.export import make_pipeline
from models.quantize import quantize_frozen
from train.checkpoint import (check_state_dict, find_checkpoint, is_diffusers_folder, is_training_checkpoint,
                              read_checkpoint)
from train.diffusion import DiffusionCore
from train.module import DiffusionModule
from train.plan_config import plan_for_config
from train.redaction import scrub

log = logging.getLogger(__name__)

# training-time memory settings: popped here, dropped when a trained module is rebuilt to sample, evaluate or export
MEMORY_DEFAULTS = {"quantize": "none", "quantize_text_encoder": False, "block_swap": 0}
SPEED_KEYS = ("compile", "channels_last")

def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    return scrub(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


def _kwargs(node: DictConfig | None) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def build_base(cfg: DictConfig) -> Components:
    """The `model` group -> components as loaded: no adapter, no memory or speed settings. `model.pretrained` may be
    a diffusers folder, a .ckpt or a run directory (continued training and fine-tuning start from a foundry run
    without an export step)."""
    kwargs = {k: v for k, v in _kwargs(cfg.model).items() if k not in (*MEMORY_DEFAULTS, *SPEED_KEYS)}
    kwargs["gradient_checkpointing"] = kwargs.get("gradient_checkpointing") is True
    pretrained = kwargs.get("pretrained")
    if pretrained and is_training_checkpoint(pretrained):
        kwargs["base"], kwargs["pretrained"] = load_components(pretrained, use_ema=True), None
    return build_components(**kwargs)


def this_gpu_gb(cfg: DictConfig) -> float | None:
    """The memory of the GPU this process will train on (GiB), when it is one: what `auto` plans against, rather
    than `launcher.gpu_memory_gb` (the size planned for from elsewhere)."""
    if OmegaConf.select(cfg, "trainer.accelerator") == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30


def build_model(cfg: DictConfig) -> Components:
    """The base, then the memory settings, the adapter and the speed switches."""
    memory = {key: OmegaConf.select(cfg, f"model.{key}", default=default) for key, default in MEMORY_DEFAULTS.items()}
    components = build_base(cfg)
    if OmegaConf.select(cfg, "model.gradient_checkpointing") == "auto":
        try:
            plan = plan_for_config(cfg, components, gpu_memory_gb=this_gpu_gb(cfg), suggest=False)
        except Exception as err:  # noqa: BLE001 - any model the trace cannot run: the safe choice, said in one line
            plan = None
            log.warning("model.gradient_checkpointing=auto: no memory plan for this model (%s: %s); checkpointing on "
                        "(set model.gradient_checkpointing=false to turn it off)", type(err).__name__, err)
        if plan is None or not plan.fits:  # planned without it: on only when the run needs it
            components.unet.enable_gradient_checkpointing()
        if plan is not None:
            log.info("model.gradient_checkpointing=auto: %s (planned peak %.2f GiB of %g GB without it)",
                     "off" if plan.fits else "on", plan.peak / 2**30, plan.gpu_memory_gb)
    spec = adapter_spec(cfg)
    if memory["quantize"] != "none":  # the frozen base, before the adapter wraps its layers
        if spec.enabled:
            components.unet.requires_grad_(False)
        quantize_frozen(components.unet, memory["quantize"])
        if memory["quantize_text_encoder"] and not any(p.requires_grad for p in components.text_encoder.parameters()):
            quantize_frozen(components.text_encoder, memory["quantize"])
    apply_adapter(components, spec)
    if memory["block_swap"]:
        components.block_swap = BlockSwap(components.unet, int(memory["block_swap"]))
    speed = {key: OmegaConf.select(cfg, f"model.{key}", default=False) for key in SPEED_KEYS}
    apply_speed_switches(components.unet, **speed)  # after the adapter: compile what actually runs
    return components


def adapter_spec(cfg: DictConfig) -> AdapterSpec:
    return AdapterSpec(**_kwargs(cfg.get("adapter"))) if cfg.get("adapter") else AdapterSpec()


def build_module(cfg: DictConfig) -> DiffusionModule:
    """Components + core + method -> the LightningModule (also used to rebuild from a checkpoint)."""
    components = build_model(cfg)
    # the loss group's keys are DiffusionCore's arguments (`type` is `loss_type`); its defaults live in the yaml
    core = DiffusionCore(components.scheduler, shift_for=partial(components.spec.training_shift, components),
                         **{("loss_type" if k == "type" else k): v for k, v in _kwargs(cfg.loss).items()})
    method = instantiate(cfg.method, _convert_="all")
    module = DiffusionModule(components, core, method, optimizer=_kwargs(cfg.optimizer),
                             lr_scheduler=_kwargs(cfg.lr_scheduler), seed=cfg.seed, masking=_kwargs(cfg.get("masking")),
                             repa=_kwargs(cfg.get("repa")),
                             **_kwargs(cfg.module))
    log.info("method %s, %d trainable parameters", method.name, sum(p.numel() for p in module.trainable_parameters()))
    return module


# ----- restoring a trained module (the one place) -----
def load_module(path: str | Path, use_ema: bool = True):
    """Rebuild the trained module from a checkpoint (EMA weights swapped in when present and asked for)."""
    ckpt = read_checkpoint(path)
    cfg_dict = ckpt.get("foundry", {}).get("config")
    if cfg_dict is None:
        raise ValueError(f"'{path}' has no foundry config; was it written by foundry-train?")
    cfg = OmegaConf.create(cfg_dict)
    # Training-only settings are dropped: sampling and export need neither REPA's projector nor its frozen encoder
    # (nor the encoder folder). The projector is registered last, so its EMA entries are the tail of the shadow list.
    n_repa = sum(v.numel() > 0 for k, v in ckpt["state_dict"].items() if k.startswith("repa."))
    if OmegaConf.select(cfg, "repa.encoder"):
        cfg.repa.encoder = None
    if OmegaConf.select(cfg, "model.compile"):  # sampling calls vary in shape: eager is faster than recompiling
        cfg.model.compile = False
    for key, default in MEMORY_DEFAULTS.items():  # a QLoRA adapter is used over its base in full precision
        if OmegaConf.select(cfg, f"model.{key}") not in (None, default):
            cfg.model[key] = default
    if OmegaConf.select(cfg, "model.gradient_checkpointing") is not None:  # sampling and export: no backward to plan
        cfg.model.gradient_checkpointing = False
    module = build_module(cfg)
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("repa.")}
    check_state_dict(module, state, ckpt["foundry"].get("frozen_fingerprint"))
    module.load_state_dict(state, strict=False)
    ema_state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("EMA")), None)
    if use_ema and ema_state and ema_state.get("shadow_params"):
        params = module.trainable_parameters()
        shadow = ema_state["shadow_params"]
        for p, s in zip(params, shadow[: len(shadow) - n_repa], strict=True):
            p.data.copy_(s.to(p.dtype))
        log.info("loaded EMA weights from %s (step %s)", path, ckpt.get("global_step"))
    module.eval()
    return module, cfg


def load_components(path: str | Path, use_ema: bool = True, merge: bool = True):
    """Components from a .ckpt, a run directory, or a diffusers folder (exported or pretrained).

    A checkpoint trained with an adapter comes back with the adapter folded into the weights (`merge`), so the
    result is a plain model: what a sampler, an export or the next run's base expects.
    """
    if is_diffusers_folder(path):
        return load_pretrained(path)
    module, _ = load_module(find_checkpoint(path), use_ema)
    comps = module.components
    if merge:
        for model in (comps.unet, comps.text_encoder):
            if has_peft_adapter(model):
                merge_adapters(model)
    return comps


def load_pipeline(path: str | Path, use_ema: bool = True, sampler: str = "ddim"):
    """A ready-to-call pipeline from a checkpoint or an exported/pretrained folder."""
    return make_pipeline(load_components(path, use_ema), sampler)
