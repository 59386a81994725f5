"""Progressive distillation (Salimans & Ho; Meng et al. stage two): a v-prediction student matches two of its
teacher's DDIM steps with one; each round halves the steps, and the round's student is the next round's teacher.

Steps sit on a "trailing" grid (999, 999 - s, ...; sample with sampler=ddim_trailing), so a one-step student starts
from pure noise. From z_t the teacher steps to z_{t-s/2} and z_{t-s}; the student's target x~ is the clean image
for which one DDIM step from z_t lands exactly on z_{t-s}, expressed as a v target. With `guidance` > 1 the teacher
steps are classifier-free guided and the student learns the guided trajectory in one forward pass.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from train.diffusion import vp_eps_from_x0
from train.methods.base import RefreshedReference
from train.sampling import guided

log = logging.getLogger(__name__)


def two_step_target(core, z_t: torch.Tensor, t: torch.Tensor, z_end: torch.Tensor, t_end: torch.Tensor):
    """x~ with DDIM(z_t -> t_end; x~) == z_end, i.e. x~ = (z_end - (s_e/s_t) z_t) / (a_e - (s_e/s_t) a_t)."""
    def ab(tt):
        a = core.alpha_bar(tt)
        return a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)

    a_t, s_t = ab(t)
    a_e, s_e = ab(t_end)
    ratio = s_e / s_t
    return (z_end - ratio * z_t) / (a_e - ratio * a_t)


class Progressive(RefreshedReference):
    name = "progressive"
    counter, reference_key = "round", "teacher"  # state: the round and, from round 1, its teacher
    objectives = ("v_prediction",)
    objective_hint = ("convert the teacher first (model.prediction_type=v_prediction, a short continued training) or "
                      "set it for the student")

    def __init__(self, start_steps: int = 8, rounds: int = 3, steps_per_round: int = 300, guidance: float = 1.0,
                 teacher: str | None = None):
        if start_steps >> rounds < 1 or (start_steps & (start_steps - 1)):
            raise ValueError(f"method.start_steps={start_steps}, method.rounds={rounds}: start_steps must be a power "
                             "of two with at least one step left after the last halving")
        if 1000 % start_steps:
            raise ValueError(f"method.start_steps={start_steps} must divide the 1000 training timesteps (8, 4, 2)")
        self.start, self.rounds, self.per_round = int(start_steps), int(rounds), int(steps_per_round)
        self.guidance, self.round = float(guidance), 0

    def setup(self, module) -> None:
        module.require_reference(copy_weights=True)  # the teacher of the current round

    @property
    def student_steps(self) -> int:
        return max(1, self.start >> (self.round + 1))

    def loss(self, batch: dict[str, Any], module) -> dict[str, torch.Tensor]:
        core, gen = module.core, module.noise_generator
        x0 = module.batch_x0(batch)
        n, ids = x0.shape[0], batch["input_ids"]
        s = core.num_timesteps // self.student_steps
        i = torch.randint(0, self.student_steps, (n,), generator=gen, device=x0.device)
        t = core.num_timesteps - 1 - i * s
        d = core.noised(x0, gen, t=t)
        with torch.no_grad(), module.reference() as teacher:
            cond = teacher.encode_text(ids)
            uncond = teacher.encode_text(module.empty_prompt_ids(n)) if self.guidance > 1 else None
            z, tt = d.x_t, t
            for _ in range(2):
                out = guided(teacher.unet, z, tt, cond, uncond, self.guidance)
                z = core.ddim_jump(core.predict_x0(z, out, tt), core.predict_eps(z, out, tt), tt - s // 2)
                tt = tt - s // 2
            x_target = two_step_target(core, d.x_t, t, z, tt)
            eps_target = vp_eps_from_x0(d.x_t, x_target, core.alphas_cumprod(t).view(-1, 1, 1, 1))
            v_target = core.target(x_target, eps_target, t)
        pred = module.unet(d.x_t, t, encoder_hidden_states=module.batch_context(batch)).sample
        return {"loss": core.per_sample_error(pred, v_target), "student_steps": torch.tensor(float(self.student_steps))}

    def on_step_end(self, module) -> None:
        if module.global_step % self.per_round == 0 and self.round < self.rounds - 1:
            self.round += 1
            module.refresh_reference()
            log.info("progressive: round %d (student %d steps, teacher %d) starts at step %d", self.round,
                     self.student_steps, 2 * self.student_steps, module.global_step)

