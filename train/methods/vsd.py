"""Image-free variational score distillation to a one-step student (SwiftBrush; SNOOPI's random guidance scale):
DMD2's code path (train/methods/dmd.py) with a LoRA fake score over the frozen teacher and no GAN, so only captions
are needed. Sample it with sampler=lcm, 1 step.

Why the first version trained no usable student (prompt accuracy 0.075 at one step): the student and its fake score
took one joint step of the same optimizer at the same learning rate, so the fake score, which must track the
student's moving distribution, always lagged it, and the gradient (p_fake - p_real) was mostly the fake score's own
error; its timesteps also reached t ~ 0 and t ~ T, where the teacher and the fake score agree and the gradient is
noise. Fixed here by the two time-scale rule (`fake_updates` fake-score steps per student step, its own `fake_lr`)
and DMD's t range [0.02, 0.98] T (README: the one-step table).
"""
from __future__ import annotations

from train.methods.dmd import DMD2


class VSD(DMD2):
    name = "vsd"

    def __init__(self, guidance_min: float = 3.0, guidance_max: float = 3.0, fake_rank: int = 16,
                 fake_updates: int = 2, fake_lr: float | None = None, regression_weight: float = 0.0,
                 t_range=(0.02, 0.98), conditioning_timestep: int | None = None, teacher: str | None = None):
        super().__init__(guidance_min, guidance_max, fake_score="lora", fake_rank=fake_rank, fake_updates=fake_updates,
                         fake_lr=fake_lr, gan_weight=0.0, student_steps=1, regression_weight=regression_weight,
                         t_range=t_range, conditioning_timestep=conditioning_timestep, teacher=teacher)
