"""DreamBooth (Ruiz et al.): denoising on the subject's images plus a prior-preservation loss on class images.

The loss is the base denoising loss, per sample; the class half of the batch (`batch["is_prior"]`, from
data/dreambooth.py) is weighted by `prior_loss_weight`. Nothing else differs from base training, so this is a
weighting over `Denoise`, not a copy of it; with or without an adapter (adapter=lora makes it DreamBooth-LoRA).
"""
from __future__ import annotations

from typing import Any

import torch

from train.methods.denoise import Denoise


class DreamBooth(Denoise):
    name = "dreambooth"

    def __init__(self, prior_loss_weight: float = 1.0):
        if prior_loss_weight < 0:
            raise ValueError(f"method.prior_loss_weight={prior_loss_weight}: expected a number >= 0")
        self.prior_loss_weight = float(prior_loss_weight)

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        out = super().loss(batch, module)
        prior = batch.get("is_prior")
        if prior is None or not bool(prior.any()):
            return out
        prior = prior.to(out["loss"].device)
        per_sample = out["loss"]
        n, n_prior = per_sample.shape[0], int(prior.sum())
        out["prior_loss"] = per_sample[prior].detach().mean()
        if n_prior == n:  # only class images in this batch: their weighted mean alone
            out["loss"] = per_sample * self.prior_loss_weight
            return out
        out["instance_loss"] = per_sample[~prior].detach().mean()
        # A [B] vector whose mean (the loop's one reduction) is instance mean + weight x class mean.
        scale = torch.where(prior, self.prior_loss_weight * n / n_prior, n / (n - n_prior))
        out["loss"] = per_sample * scale.to(per_sample.dtype)
        return out
