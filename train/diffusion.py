"""The noise/loss core: noise schedule, objective targets, SNR weighting and per-sample losses.

Two families share one interface: discrete-time VP diffusion (a DDPM schedule; epsilon or v targets) and flow
matching / rectified flow (x_t = (1 - s) x0 + s noise, target noise - x0, s = t / T in [0, 1], with SD3's
logit-normal timestep density and shift). Methods see `noised`, `target`, `predict_x0`, `per_sample_loss`; the few
that need VP-only quantities (a DDIM jump, alphas) declare the objectives they support.

Every method (denoising, DreamBooth, DPO, distillation...) and the evaluator use this one object, so a
fix to a target or a weighting lands everywhere at once. All losses are per-sample `[B]` vectors:
prior-preservation splits, preference pairing and weighting act on that vector before the one reduction
in the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def is_flow_scheduler(scheduler) -> bool:
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# ----- VP conversions, the one place (the core, the DDIM sampler and the distillation targets use them) -----
def vp_x0_eps(x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps from a VP network's output `pred` at x_t, with alpha_cumprod `a` broadcastable to x_t."""
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt(), pred
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * pred, a.sqrt() * pred + (1 - a).sqrt() * x_t
    raise ValueError(f"prediction_type '{prediction_type}' is not epsilon/v_prediction")


