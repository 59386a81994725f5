"""Image-free variational score distillation to a one-step student (SwiftBrush; SNOOPI's random guidance scale):
DMD2's code path (train/methods/dmd.py) with a LoRA fake score over the frozen teacher and no GAN, so only captions
are needed. Sample it with sampler=lcm, 1 step.

Why the first version trained no usable student (prompt accuracy 0.075 at one step): it started the student from
noise at t = T-1, where the digits teacher's cosine schedule has alpha_bar = 2.4e-9, so the epsilon student's
x0 = (x - sqrt(1 - a) eps) / sqrt(a) multiplied every error of its output by 1/sqrt(a) = 20,000. Measured
(benchmarks/onestep_digits.py, 300 steps, the same settings otherwise): from T-1, 0.085 (Fréchet 91); from
`conditioning_timestep=899` (alpha_bar 0.024, 6.4x), 0.885 (Fréchet 7.7). The rewrite also moved it onto DMD2's
two time-scale rule and t range, which this ablation does not separate.
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
