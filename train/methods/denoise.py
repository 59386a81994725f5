"""Plain text-to-image denoising: the base-training objective (epsilon, v or flow; min-SNR, offset noise)."""
from __future__ import annotations

from typing import Any

import torch

from train.methods.base import Method


def denoising_loss(module, x0: torch.Tensor, input_ids: torch.Tensor, noise: torch.Tensor | None = None,
                   t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The core's per-sample loss for clean `x0` (the UNet's space) under its captions; noise and timesteps are drawn
    from the module's generator unless given (reflow's couplings give the noise, one-step distillation the time)."""
    core = module.core
    cond = module.encode_text(input_ids)
    d = core.noised(x0, module.noise_generator, t=t, noise=noise)
    with module.patch_masking(d.x_t) as mask:  # transformer + masking.ratio > 0: kept patches only (else None)
        pred = module.unet(d.x_t, d.t, encoder_hidden_states=cond).sample
    return {"loss": core.per_sample_loss(pred, d.target, d.t, mask), "timestep": d.t.float()}


class Denoise(Method):
    name = "denoise"
    objectives = ("epsilon", "v_prediction", "flow")

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        return denoising_loss(module, module.encode_images(batch["pixels"]), batch["input_ids"])
