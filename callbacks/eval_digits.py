"""Digits-world evaluation during training: prompt accuracy and Fréchet distance, logged as `val/*`."""
from __future__ import annotations

import json
import logging

import torch

from callbacks.ema import inference_weights, samples_here
from callbacks.periodic import EveryNSteps
from callbacks.sample_images import run_dir
from models.export import make_pipeline
from train.digits_eval import evaluate_digits

log = logging.getLogger(__name__)


class DigitsEval(EveryNSteps):
    def __init__(self, every_n_steps: int = 0, guidance_scales: list[float] | tuple[float, ...] = (1.0, 3.0, 5.0),
                 n_per_digit: int = 20, num_inference_steps: int = 25, seed: int = 1234, use_ema: bool = True,
                 sampler: str = "ddim"):
        self.every = every_n_steps
        self.guidance_scales = tuple(guidance_scales)
        self.n_per_digit = n_per_digit
        self.steps = num_inference_steps
        self.seed = seed
        self.use_ema = use_ema
        self.sampler = sampler
        self.last_metrics: dict[str, float] = {}
        self._last = -1

    def run(self, trainer, module):
        return self.evaluate(trainer, module)

    @torch.no_grad()
    def evaluate(self, trainer, module) -> dict[str, float]:
        self._last = trainer.global_step
        if not samples_here(trainer):
            return {}
        with inference_weights(trainer, module, self.use_ema):
            metrics = evaluate_digits(make_pipeline(module.components, self.sampler),
                                      guidance_scales=self.guidance_scales,
                                      n_per_digit=self.n_per_digit, steps=self.steps, seed=self.seed)
        if not trainer.is_global_zero:
            return {}
        metrics["trainer/global_step"] = float(trainer.global_step)
        for lg in trainer.loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step=trainer.global_step)
        path = run_dir(trainer) / "eval" / f"digits_step_{trainer.global_step:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
        log.info("digits eval at step %d: prompt accuracy %.3f (guidance %g), Fréchet %.2f -> %s",
                 trainer.global_step, metrics["val/prompt_accuracy"], metrics["val/best_guidance"],
                 metrics["val/frechet"], path)
        self.last_metrics = metrics
        return metrics
