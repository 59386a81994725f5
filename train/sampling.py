"""Training-time sampling: DDIM steps with log-probabilities, guided predictions, trajectories with or without grads.

The evaluator and exports sample through diffusers pipelines (models/pipeline.py). Methods that learn *from*
sampling need more than a pipeline gives: the log-probability of each stochastic DDIM transition (DDPO), gradients
through the last K steps (reward backprop, DRaFT-K/AlignProp), intermediate states (concept erasure, couplings,
distillation targets). This module is that, once. Its DDIM step is diffusers' `DDIMScheduler.step` math (same
timesteps, same x0 clipping rule, same noise scaling), tested to give the same `prev_sample` for the same noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler

from models.pipeline import combine_guidance
from train.diffusion import vp_x0_eps

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output (eps or v)


def ddim_scheduler(train_scheduler, steps: int, clip_sample: bool, stochastic_last_step: bool = False) -> DDIMScheduler:
    """The DDIM sampler sharing the training noise schedule (as models/export.make_sampler builds it).

    `stochastic_last_step`: as Stable Diffusion's sampler does (`steps_offset=1`, `set_alpha_to_one=False`), the
    grid ends at t=1 and the final transition lands on alpha_cumprod[0], so with eta > 0 every transition keeps a
    non-zero variance and a log-probability with a gradient; DDPO trains on every transition and needs that."""
    extra = {"set_alpha_to_one": False, "steps_offset": max(1, train_scheduler.config.get("steps_offset", 0))}
    sched = DDIMScheduler.from_config(train_scheduler.config, clip_sample=clip_sample,
                                      **(extra if stochastic_last_step else {}))
    sched.set_timesteps(steps)
    return sched


def guided(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
           scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in one batched forward; `scale` may be per sample ([B]); no uncond: no guidance."""
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if uncond is None:
        return unet(x, t, encoder_hidden_states=cond).sample
    out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    return combine_guidance(*out.chunk(2), scale)


@dataclass
class StepOut:
    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor          # [B]-broadcastable scalar std of the transition (0 when eta = 0)
    pred_x0: torch.Tensor
    log_prob: torch.Tensor     # [B]: log N(prev_sample; mean, std^2), mean over dimensions (DDPO's convention)


