"""Guidance distillation (Meng et al. stage one; "Efficient Distillation of Classifier-Free Guidance using
Adapters"): a student that takes the guidance weight as an input reproduces the frozen teacher's guided output
in one forward pass instead of two. Full (every weight trains) or adapter-only (a LoRA plus the guidance
embedding's projection train; the teacher is the base with the adapter off).
"""
from __future__ import annotations

from typing import Any

import torch

from models.pipeline import guidance_embedding
from train.methods.base import Method
from train.sampling import guided


class GuidanceDistill(Method):
    """`teacher` is informational here: experiments load it as the model (model.pretrained=${method.teacher}),
    so the student starts as the teacher and the teacher is the frozen reference."""

    name = "guidance_distill"

    def __init__(self, guidance_min: float = 1.0, guidance_max: float = 5.0, teacher: str | None = None):
        if not 1.0 <= guidance_min <= guidance_max:
            raise ValueError(f"method.guidance_min/max={guidance_min}/{guidance_max}: expected 1 <= min <= max")
        self.g_min, self.g_max = float(guidance_min), float(guidance_max)

    def setup(self, module) -> None:
        self.w_dim = module.unet.config.time_cond_proj_dim
        if not self.w_dim:
            raise ValueError("method=guidance_distill: set model.guidance_embedding=256 (the student takes the "
                             "guidance weight as an input)")
        module.require_reference()
        if module.has_adapter:  # the new guidance input must learn too
            module.unet.time_embedding.cond_proj.requires_grad_(True)

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        core, gen = module.core, module.noise_generator
        x0 = module.batch_x0(batch)
        n, ids = x0.shape[0], batch["input_ids"]
        d = core.noised(x0, gen)
        g = self.g_min + torch.rand(n, generator=gen, device=x0.device) * (self.g_max - self.g_min)
        with module.reference() as ref:
            cond, uncond = ref.encode_text(ids), ref.encode_text(module.empty_prompt_ids(n))
            target = guided(ref.unet, d.x_t, d.t, cond, uncond, g)
        w_emb = guidance_embedding(g - 1.0, self.w_dim).to(x0.dtype)
        pred = module.unet(d.x_t, d.t, encoder_hidden_states=module.batch_context(batch), timestep_cond=w_emb).sample
        return {"loss": core.per_sample_error(pred, target), "guidance": g}
