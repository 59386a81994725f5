"""Reward backpropagation (DRaFT-K, Clark et al.; AlignProp, Prabhudesai et al.): maximise a differentiable reward
by backpropagating through the last K denoising steps of the model's own sampler (K = sample_steps: AlignProp's
full chain), with gradient checkpointing so memory does not grow with K. The loss is -reward per sample.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from train.methods.base import Method
from train.rewards import Reward, finite_rewards
from train.sampling import ddim_scheduler, guided, sample

log = logging.getLogger(__name__)


class RewardBackprop(Method):
    name = "reward_backprop"

    def __init__(self, reward: Reward, sample_steps: int = 20, grad_last: int = 1, guidance: float = 1.0,
                 checkpointing: bool = True):
        if not reward.differentiable:
            raise ValueError(f"method=reward_backprop: reward '{reward.name}' is not differentiable; use DDPO "
                             "(method=ddpo) for it, or a differentiable reward (digits, clip_score, aesthetic)")
        if not 1 <= grad_last <= sample_steps:
            raise ValueError(f"method.grad_last={grad_last}: expected 1..sample_steps ({sample_steps})")
        self.reward, self.sample_steps, self.grad_last = reward, int(sample_steps), int(grad_last)
        self.guidance, self.checkpointing = float(guidance), bool(checkpointing)

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        ids, prompts = batch["input_ids"], batch["captions"]
        cond = module.encode_text(ids)
        uncond = module.encode_text(module.empty_prompt_ids(ids.shape[0])) if self.guidance > 1 else None

        def predict(x, t):
            fn = lambda x_, t_: guided(module.unet, x_, t_, cond, uncond, self.guidance)  # noqa: E731
            if self.checkpointing and torch.is_grad_enabled():
                return checkpoint(fn, x, t, use_reentrant=False)
            return fn(x, t)

        size, ch = module.components.sample_size, module.components.in_channels
        x_T = torch.randn((ids.shape[0], ch, size, size), generator=module.noise_generator, device=module.device)
        sched = ddim_scheduler(module.core.scheduler, self.sample_steps, clip_sample=module.vae is None)
        final = sample(predict, sched, x_T, grad_last=self.grad_last).final
        rewards = self.reward(module.decode(final), list(prompts)).float()
        ok, bad = finite_rewards(rewards)
        if bad:
            log.warning("reward_backprop: %d of %d rewards were NaN/Inf; those samples are dropped", bad, len(prompts))
        if not bool(ok.any()):
            log.warning("reward_backprop: every reward was NaN/Inf; this step is skipped")
            return {"loss": torch.full_like(rewards, float("nan"))}
        loss = torch.where(ok, -rewards, torch.zeros_like(rewards)) * (len(rewards) / int(ok.sum()))
        return {"loss": loss, "reward_mean": rewards[ok].detach().mean(), "reward_nonfinite": torch.tensor(float(bad))}