def ddim_step(sched: DDIMScheduler, model_output: torch.Tensor, t: int, x_t: torch.Tensor, eta: float = 0.0,
              generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> StepOut:
    """One DDIM transition x_t -> x_prev, with the log-probability of `prev_sample` (given or drawn)."""
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    acp = sched.alphas_cumprod.to(x_t.device, torch.float32)
    a_t = acp[t]
    a_prev = acp[prev_t] if prev_t >= 0 else torch.as_tensor(sched.final_alpha_cumprod, device=x_t.device)
    out = model_output.float()
    x = x_t.float()
    x0, eps = vp_x0_eps(x, out, a_t, sched.config.prediction_type)
    if sched.config.clip_sample:
        x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp_min(0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
    if prev_sample is None:
        if eta > 0:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
    log_prob = gaussian_log_prob(prev_sample.float(), mean, std)
    return StepOut(prev_sample.to(x_t.dtype), mean, std, x0, log_prob)


def flow_sigmas(train_scheduler, steps: int, image_seq_len: int | None = None) -> torch.Tensor:
    """The flow sampler's noise levels [steps + 1], from 1 to 0, with the model's shift (as its pipeline samples)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(train_scheduler.config)
    kwargs = {}
    if sched.config.get("use_dynamic_shifting"):  # Flux: the shift depends on the image's token count
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        kwargs["mu"] = calculate_shift(image_seq_len or 256, sched.config.get("base_image_seq_len", 256),
                                       sched.config.get("max_image_seq_len", 4096),
                                       sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    sched.set_timesteps(steps, **kwargs)
    return sched.sigmas.float()


def flow_sde_step(velocity: torch.Tensor, sigmas: torch.Tensor, i: int, x_t: torch.Tensor, noise_level: float,
                  generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None) -> StepOut:
    """One transition sigma_i -> sigma_{i+1} of Flow-GRPO's SDE (Liu et al. 2025, eq. 8-9): the reverse-time SDE
    with the probability-flow ODE's marginals, diffusion sigma_t = a sqrt(s / (1 - s)) (`noise_level` = a; at s = 1
    the next level stands in for the singular 1 - s). With a = 0 it is the Euler ODE step x + v ds exactly."""
    s, s_next = sigmas[i].to(x_t.device), sigmas[i + 1].to(x_t.device)
    ds = s_next - s  # negative: towards the data
    x, v = x_t.float(), velocity.float()
    s_in = torch.where(s >= 1, sigmas[1].to(x_t.device), s)
    diffusion = noise_level * torch.sqrt(s / (1 - s_in))
    mean = x * (1 + diffusion**2 / (2 * s) * ds) + v * (1 + diffusion**2 * (1 - s) / (2 * s)) * ds
    std = diffusion * torch.sqrt(-ds)
    if prev_sample is None:
        prev_sample = mean
        if noise_level > 0:
            prev_sample = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return StepOut(prev_sample.to(x_t.dtype), mean, std, x - s * v, gaussian_log_prob(prev_sample.float(), mean, std))


def sample_flow(predict: Predict, sigmas: torch.Tensor, x_T: torch.Tensor, noise_level: float = 0.0,
                generator: torch.Generator | None = None, sde_window: tuple[int, int] | None = None,
                num_train_timesteps: int = 1000) -> Trajectory:
    """Run the flow chain from `x_T` (sigma 1) with Flow-GRPO's SDE inside `sde_window` (step indices [lo, hi); all
    steps when None) and the ODE outside it; every state is kept, log-probs are those of the SDE steps (0 on ODE
    steps). `predict` gets the model's timestep, sigma x num_train_timesteps."""
    lo, hi = sde_window or (0, len(sigmas) - 1)
    x, states, log_probs = x_T, [x_T.detach()], []
    for i in range(len(sigmas) - 1):
        t = torch.full((x.shape[0],), float(sigmas[i]) * num_train_timesteps, device=x.device)
        step = flow_sde_step(predict(x, t), sigmas, i, x, noise_level if lo <= i < hi else 0.0, generator)
        x = step.prev_sample
        states.append(x.detach())
        log_probs.append(step.log_prob.detach())
    times = sigmas[:-1] * num_train_timesteps
    return Trajectory(torch.stack(states, 1), torch.stack(log_probs, 1), times, final=x)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I), averaged over every dimension but the batch; 0 for a deterministic step."""
    if float(std) == 0.0:
        return torch.zeros(x.shape[0], device=x.device)
    std = torch.as_tensor(std, device=x.device, dtype=torch.float32)
    lp = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


@dataclass
class Trajectory:
    """What a sampled batch leaves behind: states x_T..x_0 ([B, S+1, ...]), per-step log-probs ([B, S]) and the
    timesteps ([S]); enough to re-score any transition under an updated policy (DDPO)."""

    states: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    final: torch.Tensor | None = None  # x_0 with its autograd graph when sampled with grad_last > 0

    @property
    def images(self) -> torch.Tensor:
        return self.states[:, -1]


def sample(predict: Predict, sched: DDIMScheduler, x_T: torch.Tensor, eta: float = 0.0,
           generator: torch.Generator | None = None, grad_last: int = 0, keep_states: bool = False,
           stop_at: int | None = None) -> Trajectory:
    """Run the DDIM chain from `x_T`.

    grad_last=K keeps the autograd graph through the last K steps only (DRaFT-K); the earlier steps run without
    grads. keep_states records every state (DDPO). stop_at=i stops after i steps (an intermediate x_t).
    """
    timesteps = sched.timesteps
    n = len(timesteps) if stop_at is None else int(stop_at)
    x, states, log_probs = x_T, [x_T.detach()], []
    for i, t in enumerate(timesteps[:n]):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= n - grad_last):
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            step = ddim_step(sched, predict(x, tt), int(t), x, eta=eta, generator=generator)
            x = step.prev_sample
        if keep_states:
            states.append(x.detach())
        log_probs.append(step.log_prob.detach())
    stacked = torch.stack(states, 1) if keep_states else x.detach().unsqueeze(1)
    return Trajectory(stacked, torch.stack(log_probs, 1), timesteps[:n].clone(), final=x)


def straightness(states: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """InstaFlow's straightness of sampled paths, [B]: the time-weighted mean of ||v_i - v_bar||^2, where v_i is the
    velocity of step i and v_bar the straight line's from the first state to the last. Zero for an exactly straight
    path at constant speed (what a one-step sampler needs); `times` are the states' positions in [0, 1] ([S+1])."""
    times = times.to(states.device, torch.float32)
    dt = times[1:] - times[:-1]
    v = (states[:, 1:] - states[:, :-1]).flatten(2) / dt.view(1, -1, 1)
    v_bar = ((states[:, -1] - states[:, 0]).flatten(1) / (times[-1] - times[0])).unsqueeze(1)
    per_step = ((v - v_bar) ** 2).mean(2)
    return (per_step * dt.abs().view(1, -1)).sum(1) / dt.abs().sum()
