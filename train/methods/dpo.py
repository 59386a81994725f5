"""Diffusion-DPO (Wallace et al.): learn from preference pairs against a frozen reference, no reward model.

Winner and loser are noised with the same timestep and noise; the policy's and the reference's denoising errors
on both go into `train.diffusion.preference_loss`. The reference is the base with the adapter switched off when an
adapter is trained (no second copy of the weights), else a frozen copy kept outside the sharded engine.
Data: pair shards (data.kind=pair), `batch["pixels"]` the winners, `batch["pixels_lose"]` the losers.
"""
from __future__ import annotations

from typing import Any

import torch

from train.diffusion import preference_loss
from train.methods.base import Method


def pair_errors(module, x_w: torch.Tensor, x_l: torch.Tensor, input_ids: torch.Tensor):
    """Denoising errors [2N] of the policy and of the reference on (winners, losers), same t and noise per pair."""
    core = module.core
    n = x_w.shape[0]
    noise = core.sample_noise(x_w, module.noise_generator)
    t = core.sample_timesteps(n, x_w.device, module.noise_generator)
    d = core.noised(torch.cat([x_w, x_l]), t=torch.cat([t, t]), noise=torch.cat([noise, noise]))
    ids = torch.cat([input_ids, input_ids])
    err = core.per_sample_error(module.unet(d.x_t, d.t, encoder_hidden_states=module.encode_text(ids)).sample, d.target)
    with module.reference() as ref:
        ref_pred = ref.unet(d.x_t, d.t, encoder_hidden_states=ref.encode_text(ids)).sample
    ref_err = core.per_sample_error(ref_pred, d.target)
    return err[:n], err[n:], ref_err[:n], ref_err[n:]


class DiffusionDPO(Method):
    name = "dpo"
    objectives = ("epsilon", "v_prediction", "flow")  # errors at shared (t, noise): any objective

    def __init__(self, beta: float = 5000.0, sft_weight: float = 0.0):
        if beta <= 0:
            raise ValueError(f"method.beta={beta}: expected a positive number (Wallace et al. use 2000-5000)")
        self.beta, self.sft_weight = float(beta), float(sft_weight)

    def setup(self, module) -> None:
        module.require_reference()

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        if "pixels_lose" not in batch:
            raise ValueError("method=dpo needs preference pairs: set data=preference (data.kind=pair) and data.urls")
        errs = pair_errors(module, module.encode_images(batch["pixels"]), module.encode_images(batch["pixels_lose"]),
                           batch["input_ids"])
        return preference_loss(*errs, beta=self.beta, tie=batch.get("tie"), sft_weight=self.sft_weight)
