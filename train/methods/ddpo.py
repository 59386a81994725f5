"""DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning"): PPO on the denoising MDP.

The one loop alternates two phases the method provides: a *rollout* (sample trajectories from the current model
with a stochastic DDIM sampler that records each transition's log-probability, score them with a reward, and
normalise advantages per prompt across all ranks), then *training units* that re-score stored transitions under the
current policy and apply the PPO clipped objective. One unit = one (minibatch, timestep); the loop accumulates
`trainer.accumulate_grad_batches` = timesteps per trajectory units into one optimizer step. Samples whose reward is
NaN/Inf get zero advantage (dropped, counted), so every rank keeps the same schedule.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from train.methods.base import Method
from train.rewards import Reward, finite_rewards, per_prompt_advantages, prompt_id
from train.sampling import ddim_scheduler, ddim_step, guided, sample

log = logging.getLogger(__name__)


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             clip_range: float) -> dict[str, torch.Tensor]:
    """max(-A r, -A clip(r, 1-e, 1+e)) per sample, r = exp(logp - logp_old)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return {"loss": torch.maximum(unclipped, clipped),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().detach(),
            "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).detach()}


class DDPO(Method):
    name = "ddpo"
    min_group: int | None = None  # a prompt seen once is normalised by the rollout's statistics (GRPO: skipped)

    def __init__(self, reward: Reward, sample_steps: int = 20, eta: float = 1.0, guidance: float = 1.0,
                 samples_per_prompt: int = 4, minibatch: int = 16, inner_epochs: int = 1, clip_range: float = 1e-4,
                 adv_clip_max: float = 5.0, timestep_fraction: float = 1.0):
        if not 0 < timestep_fraction <= 1:
            raise ValueError(f"method.timestep_fraction={timestep_fraction}: expected (0, 1]")
        if eta <= 0:
            raise ValueError(f"method.eta={eta}: DDPO needs a stochastic sampler (eta > 0) for log-probabilities")
        self.reward, self.sample_steps, self.eta, self.guidance = reward, int(sample_steps), float(eta), float(guidance)
        self.samples_per_prompt, self.minibatch, self.inner_epochs = int(samples_per_prompt), int(minibatch), int(inner_epochs)
        self.clip_range, self.adv_clip_max = float(clip_range), float(adv_clip_max)
        self.train_timesteps = max(1, round(timestep_fraction * self.sample_steps))
        self.units: list[tuple[torch.Tensor, int]] = []
        self.buffer: dict[str, Any] = {}
        self.seconds = {"rollout": 0.0}
        self.rollouts = 0
        self._started = time.perf_counter()
        self.last_rollout: dict[str, Any] = {}  # prompts, images, rewards of the newest rollout (for tables)

    def _sched(self, module):
        return ddim_scheduler(module.core.scheduler, self.sample_steps, clip_sample=module.vae is None,
                              stochastic_last_step=True)  # every transition has a log-prob gradient

    # ----- the policy's sampler, for the subclasses: DDIM here, Flow-GRPO's SDE in train/methods/grpo.py -----
    def _initial_noise(self, module, n: int) -> torch.Tensor:
        size, ch = module.components.sample_size, module.components.in_channels
        return torch.randn((n, ch, size, size), generator=module.noise_generator, device=module.device)

    def _trajectory(self, module, predict, x_T: torch.Tensor):
        return sample(predict, self._sched(module), x_T, eta=self.eta, generator=module.noise_generator,
                      keep_states=True)

    def _transition(self, module, pred: torch.Tensor, j: int, x_t: torch.Tensor, x_prev: torch.Tensor):
        """The policy's transition j (x_t -> x_prev) re-scored: its log-probability under the current weights."""
        return ddim_step(self._sched(module), pred, int(self.buffer["timesteps"][j]), x_t, eta=self.eta,
                         prev_sample=x_prev)

    def _trained_steps(self) -> list[int]:
        """The transitions training units may pick (`train_timesteps` of them per minibatch)."""
        return list(range(self.sample_steps))

    def _regularized(self, out: dict, module, step, x_t, t, j: int, cond, uncond) -> dict:
        return out  # GRPO adds its KL to the reference

    def _conds(self, module, ids: torch.Tensor, encode):
        cond = encode(ids)
        uncond = encode(module.empty_prompt_ids(ids.shape[0])) if self.guidance > 1 else None
        return cond, uncond

    def state_dict(self, module) -> dict[str, Any]:
        """The rollout in progress (stored trajectories and the training units left), so a run resumed mid-rollout
        trains on the same transitions in the same order as an uninterrupted one, and the counters go on."""
        return {"units": [(idx.cpu(), int(j)) for idx, j in self.units],
                "buffer": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in self.buffer.items()},
                "rollouts": self.rollouts, "rollout_seconds": self.seconds["rollout"]}

    def load_state_dict(self, state: dict[str, Any], module) -> None:
        self.units = [(idx.to(module.device), int(j)) for idx, j in state.get("units", [])]
        self.buffer = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in state.get("buffer", {}).items()}
        self.rollouts = int(state.get("rollouts", 0))
        self.seconds["rollout"] = float(state.get("rollout_seconds", 0.0))

    def steps_per_rollout(self, prompts: int) -> int:
        """Optimizer steps one rollout of `prompts` prompts feeds: its trajectories split into minibatches, each
        trained on `train_timesteps` timesteps accumulated into one step, for `inner_epochs` passes."""
        minibatches = -(-prompts * self.samples_per_prompt // self.minibatch)
        return self.inner_epochs * minibatches

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any], module) -> None:
        t0 = time.perf_counter()
        k = self.samples_per_prompt
        prompts = [p for p in batch["captions"] for _ in range(k)]
        ids = batch["input_ids"].repeat_interleave(k, 0)
        cond, uncond = self._conds(module, ids, module.encode_text)
        x_T = self._initial_noise(module, len(prompts))
        traj = self._trajectory(module, lambda x, t: guided(module.unet, x, t, cond, uncond, self.guidance), x_T)
        images = module.decode(traj.images)
        rewards = self.reward(images, prompts).float()
        ok, bad = finite_rewards(rewards)
        pids = torch.tensor([prompt_id(p) for p in prompts], device=module.device)
        gather = module.gather if module.world_size > 1 else None
        safe = torch.where(ok, rewards, torch.zeros_like(rewards))
        adv = per_prompt_advantages(safe, pids, gather, ok=ok, min_group=self.min_group)
        adv = torch.where(ok, adv.clamp(-self.adv_clip_max, self.adv_clip_max), torch.zeros_like(adv))
        self.buffer = {"states": traj.states, "log_probs": traj.log_probs, "timesteps": traj.timesteps,
                       "ids": ids, "adv": adv, "ok": ok, "reward_mean": safe[ok].mean() if ok.any() else None,
                       "reward_std": safe[ok].std(unbiased=False) if ok.any() else None, "nonfinite": bad}
        self.last_rollout = {"prompts": prompts, "images": images.detach().cpu(), "rewards": rewards.cpu()}
        if bad:
            log.warning("ddpo: %d of %d rewards were NaN/Inf; those samples get no gradient", bad, len(prompts))
        n, order = len(prompts), []
        for _ in range(self.inner_epochs):
            perm = torch.randperm(n, generator=module.noise_generator, device=module.device)
            for start in range(0, n, self.minibatch):
                idx = perm[start:start + self.minibatch]
                steps = self._trained_steps()
                pick = torch.randperm(len(steps), generator=module.noise_generator)[:self.train_timesteps]
                order += [(idx, steps[int(j)]) for j in pick]
        self.units = order
        self.rollouts += 1
        self.seconds["rollout"] += time.perf_counter() - t0

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        accum = module.accumulate_grad_batches or self.train_timesteps
        if accum != self.train_timesteps:
            raise ValueError(f"method=ddpo: trainer.accumulate_grad_batches={accum} must equal the timesteps trained "
                             f"per trajectory ({self.train_timesteps}); one optimizer step per minibatch")
        if not self.units:
            self.rollout(batch, module)
        b, (idx, j) = self.buffer, self.units.pop(0)
        skip = not bool(b["ok"].any())
        if skip:
            log.warning("ddpo: every reward of the rollout was NaN/Inf; this step is skipped")
            self.units = []
        cond, uncond = self._conds(module, b["ids"][idx], module.encode_text)
        x_t, x_prev = b["states"][idx, j], b["states"][idx, j + 1]
        t = b["timesteps"][j].to(module.device)
        pred = guided(module.unet, x_t, t, cond, uncond, self.guidance)
        step = self._transition(module, pred, j, x_t, x_prev)
        out = ppo_loss(step.log_prob, b["log_probs"][idx, j], b["adv"][idx], self.clip_range)
        out = self._regularized(out, module, step, x_t, t, j, cond, uncond)
        out["loss"] = out["loss"] * b["ok"][idx]
        if skip:  # NaN through the policy's graph: the module skips the optimizer step on every rank
            out["loss"] = out["loss"] + float("nan")
        if b["reward_mean"] is not None:
            out["reward_mean"], out["reward_std"] = b["reward_mean"], b["reward_std"]
        out["reward_nonfinite"] = torch.tensor(float(b["nonfinite"]))
        out["rollouts"] = torch.tensor(float(self.rollouts))
        out["rollout_seconds"] = torch.tensor(self.seconds["rollout"])  # phase wall-clock: sampling vs the rest
        out["train_seconds"] = torch.tensor(time.perf_counter() - self._started - self.seconds["rollout"])
        return out
