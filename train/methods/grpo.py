"""Flow-GRPO (Liu et al. 2025) and DanceGRPO (Xue et al. 2025): online RL for flow-matching models, on DDPO's
rollout-and-units machinery (train/methods/ddpo.py) with the policy's sampler swapped and a KL term added.

- The sampler: the flow ODE turned into Flow-GRPO's SDE with the same marginals (train/sampling.py `flow_sde_step`,
  noise level `noise_level` = a), whose every transition is a Gaussian with a log-probability. Rollouts use few
  steps (`sample_steps`, "denoising reduction"); evaluation samples with the full ODE pipeline as usual.
- Groups: `group_size` samples per prompt (G), advantages normalised within each prompt's group across every rank
  (`train/rewards.per_prompt_advantages`), clipped; rewards that are NaN/Inf drop their sample from its group
  (counted); a group left with fewer than 2 finite rewards gets no gradient.
- The objective: PPO's clipped ratio on the re-scored transitions plus `kl_beta` x KL(policy || reference) per
  transition, the reference being the frozen base (the adapter switched off, or a frozen copy outside every
  engine): for two Gaussians of the same std, ||mean - mean_ref||^2 / (2 std^2), averaged over dimensions.
- Where it trains: `sde_window` [lo, hi) runs the SDE (and trains) only on those steps, the ODE elsewhere (Flow-GRPO-
  Fast / MixGRPO); `timestep_fraction` subsamples the window's steps per minibatch (DanceGRPO); `shared_noise` gives
  every sample of a group the same initial noise (DanceGRPO).
"""
from __future__ import annotations

import torch

from train.methods.ddpo import DDPO
from train.rewards import Reward
from train.sampling import flow_sde_step, flow_sigmas, guided, sample_flow


class GRPO(DDPO):
    name = "grpo"
    min_group = 2  # a group left with fewer than 2 finite rewards gets no gradient
    objectives = ("flow",)
    objective_hint = ("GRPO trains flow-matching models (model=dit_tiny, mmdit_tiny, the families, or "
                      "model.prediction_type=flow); for epsilon/v UNets use method=ddpo")

    def __init__(self, reward: Reward, sample_steps: int = 10, noise_level: float = 0.7, guidance: float = 1.0,
                 group_size: int = 4, minibatch: int = 16, inner_epochs: int = 1, clip_range: float = 1e-4,
                 adv_clip_max: float = 5.0, kl_beta: float = 0.04, timestep_fraction: float = 1.0,
                 sde_window: list[int] | None = None, shared_noise: bool = False):
        if noise_level <= 0:
            raise ValueError(f"method.noise_level={noise_level}: GRPO needs a stochastic sampler (> 0) for "
                             "log-probabilities; 0.7 is Flow-GRPO's")
        if int(group_size) < 2:
            raise ValueError(f"method.group_size={group_size}: group-normalised advantages need >= 2 samples per prompt")
        if kl_beta < 0:
            raise ValueError(f"method.kl_beta={kl_beta}: expected >= 0 (0 switches the KL term off)")
        lo, hi = (0, int(sample_steps)) if sde_window is None else (int(sde_window[0]), int(sde_window[1]))
        if not 0 <= lo < hi <= int(sample_steps):
            raise ValueError(f"method.sde_window={sde_window}: expected [lo, hi) with 0 <= lo < hi <= "
                             f"method.sample_steps={sample_steps}")
        super().__init__(reward, sample_steps=sample_steps, eta=1.0, guidance=guidance, samples_per_prompt=group_size,
                         minibatch=minibatch, inner_epochs=inner_epochs, clip_range=clip_range,
                         adv_clip_max=adv_clip_max, timestep_fraction=1.0)
        self.noise_level, self.kl_beta, self.window, self.shared_noise = float(noise_level), float(kl_beta), (lo, hi), \
            bool(shared_noise)
        self.train_timesteps = max(1, round(float(timestep_fraction) * (hi - lo)))
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"method.timestep_fraction={timestep_fraction}: expected (0, 1]")

    def setup(self, module) -> None:
        if self.kl_beta > 0:
            module.require_reference()

    def _sigmas(self, module) -> torch.Tensor:
        tokens = (module.components.sample_size // 2) ** 2  # for a dynamic shift (Flux); 2x2 patches
        return flow_sigmas(module.core.scheduler, self.sample_steps, tokens)

    def _initial_noise(self, module, n: int) -> torch.Tensor:
        if not self.shared_noise:
            return super()._initial_noise(module, n)
        groups = super()._initial_noise(module, n // self.samples_per_prompt)
        return groups.repeat_interleave(self.samples_per_prompt, 0)

    def _trajectory(self, module, predict, x_T: torch.Tensor):
        return sample_flow(predict, self._sigmas(module), x_T, self.noise_level, module.noise_generator,
                           sde_window=self.window,
                           num_train_timesteps=module.core.scheduler.config.num_train_timesteps)

    def _transition(self, module, pred: torch.Tensor, j: int, x_t: torch.Tensor, x_prev: torch.Tensor):
        return flow_sde_step(pred, self._sigmas(module), j, x_t, self.noise_level, prev_sample=x_prev)

    def _trained_steps(self) -> list[int]:
        return list(range(*self.window))

    def _regularized(self, out: dict, module, step, x_t, t, j: int, cond, uncond) -> dict:
        if self.kl_beta <= 0:
            return out
        with module.reference() as ref:
            ref_pred = guided(ref.unet, x_t, t, cond, uncond, self.guidance)
        ref_step = flow_sde_step(ref_pred, self._sigmas(module), j, x_t, self.noise_level, prev_sample=step.mean)
        kl = ((step.mean - ref_step.mean) ** 2).flatten(1).mean(1) / (2 * step.std**2)
        return {**out, "loss": out["loss"] + self.kl_beta * kl, "kl": kl.detach()}
