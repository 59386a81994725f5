"""Digits-world evaluation during training: prompt accuracy and Fréchet distance, logged as `val/*`."""
from __future__ import annotations

import logging

from callbacks.evaluation import Evaluation
from models.export import make_pipeline
from train.digits_eval import evaluate_digits

log = logging.getLogger(__name__)


class DigitsEval(Evaluation):
    file_prefix, logged_prefix = "digits", "val/"

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

    def measure(self, trainer, module) -> dict[str, float]:
        return evaluate_digits(make_pipeline(module.components, self.sampler), guidance_scales=self.guidance_scales,
                               n_per_digit=self.n_per_digit, steps=self.steps, seed=self.seed)

    def describe(self, metrics: dict[str, float]) -> str:
        return (f"prompt accuracy {metrics['val/prompt_accuracy']:.3f} (guidance {metrics['val/best_guidance']:g}), "
                f"Fréchet {metrics['val/frechet']:.2f}")
