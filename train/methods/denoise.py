"""Plain text-to-image denoising: the base-training objective (epsilon, v or flow; min-SNR, offset noise)."""
from __future__ import annotations

from typing import Any

import torch

from train.methods.base import Method


def denoising_loss(module, x0: torch.Tensor, input_ids: torch.Tensor | None, noise: torch.Tensor | None = None,
                   t: torch.Tensor | None = None, images: torch.Tensor | None = None,
                   cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The core's per-sample loss for clean `x0` (the UNet's space) under its captions; noise and timesteps are drawn
    from the module's generator unless given (reflow's couplings give the noise, one-step distillation the time).

    The base-training recipes act here, so every method built on this loss gets them: patch masking (loss on the kept
    patches) and REPA (alignment of a hidden state with a frozen encoder's features of the clean `images`, [-1, 1];
    pixel-space models default to `x0`). `cond` is the text context when the caller has it (cached embeddings);
    otherwise the text encoder runs on `input_ids`."""
    core = module.core
    cond = cond if cond is not None else module.encode_text(input_ids)
    d = core.noised(x0, module.noise_generator, t=t, noise=noise)
    out = {}
    with module.patch_masking(d.x_t) as mask, module.alignment() as repa:  # each None unless configured
        pred = module.unet(d.x_t, d.t, encoder_hidden_states=cond).sample
        loss = core.per_sample_loss(pred, d.target, d.t, mask)
        if repa is not None:
            images = images if images is not None else (x0 if module.vae is None else None)
            if images is None:
                raise ValueError(f"repa.encoder: method={module.method_name} gives no clean images to align with on "
                                 "a latent model; set repa.encoder=null for it")
            out["repa_loss"] = repa.loss(images, d.x_t.shape, module.kept_patches if mask is not None else None)
            loss = loss + out["repa_loss"]
    return {"loss": loss, "timestep": d.t.float(), **out}


class Denoise(Method):
    name = "denoise"
    objectives = ("epsilon", "v_prediction", "flow")

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        return denoising_loss(module, module.batch_x0(batch), batch["input_ids"], images=batch.get("pixels"),
                              cond=module.batch_context(batch))
