"""Reward backpropagation (DRaFT-K, Clark et al.; AlignProp, Prabhudesai et al.): maximise a differentiable reward
by backpropagating through the last K denoising steps of the model's own sampler (K = sample_steps, the default:
AlignProp's full chain), with gradient checkpointing so memory does not grow with K. On the digits world the full
chain is what moves the judged digit: the last steps alone (DRaFT-K, K = 1, 2) only change texture, which raises a
small judge's reward without raising its accuracy. The loss is -reward per sample, plus
optionally (`pretrain_weight` > 0, ReFL's regulariser, Xu et al.) the core's denoising loss on the batch's real images,
which keeps the model a sampler of the data while the reward pulls on its last steps: without it a small model drifts
to images the reward was never trained on.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from train.methods.base import Method
from train.methods.denoise import denoising_loss
from train.rewards import Reward, finite_rewards
from train.sampling import ddim_scheduler, guided, sample

log = logging.getLogger(__name__)


class RewardBackprop(Method):
    name = "reward_backprop"

    def __init__(self, reward: Reward, sample_steps: int = 20, grad_last: int | None = None, guidance: float = 1.0,
                 checkpointing: bool = True, pretrain_weight: float = 0.0):
        if not reward.differentiable:
            raise ValueError(f"method=reward_backprop: reward '{reward.name}' is not differentiable; use DDPO "
                             "(method=ddpo) for it, or a differentiable reward (digits, clip_score, aesthetic)")
        grad_last = sample_steps if grad_last is None else grad_last  # None: the whole chain (AlignProp)
        if not 1 <= grad_last <= sample_steps:
            raise ValueError(f"method.grad_last={grad_last}: expected 1..sample_steps ({sample_steps})")
        self.reward, self.sample_steps, self.grad_last = reward, int(sample_steps), int(grad_last)
        if pretrain_weight < 0:
            raise ValueError(f"method.pretrain_weight={pretrain_weight}: expected >= 0 (0 turns the regulariser off)")
        self.guidance, self.checkpointing = float(guidance), bool(checkpointing)
        self.pretrain_weight = float(pretrain_weight)

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        ids, prompts = batch["input_ids"], batch["captions"]
        cond = module.batch_context(batch)  # the cached text context when the shards carry one
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
            return {"loss": -rewards}  # NaN through the sampling graph: the module skips the step on every rank
        loss = torch.where(ok, -rewards, torch.zeros_like(rewards)) * (len(rewards) / int(ok.sum()))
        out = {"reward_mean": rewards[ok].detach().mean(), "reward_nonfinite": torch.tensor(float(bad))}
        if self.pretrain_weight > 0:
            if "pixels" not in batch:
                raise ValueError("method.pretrain_weight > 0 needs images in the batch (caption/image shards); set "
                                 "method.pretrain_weight=0 for prompt-only data")
            reg = denoising_loss(module, module.batch_x0(batch), ids)["loss"]
            loss = loss + self.pretrain_weight * reg
            out["pretrain_loss"] = reg.detach().mean()
        return {"loss": loss, **out}
