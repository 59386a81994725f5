"""The noise/loss core: noise schedule, objective targets, SNR weighting and per-sample losses.

Every method (denoising, DreamBooth, DPO, distillation...) and the evaluator use this one object, so a
fix to a target or a weighting lands everywhere at once. All losses are per-sample `[B]` vectors:
prior-preservation splits, preference pairing and weighting act on that vector before the one reduction
in the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass
class Noised:
    """One training draw: the noisy input, its timestep, the noise and what the network should output."""

    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


class DiffusionCore:
    """Discrete-time VP diffusion (DDPM schedule) with epsilon or v-prediction targets."""

    def __init__(self, scheduler: DDPMScheduler, min_snr_gamma: float | None = None, offset_noise: float = 0.0,
                 loss_type: str = "mse", huber_c: float = 0.001):
        if loss_type not in ("mse", "huber"):
            raise ValueError(f"loss.type: '{loss_type}' is not one of mse, huber")
        self.scheduler = scheduler
        self.prediction_type: str = scheduler.config.prediction_type
        self.num_timesteps: int = scheduler.config.num_train_timesteps
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.loss_type = loss_type
        self.huber_c = huber_c
        self._acp = scheduler.alphas_cumprod.float()

    def alphas_cumprod(self, t: torch.Tensor) -> torch.Tensor:
        return self._acp.to(t.device)[t]

    def sample_timesteps(self, n: int, device: torch.device | str, generator: torch.Generator | None = None):
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

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
        noise = self.sample_noise(x0, generator) if noise is None else noise
        t = self.sample_timesteps(x0.shape[0], x0.device, generator) if t is None else t
        return Noised(self.add_noise(x0, noise, t), t, noise, self.target(x0, noise, t))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x_t, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction_type '{self.prediction_type}'")

    def predict_x0(self, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _expand(self.alphas_cumprod(t), xt)
        if self.prediction_type == "epsilon":
            return (xt - (1 - a).sqrt() * pred) / a.sqrt()
        return a.sqrt() * xt - (1 - a).sqrt() * pred

    def predict_eps(self, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return pred
        a = _expand(self.alphas_cumprod(t), xt)
        return (1 - a).sqrt() * xt + a.sqrt() * pred

    def ddim_jump(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The deterministic DDIM state at timestep `t` (any earlier one) from predicted x0 and eps; t < 0 is x0.

        This is the ODE solver step of consistency distillation (skipping interval k: t = t_start - k)."""
        a = _expand(torch.where(t >= 0, self.alphas_cumprod(t.clamp_min(0)), torch.ones_like(t, dtype=torch.float)), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def snr(self, t: torch.Tensor) -> torch.Tensor:
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

    def per_sample_error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted error per sample, [B] (DPO compares these between policy and reference)."""
        pred, target = pred.float(), target.float()
        if self.loss_type == "huber":
            err = torch.sqrt((pred - target) ** 2 + self.huber_c ** 2) - self.huber_c
        else:
            err = F.mse_loss(pred, target, reduction="none")
        return err.flatten(1).mean(1)

    def per_sample_loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Weighted per-sample loss, [B]."""
        return self.per_sample_error(pred, target) * self.loss_weights(t).to(pred.device)


def preference_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                    beta: float, tie: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Diffusion-DPO (Wallace et al.) per pair, from denoising errors at the same timestep and noise.

    logits = -beta/2 [(e_w - e_w_ref) - (e_l - e_l_ref)]; loss = -log sigmoid(logits). A policy equal to its
    reference gives logits 0, loss log 2. A tie (`tie` true) is split evenly between both orders. SPIN uses the
    same form with the real image as winner and the opponent's sample as loser.
    """
    logits = -0.5 * beta * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss = -F.logsigmoid(logits)
    if tie is not None and bool(tie.any()):
        loss = torch.where(tie.to(loss.device), 0.5 * (-F.logsigmoid(logits) - F.logsigmoid(-logits)), loss)
    return {"loss": loss, "implicit_acc": (logits > 0).float() + 0.5 * (logits == 0).float(),
            "reward_margin": logits.detach(),
            "error_gap": 0.5 * ((err_w - ref_err_w) + (err_l - ref_err_l)).detach()}
