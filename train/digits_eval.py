"""Digits-world evaluation: prompt accuracy and Fréchet distance of generated digits, per guidance scale.

The best guidance scale moves with training and fine-tuning (shared NOTES: EMA at 1.0 vs 3.0 vs 7.5, and
DPO shifts it), so the evaluation sweeps it and reports every scale plus the best one.
`foundry-eval PATH` (train/ops/evaluate.py) scores a checkpoint or an exported folder; the evaluation callback
calls the same functions during training.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from data.digits import eval_prompt
from models.digits_judge import DigitJudge, IndependentJudge, frechet_distance, prompt_accuracy, real_digit_features
from train.prompt_eval import generate_images
from train.sampling import straightness

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_digits(pipe, n_per_digit: int, guidance_scale: float, steps: int, seed: int = 1234,
                    batch_size: int = 250, digits: tuple[int, ...] = tuple(range(10))):
    """Images in [-1, 1] for "a handwritten digit k", one fixed seed per image (independent of batching)."""
    labels = np.array([d for d in digits for _ in range(n_per_digit)])
    prompts = [eval_prompt(int(d)) for d in labels]
    return generate_images(pipe, prompts, guidance_scale, steps, seed, batch_size), labels


def evaluate_digits(pipe, judge: DigitJudge | None = None, guidance_scales=(1.0, 3.0, 5.0), n_per_digit: int = 20,
                    steps: int = 25, seed: int = 1234, digits: tuple[int, ...] = tuple(range(10))) -> dict[str, float]:
    """`val/prompt_accuracy` is the best over the scales; every scale is reported too. `digits` restricts the
    prompts (e.g. to the digits a DreamBooth base knew, to measure prior preservation)."""
    judge = judge or DigitJudge.cached()
    second = IndependentJudge()  # what no training step used (RL rewards and pair rankers are `judge`)
    real = None
    metrics: dict[str, float] = {}
    best = (-1.0, None)
    for g in guidance_scales:
        t0 = time.perf_counter()
        images, labels = generate_digits(pipe, n_per_digit, g, steps, seed, digits=tuple(digits))
        acc = prompt_accuracy(judge, images, labels)
        real = real if real is not None else real_digit_features(judge, resolution=images.shape[-1])
        fd = frechet_distance(judge.features(images), real)
        metrics[f"val/prompt_accuracy_g{g:g}"] = acc
        metrics[f"val/independent_accuracy_g{g:g}"] = prompt_accuracy(second, images, labels)
        metrics[f"val/frechet_g{g:g}"] = fd
        log.info("digits eval: guidance %.1f -> prompt accuracy %.3f, Fréchet %.2f (%.1fs)", g, acc, fd,
                 time.perf_counter() - t0)
        if acc > best[0]:
            best = (acc, g)
    metrics["val/prompt_accuracy"] = best[0]
    metrics["val/best_guidance"] = float(best[1])
    metrics["val/frechet"] = metrics[f"val/frechet_g{best[1]:g}"]
    if type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        metrics["val/straightness"] = flow_straightness(pipe, guidance_scale=float(best[1]), seed=seed)
    return metrics


@torch.no_grad()
def flow_straightness(pipe, n_per_digit: int = 4, steps: int = 8, guidance_scale: float = 1.0,
                      seed: int = 1234) -> float:
    """InstaFlow's straightness of a flow model's sampled paths (0: straight, one Euler step suffices), averaged
    over `n_per_digit` paths per digit prompt, from the states of an `steps`-step Euler solve."""
    prompts = [eval_prompt(d) for d in range(10) for _ in range(n_per_digit)]
    ch, size = model_space(pipe)
    x_T = torch.stack([torch.randn((ch, size, size), generator=torch.Generator().manual_seed(seed + i))
                       for i in range(len(prompts))])
    states = [x_T]

    def record(_pipe, _i, _t, tensors):
        states.append(tensors["latents"].float().cpu())
        return tensors

    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=x_T.clone(), output_type="latent",
         callback_on_step_end=record)
    return float(straightness(torch.stack(states, 1), pipe.scheduler.sigmas.float()).mean())


def model_space(pipe) -> tuple[int, int]:
    """(channels, side) of the tensors a pipeline denoises: its `model_space()` when it packs them (Flux), else its
    UNet's (or UNet-called transformer's) input."""
    if hasattr(pipe, "model_space"):
        return pipe.model_space()
    return int(pipe.unet.config.in_channels), int(pipe.unet.config.sample_size)


@torch.no_grad()
def prompt_share(pipe, prompt: str, label: int, n: int = 100, guidance_scale: float = 3.0, steps: int = 25,
                 seed: int = 4321, judge: DigitJudge | None = None) -> float:
    """Share of `n` samples of an arbitrary prompt the judge calls `label` (DreamBooth subject fidelity)."""
    judge = judge or DigitJudge.cached()
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    images = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                  output_type="pt").images.float().cpu() * 2 - 1
    return prompt_accuracy(judge, images, np.full(n, label))
