"""From components to a diffusers pipeline: in memory (our sampler) or on disk (`foundry-export`). Which pipeline is
the family's call (models/families/); this file picks the sampling scheduler and writes the folder."""
from __future__ import annotations

import shutil
from pathlib import Path

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, LCMScheduler)

from models.families import Components
from models.families.base import plain_index
from models.pipeline import FoundryPixelPipeline

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmpp": DPMSolverMultistepScheduler,
            "euler": EulerDiscreteScheduler, "lcm": LCMScheduler, "ddim_trailing": DDIMScheduler}


FLOW_SAMPLERS = ("ddim", "euler", "flow")  # a flow-matching model samples with its Euler ODE solver


def make_sampler(comps: Components, name: str = "ddim"):
    """A sampling scheduler sharing the training noise schedule; pixel models clip x0 to [-1, 1]."""
    if isinstance(comps.scheduler, FlowMatchEulerDiscreteScheduler):
        if name not in FLOW_SAMPLERS:
            raise ValueError(f"sampler '{name}': a flow-matching model samples with its Euler solver "
                             f"(sampler one of {', '.join(FLOW_SAMPLERS)})")
        return FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler.config)
    if name not in SAMPLERS:
        raise ValueError(f"sampler '{name}' is not one of {sorted(SAMPLERS)}")
    extra = {"clip_sample": comps.vae is None} if name in ("ddim", "ddpm", "lcm", "ddim_trailing") else {}
    if name == "ddim_trailing":  # timesteps from T down (999, 874, ...): what few-step progressive students need
        extra["timestep_spacing"] = "trailing"
    if comps.sampling_horizon is not None:  # the teacher's schedule cut at t_c: the sampler starts there, and a plain
        h = int(comps.sampling_horizon) + 1  # diffusers scheduler config holds it (its betas are the first h)
        extra.update(num_train_timesteps=h, trained_betas=comps.scheduler.betas[:h].tolist())
    return SAMPLERS[name].from_config(comps.scheduler.config, **extra)


def make_pipeline(comps: Components, sampler: str = "ddim"):
    """The pipeline a user would load from the export, built around live modules (no copies)."""
    pipe = comps.spec.pipeline(comps, make_sampler(comps, sampler), sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_pipeline(comps: Components, out: str | Path, sampler: str = "ddim") -> Path:
    """Write a folder that `DiffusionPipeline.from_pretrained` loads (pixel models need trust_remote_code)."""
    out = Path(out)
    pipe = make_pipeline(comps, sampler)
    pipe.save_pretrained(out, safe_serialization=True)
    if isinstance(pipe, FoundryPixelPipeline):
        shutil.copy(Path(__file__).with_name("pipeline.py"), out / "pipeline.py")
        plain_index(out, pipe, ["pipeline", FoundryPixelPipeline.__name__])
    else:  # the family's own diffusers pipeline: name the plain class (ours subclass some of diffusers')
        plain_index(out, pipe, next(c.__name__ for c in type(pipe).__mro__ if c.__module__.startswith("diffusers")))
    return out
