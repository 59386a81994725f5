"""Variational score distillation to a one-step student (SwiftBrush; DMD's distribution matching; SNOOPI's guidance).

The student maps pure noise at t = T to an image in one forward pass (sample it with sampler=lcm, 1 step). Its
samples are noised at a random t; the frozen teacher's (guided) score and a "fake" score, a LoRA over the same
frozen weights trained on the student's own samples, give the gradient (p_fake - p_real) in x0 space, normalised
per sample as DMD does. The teacher is the fake-score network with its LoRA switched off: one frozen copy serves both.
`guidance_min/max` draw the teacher's guidance scale per sample (SNOOPI's random-scale option; min = max: fixed).
`regression_weight` > 0 adds DMD's regression loss on teacher (noise, image) couplings when the data carries them
(data.kind=coupling, written by `foundry-shards couplings`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from models.adapters import AdapterSpec, adapters_disabled, apply_adapter
from models.components import Components
from train.methods.base import Method
from train.sampling import guided


class VSD(Method):
    name = "vsd"

    def __init__(self, guidance_min: float = 3.0, guidance_max: float = 3.0, fake_rank: int = 16,
                 regression_weight: float = 0.0, teacher: str | None = None):
        if not 1.0 <= guidance_min <= guidance_max:
            raise ValueError(f"method.guidance_min/max={guidance_min}/{guidance_max}: expected 1 <= min <= max")
        self.g_min, self.g_max, self.fake_rank = float(guidance_min), float(guidance_max), int(fake_rank)
        self.regression_weight = float(regression_weight)

    def setup(self, module) -> None:
        if module.has_adapter:
            raise ValueError("method=vsd trains the full one-step student; use adapter=none (the fake score is "
                             "already a LoRA over the frozen teacher)")
        score = copy.deepcopy(module.unet)
        apply_adapter(Components(score, module.text_encoder, None, None),
                      AdapterSpec(kind="lora", rank=self.fake_rank, target="attn_mlp"))
        # trained, so it belongs to the module (optimizer, sharding, checkpoints); the method keeps a handle
        self.fake_score = module.register_trainable("fake_score", score)

    def _generate(self, module, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = torch.full((noise.shape[0],), module.core.num_timesteps - 1, device=noise.device, dtype=torch.long)
        out = module.unet(noise, t, encoder_hidden_states=cond).sample
        return module.core.predict_x0(noise, out, t)

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        core, gen, score = module.core, module.noise_generator, self.fake_score
        ids = batch["input_ids"]
        n = ids.shape[0]
        cond = module.batch_context(batch)  # the cached text context when the shards carry one
        size, ch = module.components.sample_size, module.components.in_channels
        noise = batch.get("noise")
        if noise is None:
            noise = torch.randn((n, ch, size, size), generator=gen, device=module.device)
        x = self._generate(module, noise, cond)
        d = core.noised(x.detach(), gen)
        g = self.g_min + torch.rand(n, generator=gen, device=x.device) * (self.g_max - self.g_min)
        with torch.no_grad():
            uncond = module.encode_text(module.empty_prompt_ids(n))
            with adapters_disabled(score):
                p_real = core.predict_x0(d.x_t, guided(score, d.x_t, d.t, cond.detach(), uncond, g), d.t)
            p_fake = core.predict_x0(d.x_t, score(d.x_t, d.t, encoder_hidden_states=cond.detach()).sample, d.t)
            norm = (x - p_real).abs().flatten(1).mean(1).clamp_min(1e-6).view(-1, 1, 1, 1)
            grad = (p_fake - p_real) / norm
        dm = 0.5 * ((x - (x - grad).detach()) ** 2).flatten(1).mean(1)  # d/dx = grad: distribution matching
        fake = core.per_sample_error(score(d.x_t, d.t, encoder_hidden_states=cond.detach()).sample, d.target)
        out = {"loss": dm + fake, "distribution_matching": dm.detach(), "fake_score_loss": fake.detach()}
        if self.regression_weight and "x0" in batch and "noise" in batch:  # couplings: x0 is in the UNet's space
            reg = core.per_sample_error(x, batch["x0"].to(x))
            out["loss"] = out["loss"] + self.regression_weight * reg
            out["regression"] = reg.detach()
        return out
