"""From components to a diffusers pipeline: in memory (our sampler) or on disk (`foundry-export`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

from models.backbones import is_transformer
from models.components import Components
from models.pipeline import FoundryPixelPipeline
from models.sdxl import DualCLIPTextEncoder

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
    return SAMPLERS[name].from_config(comps.scheduler.config, **extra)


def make_pipeline(comps: Components, sampler: str = "ddim"):
    """The pipeline a user would load from the export, built around live modules (no copies)."""
    scheduler = make_sampler(comps, sampler)
    if comps.vae is None:
        pipe = FoundryPixelPipeline(comps.unet, comps.text_encoder, comps.tokenizer, scheduler)
    elif is_transformer(comps.unet):
        raise ValueError("export: latent-space transformer models have no pipeline here yet (diffusers' PixArt "
                         "pipelines expect a T5 text encoder); pixel-space transformer presets export and sample")
    elif isinstance(comps.text_encoder, DualCLIPTextEncoder):  # SDXL: diffusers' own pipeline, plain UNet call
        if comps.unet.config.time_cond_proj_dim is not None:
            raise ValueError("export: an SDXL model with a guidance-weight input has no pipeline here yet; export "
                             "the LCM-LoRA or use sampler=ddim")
        # the unconditional branch is the encoded empty prompt, as in training (not SDXL's zeroed embeddings)
        pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoder.text_encoder,
                                         text_encoder_2=comps.text_encoder.text_encoder_2, tokenizer=comps.tokenizer,
                                         tokenizer_2=comps.tokenizer_2, unet=comps.unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False, add_watermarker=False)
    else:  # a latent LCM student takes the guidance weight as input: diffusers' LCM pipeline passes it
        lcm = sampler == "lcm" and comps.unet.config.time_cond_proj_dim is not None
        cls = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
        pipe = cls(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_pipeline(comps: Components, out: str | Path, sampler: str = "ddim") -> Path:
    """Write a folder that `DiffusionPipeline.from_pretrained` loads (pixel models need trust_remote_code)."""
    out = Path(out)
    pipe = make_pipeline(comps, sampler)
    pipe.save_pretrained(out, safe_serialization=True)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    if comps.vae is None:
        shutil.copy(Path(__file__).with_name("pipeline.py"), out / "pipeline.py")
        index["_class_name"] = ["pipeline", FoundryPixelPipeline.__name__]
    if hasattr(comps.unet, "diffusers_class"):  # saved as the plain diffusers class (models/backbones.py, sdxl.py)
        index["unet"] = ["diffusers", comps.unet.diffusers_class.__name__]
    index_path.write_text(json.dumps(index, indent=2))
    return out
