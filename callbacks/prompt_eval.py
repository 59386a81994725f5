"""Evaluation on a prompt set during training (train/prompt_eval.py): rewards, FID/KID and a held-out denoising
loss every N steps, logged as `eval/*` and written to the run's `eval/prompts_step_N.json` (read by foundry-report).

The reward models are built once, outside the sharded engine, and run on the module's device."""
from __future__ import annotations

import logging

from callbacks.evaluation import Evaluation
from models.export import make_pipeline
from train.prompt_eval import ImageFeatures, evaluate_prompts, heldout_loss, read_prompts, real_images

log = logging.getLogger(__name__)


class PromptEval(Evaluation):
    file_prefix, logged_prefix = "prompts", "eval/"

    def __init__(self, prompts: str = "digits", every_n_steps: int = 0, guidance_scales=(1.0, 3.0),
                 num_inference_steps: int = 25, per_prompt: int = 4, seed: int = 1234, rewards=(),
                 real: str | None = None, features: str | None = None, real_max: int = 2000,
                 heldout: str | None = None, timesteps=(100, 300, 500, 700, 900), heldout_batches: int = 4,
                 use_ema: bool = True, sampler: str = "ddim"):
        if bool(real) != bool(features):
            raise ValueError("callbacks.prompt_eval: real and features go together (FID/KID needs both)")
        self.every, self.prompts = every_n_steps, read_prompts(prompts)
        self.guidance_scales, self.steps, self.per_prompt = tuple(guidance_scales), num_inference_steps, per_prompt
        self.seed, self.rewards = seed, {r.name: r for r in rewards}  # instantiated by Hydra from their configs
        self.real_spec, self.max_real = real, real_max
        self.features = ImageFeatures(features) if features else None
        self.heldout, self.timesteps, self.heldout_batches = heldout, list(timesteps), heldout_batches
        self.use_ema, self.sampler = use_ema, sampler
        self.last_metrics: dict[str, float] = {}

    def measure(self, trainer, module) -> dict[str, float]:
        tokenizer = module.components.tokenizer
        real = (lambda size: real_images(self.real_spec, size, self.max_real, tokenizer)) if self.real_spec else None
        metrics = evaluate_prompts(make_pipeline(module.components, self.sampler), self.prompts, self.guidance_scales,
                                   self.steps, self.per_prompt, self.seed, self.rewards, real, self.features)
        if self.heldout:
            metrics.update({f"eval/{k}": v for k, v in heldout_loss(
                module, self.heldout, int(trainer.datamodule.resolution), self.timesteps, self.heldout_batches).items()})
        return metrics
