"""Reflow (Liu et al., rectified flow; InstaFlow): straighten a teacher's ODE into a flow a student crosses in one step.

Data are the teacher's couplings (`foundry-shards couplings`: noise, the teacher's deterministic output for it,
caption; `data.kind=coupling`). The student, a flow-matching model (model.prediction_type=flow) started from the
teacher, learns the straight path between exactly those pairs: x_s = (1 - s) x0 + s noise, target noise - x0
(2-rectified flow). With `sigma: 1.0` every sample sits at the noise end, so the student maps noise to the teacher's
image in one evaluation: InstaFlow's distillation stage (L2 here instead of LPIPS, which needs hub weights).
"""
from __future__ import annotations

from typing import Any

import torch

from train.methods.base import Method
from train.methods.denoise import denoising_loss


class Reflow(Method):
    name = "reflow"
    objectives = ("flow",)

    def __init__(self, sigma: float | None = None, teacher: str | None = None):
        if sigma is not None and not 0 < sigma <= 1:
            raise ValueError(f"method.sigma={sigma}: expected (0, 1] (1.0: one-step distillation) or null")
        self.sigma = sigma

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        if "noise" not in batch or "x0" not in batch:
            raise ValueError("method=reflow trains on teacher couplings: set data.kind=coupling and data.urls to the "
                             "shards `foundry-shards couplings` wrote")
        x0 = batch["x0"].to(module.device)
        t = None
        if self.sigma is not None:
            t = torch.full((x0.shape[0],), self.sigma * module.core.num_timesteps, device=x0.device)
        return denoising_loss(module, x0, batch["input_ids"], noise=batch["noise"], t=t)
