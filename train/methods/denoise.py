"""Plain text-to-image denoising: the base-training objective (epsilon or v, min-SNR, offset noise)."""
from __future__ import annotations

from typing import Any

import torch

from train.methods.base import Method


class Denoise(Method):
    name = "denoise"

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        core = module.core
        x0 = module.encode_images(batch["pixels"])
        cond = module.encode_text(batch["input_ids"])
        d = core.noised(x0, module.noise_generator)
        pred = module.unet(d.x_t, d.t, encoder_hidden_states=cond).sample
        return {"loss": core.per_sample_loss(pred, d.target, d.t), "timestep": d.t.float()}
