"""Strategies are a config choice (conf/strategy/): single device, DDP, FSDP, DeepSpeed ZeRO-2/3 with offload.

Only the trained network enters a strategy's wrapper: `DiffusionModule` holds frozen encoders outside its module tree,
so ZeRO-3 never partitions a frozen text encoder or VAE, FSDP never flattens them and DDP never all-reduces them;
they stay whole on every rank in the training precision. Reference models and teachers are held the same way.

`full_parameters` is the one place that knows how a strategy shards parameters: the EMA callback, the LCM target and
SPIN's opponent read the trained weights through it, so each sees the whole tensor under ZeRO-3 and FSDP too.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.fabric.utilities.seed import reset_seed

log = logging.getLogger(__name__)

META_FILE = "foundry.json"  # beside every sharded checkpoint: what wrote it and at which step


def is_deepspeed(strategy: Any) -> bool:
    return isinstance(strategy, DeepSpeedStrategy)


def is_zero3(strategy: Any) -> bool:
    return is_deepspeed(strategy) and strategy.config is not None and strategy.zero_stage_3


def is_fsdp(strategy: Any) -> bool:
    return isinstance(strategy, FSDPStrategy)


def shards_parameters(strategy: Any) -> bool:
    """True when a rank holds only a slice of each parameter (ZeRO-3, FSDP): reads must gather first."""
    return is_zero3(strategy) or is_fsdp(strategy)


def offloads_optimizer(trainer) -> bool:
    """True under a DeepSpeed strategy whose config offloads the optimizer state to the CPU."""
    config = getattr(getattr(trainer, "strategy", None), "config", None) if trainer is not None else None
    offload = ((config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def is_fp16(trainer) -> bool:
    """fp16 precision (mixed or true): its loss scaler, not the non-finite guard, handles overflowing steps."""
    return str(trainer.precision).startswith("16")


def accumulation_boundary(strategy: Any) -> bool:
    """True when this micro-batch's optimizer step is applied. Lightning calls the step every micro-batch under
    DeepSpeed, which counts micro-steps itself and steps only at its gradient-accumulation boundary."""
    if is_deepspeed(strategy):
        return bool(strategy.deepspeed_engine.is_gradient_accumulation_boundary())
    return True


def step_rejected_by_strategy(strategy: Any) -> bool:
    """True when the strategy itself dropped the last optimizer step: DeepSpeed does when the global (all-reduced)
    gradient norm is not finite (fp32 always; bf16 with `check_grad_overflow`, which `DeepSpeed` below sets)."""
    return is_deepspeed(strategy) and not strategy.deepspeed_engine.was_step_applied()


@contextlib.contextmanager
def full_parameters(module: Any, params: list[torch.nn.Parameter] | None = None,
                    writeback: bool = False) -> Iterator[None]:
    """Inside the block, `params` (default: all of the module's) hold their whole values on every rank.

    Every rank must enter (it is a collective under ZeRO-3 and FSDP). With `writeback`, changes made inside are kept
    (ZeRO-3: rank 0's values are broadcast and re-partitioned; FSDP: each rank writes back its own shard).
    Unsharded strategies: a no-op.
    """
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    if is_zero3(strategy):
        import deepspeed

        params = list(module.parameters()) if params is None else params
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if writeback else None):
            yield
    elif is_fsdp(strategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(strategy.model, writeback=writeback, recurse=True):
            yield
    else:
        yield


class DeepSpeed(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy configured by a DeepSpeed config dict (conf/strategy/deepspeed_*.yaml), plus:

    - frozen parameters are left out of checkpoints (a LoRA checkpoint is megabytes, not the whole base);
    - checkpoint folders are written as `<name>.tmp` on every rank and renamed by rank 0 once all shards are on disk,
      with `foundry.json` (step, ZeRO stage, world size) beside them: a crash mid-write leaves the last one whole;
    - non-finite gradients: bf16 runs check for overflow as fp16 and fp32 runs do, so DeepSpeed drops such a step;
    - CPU: DeepSpeed runs on CPU with gloo (tests, CPU machines). Lightning refuses it with three CUDA assumptions
      (an accelerator type check, device indices, `device_rank=None`); on a CPU accelerator they are lifted here.
    """

    def __init__(self, config: dict[str, Any], activation_checkpointing: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("exclude_frozen_parameters", True)
        config = copy.deepcopy(dict(config))
        self.activation_checkpointing = bool(activation_checkpointing)
        super().__init__(config=config, **kwargs)

    @property
    def stage(self) -> int:
        return int((self.config or {}).get("zero_optimization", {}).get("stage", 0))

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    # ----- CPU: the three CUDA assumptions -----
    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        DDPStrategy.setup_environment(self)  # skips only DeepSpeedStrategy's CUDA-accelerator check

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        reset_seed()  # CPU devices carry no index, which Lightning's device-index validation requires
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # Lightning passes None: `None >= 0` fails
            config=self.config, model=model, model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer

    # ----- config -----
    def _format_config(self) -> None:
        super()._format_config()
        if "bf16" in self.config and self.config["bf16"].get("enabled"):
            self.config["bf16"].setdefault("check_grad_overflow", True)  # a NaN step is dropped, not applied

    def _set_deepspeed_activation_checkpointing(self) -> None:
        super()._set_deepspeed_activation_checkpointing()
        if self.activation_checkpointing and self.lightning_module is not None:
            unet = getattr(self.lightning_module, "unet", None)
            if unet is not None and hasattr(unet, "enable_gradient_checkpointing"):
                unet.enable_gradient_checkpointing()

    # ----- atomic checkpoint folders -----
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(final.name + ".tmp")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("foundry_ckpt_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("foundry_ckpt_written")
        if self.is_global_zero:
            meta = {"format": "deepspeed", "zero_stage": self.stage, "world_size": self.world_size,
                    "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)  # a crash between the two renames leaves <name>.old, which resume accepts
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("foundry_ckpt_renamed")


class FSDP(FSDPStrategy):
    """Lightning's FSDPStrategy with what diffusion models need: original parameters kept (a LoRA over a frozen base
    mixes trainable and frozen tensors in one unit), and the UNet's blocks as the wrapping units."""

    def __init__(self, wrap_blocks: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        if wrap_blocks and "auto_wrap_policy" not in kwargs:
            kwargs["auto_wrap_policy"] = diffusion_block_types()
        if kwargs.get("activation_checkpointing_policy") is True:
            kwargs["activation_checkpointing_policy"] = diffusion_block_types()
        super().__init__(**kwargs)


def diffusion_block_types() -> set[type]:
    """The repeated blocks of diffusers backbones: the natural FSDP and activation-checkpointing units."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return {BasicTransformerBlock, ResnetBlock2D}
