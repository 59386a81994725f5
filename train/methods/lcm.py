"""Latent consistency distillation (Luo et al., LCM; LCM-LoRA): a few-step student from a frozen teacher.

From x_{t} (data noised at a point of the DDIM grid), the teacher's guided prediction takes one DDIM step of
skipping interval k to x_{t-k}; the student's consistency output at x_t must match the target network's at
x_{t-k}. Outputs are the boundary-conditioned f(x, t) = c_skip(t) x + c_out(t) x0(x, t), so f(x, 0) = x.
Full LCM: the student takes the guidance weight as an input (model.guidance_embedding), w ~ U[scale range], and the
target network is an EMA of the student. LCM-LoRA: the student is a LoRA over the teacher (the teacher = the same
weights with the adapter off: no copy), one fixed guidance scale, and the target is the student without grads.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from models.pipeline import guidance_embedding
from train.methods.base import Method
from train.strategies import full_parameters


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of the consistency parameterisation; c_skip(0) = 1, c_out(0) = 0 (identity at t = 0)."""
    s = t.float() * timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2).sqrt()


def ddim_grid(num_train: int, num_ddim: int) -> torch.Tensor:
    """The solver's timesteps [k-1, 2k-1, ..., num_train-1], k = num_train // num_ddim (the skipping interval)."""
    k = num_train // num_ddim
    return torch.arange(1, num_ddim + 1) * k - 1


class LCM(Method):
    """`teacher` is informational here: experiments load it as the model (model.pretrained=${method.teacher}),
    so the student starts as the teacher and the teacher is the frozen reference."""

    name = "lcm"

    def __init__(self, num_ddim_timesteps: int = 50, guidance_min: float = 2.0, guidance_max: float = 4.0,
                 guidance_scale: float | None = None, ema_decay: float = 0.95, teacher: str | None = None):
        if guidance_scale is None and not 1.0 <= guidance_min <= guidance_max:
            raise ValueError(f"method.guidance_min/max={guidance_min}/{guidance_max}: expected 1 <= min <= max")
        self.num_ddim, self.ema_decay = int(num_ddim_timesteps), float(ema_decay)
        self.g_min, self.g_max, self.g_fixed = float(guidance_min), float(guidance_max), guidance_scale
        self.target: torch.nn.Module | None = None  # a plain attribute: outside the module and any engine

    def setup(self, module) -> None:
        module.require_reference()
        self.w_dim = module.unet.config.time_cond_proj_dim
        if not module.has_adapter:
            if not self.w_dim and self.g_fixed is None:
                raise ValueError("method=lcm (full): set model.guidance_embedding=256 (the student takes w as input), "
                                 "or method.guidance_scale for a fixed scale")
            self.target = copy.deepcopy(module.unet).requires_grad_(False).eval()

    def _w(self, n: int, module) -> torch.Tensor:
        if self.g_fixed is not None:
            return torch.full((n,), float(self.g_fixed) - 1.0, device=module.device)
        u = torch.rand(n, generator=module.noise_generator, device=module.device)
        return (self.g_min + u * (self.g_max - self.g_min)) - 1.0

    def _f(self, unet, core, x, t, cond, w_emb):
        c_skip, c_out = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t))
        out = unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
        return c_skip * x + c_out * core.predict_x0(x, out, t)

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        core, gen = module.core, module.noise_generator
        x0 = module.batch_x0(batch)
        n, ids = x0.shape[0], batch["input_ids"]
        grid = ddim_grid(core.num_timesteps, self.num_ddim).to(x0.device)
        idx = torch.randint(0, self.num_ddim, (n,), generator=gen, device=x0.device)
        t = grid[idx]
        t_prev = t - core.num_timesteps // self.num_ddim
        d = core.noised(x0, gen, t=t)
        w = self._w(n, module)
        w_emb = guidance_embedding(w, self.w_dim).to(x0.dtype) if self.w_dim else None
        context = module.batch_context(batch)  # the cached text context when the shards carry one
        pred = self._f(module.unet, core, d.x_t, t, context, w_emb)
        with torch.no_grad():
            with module.reference() as ref:
                cond, uncond = ref.encode_text(ids), ref.encode_text(module.empty_prompt_ids(n))
                out = ref.unet(torch.cat([d.x_t, d.x_t]), torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([uncond, cond])).sample
            x2 = torch.cat([d.x_t, d.x_t])
            x0_u, x0_c = core.predict_x0(x2, out, torch.cat([t, t])).chunk(2)
            e_u, e_c = core.predict_eps(x2, out, torch.cat([t, t])).chunk(2)
            wv = w.view(-1, 1, 1, 1)
            x_prev = core.ddim_jump(x0_c + wv * (x0_c - x0_u), e_c + wv * (e_c - e_u), t_prev)
            t_tgt = t_prev.clamp_min(0)
            target_net = self.target if self.target is not None else module.unet
            if self.target is not None and next(self.target.parameters()).device != x0.device:
                self.target = target_net = self.target.to(x0.device)
            target = self._f(target_net, core, x_prev, t_tgt, context.detach(), w_emb)
        return {"loss": core.per_sample_error(pred, target), "timestep": t.float()}

    @torch.no_grad()
    def on_step_end(self, module) -> None:
        if self.target is None:
            return
        params = list(module.unet.parameters())
        with full_parameters(module, params):  # whole tensors under ZeRO-3/FSDP; the target is a full copy
            for tp, p in zip(self.target.parameters(), params):
                tp.lerp_(p.detach().to(tp.device, tp.dtype), 1.0 - self.ema_decay)

    def state_dict(self, module) -> dict[str, Any]:
        return {"target": {k: v.cpu() for k, v in self.target.state_dict().items()}} if self.target is not None else {}

    def load_state_dict(self, state: dict[str, Any], module) -> None:
        if self.target is not None and "target" in state:
            self.target.load_state_dict(state["target"])