def vp_eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The noise that takes x0 to x_t at alpha_cumprod `a`."""
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


@dataclass
class Noised:
    """One training draw: the noisy input, its timestep, the noise and what the network should output."""

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


class DiffusionCore:
    """The objective of a run: VP diffusion (DDPM schedule, epsilon | v_prediction) or flow matching (`flow`)."""

    def __init__(self, scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler, min_snr_gamma: float | None = None,
                 offset_noise: float = 0.0, loss_type: str = "mse", huber_c: float = 0.001,
                 timestep_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 timestep_range: tuple[float, float] | None = (0.0, 1.0),
                 shift_for: Callable[[torch.Size], float | None] | None = None):
        timestep_range = (0.0, 1.0) if timestep_range is None else timestep_range  # null: the whole schedule
        lo, hi = (float(v) for v in timestep_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"loss.timestep_range={list(timestep_range)}: expected [lo, hi] with 0 <= lo < hi <= 1 "
                             "(fractions of the noise schedule, e.g. [0.5, 1.0] for the noisier half)")
        if loss_type not in ("mse", "huber"):
            raise ValueError(f"loss.type: '{loss_type}' is not one of mse, huber")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"loss.timestep_sampling: '{timestep_sampling}' is not one of {', '.join(TIMESTEP_SAMPLING)}")
        self.scheduler = scheduler
        self.flow = is_flow_scheduler(scheduler)
        self.prediction_type: str = "flow" if self.flow else scheduler.config.prediction_type
        self.num_timesteps: int = scheduler.config.num_train_timesteps
        self.min_snr_gamma = None if self.flow else min_snr_gamma  # flow weights by its timestep density instead
        self.offset_noise = offset_noise
        self.loss_type = loss_type
        self.huber_c = huber_c
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, float(logit_mean), float(logit_std)
        self.shift = float(scheduler.config.get("shift", 1.0)) if self.flow else 1.0
        self._acp = None if self.flow else scheduler.alphas_cumprod.float()
        self.timestep_range = (lo, hi)
        self.shift_for = shift_for  # the family's resolution-dependent shift (Flux): model-space shape -> shift

    def require(self, objectives: tuple[str, ...], who: str, hint: str = "") -> None:
        """One line naming the objective when a method cannot work with this model's."""
        if self.prediction_type not in objectives:
            raise ValueError(f"{who} works with model.prediction_type {' | '.join(objectives)}, not "
                             f"{self.prediction_type}; {hint or 'pick another method or model'}")

    def alphas_cumprod(self, t: torch.Tensor) -> torch.Tensor:
        if self._acp is None:
            raise ValueError("alphas_cumprod: a flow-matching model has no VP schedule")
        return self._acp.to(t.device)[t]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Flow matching: the noise level s = t / T of (possibly fractional) timesteps t."""
        return t.float() / self.num_timesteps

    def sample_timesteps(self, n: int, device: torch.device | str, generator: torch.Generator | None = None,
                         shift: float | None = None):
        """VP: uniform integer timesteps. Flow: s uniform or logit-normal (SD3), shifted s' = k s / (1 + (k-1) s),
        returned as float timesteps t = s' T (what the schedulers and time embeddings use). k is `shift` when given
        (a family's resolution-dependent shift, e.g. Flux's exp(mu)), else the scheduler's static one.
        `timestep_range` [lo, hi] restricts training to that part of the schedule: VP timesteps in [lo T, hi T),
        flow noise levels s' in [lo, hi] (the shifted density is mapped into the range)."""
        lo, hi = self.timestep_range
        if not self.flow:
            first, end = int(round(lo * self.num_timesteps)), max(int(round(hi * self.num_timesteps)), 1)
            return torch.randint(min(first, end - 1), end, (n,), device=device, generator=generator)
        if self.timestep_sampling == "logit_normal":
            u = torch.randn((n,), device=device, generator=generator) * self.logit_std + self.logit_mean
            s = torch.sigmoid(u)
        else:
            s = torch.rand((n,), device=device, generator=generator)
        k = self.shift if shift is None else float(shift)
        s = k * s / (1 + (k - 1) * s)
        if (lo, hi) != (0.0, 1.0):
            s = lo + (hi - lo) * s
        return s * self.num_timesteps

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise, plus per-channel offset noise (helps very dark/bright images) when configured."""
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn(
                (x0.shape[0], x0.shape[1], *([1] * (x0.ndim - 2))), device=x0.device, dtype=x0.dtype,
                generator=generator)
        return noise

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> Noised:
        """Draw (t, noise) unless given, and build the training input and target for clean `x0`."""
        noise = self.sample_noise(x0, generator) if noise is None else noise.to(x0)
        if t is None:
            shift = self.shift_for(x0.shape) if self.flow and self.shift_for is not None else None
            t = self.sample_timesteps(x0.shape[0], x0.device, generator, shift=shift)
        return Noised(self.add_noise(x0, noise, t), t, noise, self.target(x0, noise, t))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            s = _expand(self.sigma(t), x0)
            return (1 - s) * x0 + s * noise
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x_t, t)."""
        if self.prediction_type == "flow":
            return noise - x0
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction_type '{self.prediction_type}'")

    def predict_x0(self, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return xt - _expand(self.sigma(t), xt) * pred
        return vp_x0_eps(xt, pred, _expand(self.alphas_cumprod(t), xt), self.prediction_type)[0]

    def predict_eps(self, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return xt + (1 - _expand(self.sigma(t), xt)) * pred
        return vp_x0_eps(xt, pred, _expand(self.alphas_cumprod(t), xt), self.prediction_type)[1]

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_cumprod at integer timesteps, 1 for t < 0 (the clean end of a DDIM jump)."""
        return torch.where(t >= 0, self.alphas_cumprod(t.clamp_min(0)), torch.ones_like(t, dtype=torch.float))

    def ddim_jump(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM state at timestep `t` (any earlier one) from predicted x0 and eps; t < 0 is x0.

        This is the ODE solver step of consistency distillation (skipping interval k: t = t_start - k)."""
        a = _expand(self.alpha_bar(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            s = self.sigma(t).clamp(1e-6, 1 - 1e-6)
            return ((1 - s) / s) ** 2
        return compute_snr(self.scheduler, t)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al.): clamp the weight of low-noise steps; 1 when disabled.

        For epsilon targets the weight is min(SNR, g) / SNR; for v targets min(SNR, g) / (SNR + 1), because the
        v loss already carries a factor (SNR + 1) relative to the x0 loss.
        """
        if not self.min_snr_gamma:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t).float()
        clamped = torch.clamp(snr, max=self.min_snr_gamma)
        denom = snr + 1 if self.prediction_type == "v_prediction" else snr
        return clamped / denom.clamp_min(1e-8)

    def per_sample_error(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unweighted error per sample, [B] (DPO compares these between policy and reference). With `mask` (1 where
        an element counts, broadcastable to `pred`: patch masking's kept patches) the mean runs over those only."""
        pred, target = pred.float(), target.float()
        if self.loss_type == "huber":
            err = torch.sqrt((pred - target) ** 2 + self.huber_c ** 2) - self.huber_c
        else:
            err = F.mse_loss(pred, target, reduction="none")
        if mask is None:
            return err.flatten(1).mean(1)
        mask = mask.to(err).expand_as(err)
        return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted per-sample loss, [B]."""
        return self.per_sample_error(pred, target, mask) * self.loss_weights(t).to(pred.device)


def preference_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                    beta: float, tie: torch.Tensor | None = None, sft_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Diffusion-DPO (Wallace et al.) per pair, from denoising errors at the same timestep and noise.

    logits = -beta/2 [(e_w - e_w_ref) - (e_l - e_l_ref)]; loss = -log sigmoid(logits). A policy equal to its
    reference gives logits 0, loss log 2. A tie (`tie` true) is split evenly between both orders. SPIN uses the
    same form with the real image as winner and the opponent's sample as loser. `sft_weight` adds the winner's
    denoising error (an SFT term, as RPO does for language models): without it the cheapest way to widen the margin
    is to raise the errors on everything, which self-play (winner and loser both look like data) finds quickly.
    """
    logits = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss = -F.logsigmoid(logits)
    if tie is not None and bool(tie.any()):
        loss = torch.where(tie.to(loss.device), 0.5 * (-F.logsigmoid(logits) - F.logsigmoid(-logits)), loss)
    if sft_weight:  # the winner's plain denoising loss: the margin cannot grow by raising every error at once
        loss = loss + sft_weight * err_w
    return {"loss": loss, "implicit_acc": (logits > 0).float() + 0.5 * (logits == 0).float(),
            "reward_margin": logits.detach(),
            "error_gap": 0.5 * ((err_w - ref_err_w) + (err_l - ref_err_l)).detach()}
