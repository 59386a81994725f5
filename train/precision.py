"""Frozen weights under mixed precision: held in the autocast dtype, as diffusers' training scripts hold theirs
(`weight_dtype`). Under autocast every matmul reads them in that dtype anyway, so this halves the frozen base's memory
(Flux.1-dev: 44 -> 22 GiB for the transformer, 18 -> 9 GiB for T5) and changes no result beyond rounding the frozen
weights once. Trained parameters (an adapter, a full model) stay fp32 for the optimizer. The VAE stays fp32 under fp16
(SDXL's VAE overflows in fp16); bf16 has fp32's range. Quantized weights are left as they are.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.nn.parallel import DistributedDataParallel

from train.strategies import is_fsdp

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def frozen_dtype(precision: str) -> torch.dtype | None:
    """The dtype frozen weights are held in under `precision` (None: as built)."""
    return AUTOCAST.get(str(precision))


def cast_frozen(models: dict[str, torch.nn.Module], precision: str) -> int:
    """Cast the frozen float parameters of `models` (name -> model) to the autocast dtype; returns bytes saved."""
    dtype = frozen_dtype(precision)
    if dtype is None:
        return 0
    saved = 0
    for name, model in models.items():
        if model is None or (name == "vae" and dtype == torch.float16):
            continue
        for p in _frozen_float(model.parameters()):
            saved += p.numel() * (p.element_size() - dtype.itemsize)
            p.data = p.data.to(dtype)
    return saved


def prepare_frozen(module: torch.nn.Module, frozen: dict[str, torch.nn.Module], strategy: Any, precision: str) -> None:
    """Before the strategy wraps `module`: frozen weights to the autocast dtype (not under FSDP, which flattens each
    wrapped block into one dtype), and quantized weights kept out of DDP's start-up broadcast (they are the same on
    every rank, frozen, and DDP cannot view a quantized tensor)."""
    if not is_fsdp(strategy):
        cast_frozen(frozen, precision)
    quantized = [n for n, p in module.named_parameters() if type(p) not in (torch.Tensor, torch.nn.Parameter)]
    if quantized:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, quantized)


def _frozen_float(params: Iterable[torch.nn.Parameter]) -> Iterable[torch.nn.Parameter]:
    for p in params:
        if not p.requires_grad and type(p.data) is torch.Tensor and p.dtype == torch.float32:
            yield p
