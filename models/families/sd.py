"""Stable Diffusion 1.x/2.x and the digits-world presets: a UNet2DConditionModel over pixels or an AutoencoderKL's
latents, one CLIP text encoder (its last hidden states are the context), a DDPM or flow-matching schedule.

Pixel-space models export as `FoundryPixelPipeline` (models/pipeline.py, copied beside `model_index.json`; loads
with `trust_remote_code=True`), latent ones as diffusers' `StableDiffusionPipeline` (or the LCM pipeline for a
student with a guidance-weight input sampled with `sampler=lcm`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from models.families.base import Components, Family, backbone_class, register
from models.pipeline import FoundryPixelPipeline
from models.schedulers import load_scheduler, make_scheduler
from models.sdxl import is_sdxl_unet_config
from models.tiny import PRESETS, build_preset, build_preset_vae


class StableDiffusion(Family):
    name = "sd"
    pipelines = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline", "FoundryPixelPipeline")
    presets: ClassVar[tuple[str, ...]] = tuple(PRESETS)
    backbones: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)

    def claims(self, folder: Path, index: dict[str, Any]) -> bool:
        if index and not super().claims(folder, index):
            return False
        if backbone_class(folder) not in self.backbones + ("",) or not (folder / "unet").is_dir():
            return False  # '': a unet/ without its config is ours to report (check_folder names what is missing)
        config = folder / "unet" / "config.json"
        return not (config.is_file() and is_sdxl_unet_config(json.loads(config.read_text())))

    # ----- loading and saving -----
    def load_backbone(self, folder: Path):
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")

    def load_text(self, folder: Path) -> tuple[Any, Any, Any]:
        """(text encoder, tokenizer, second tokenizer)."""
        return CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"), \
            AutoTokenizer.from_pretrained(folder / "tokenizer"), None

    def load(self, folder: Path) -> Components:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae") if (folder / "vae").is_dir() else None
        text_encoder, tokenizer, tokenizer_2 = self.load_text(folder)
        return Components(unet=self.load_backbone(folder), text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=load_scheduler(folder), vae=vae, tokenizer_2=tokenizer_2, family=self.name)

    def build_preset(self, preset: str, resolution: int | None, seed: int, prediction_type: str | None = None,
                     beta_schedule: str = "squaredcos_cap_v2", flow_shift: float = 1.0) -> Components:
        unet, text_encoder, tokenizer = build_preset(preset, resolution or 16, seed=seed)
        return Components(unet, text_encoder, tokenizer,
                          make_scheduler(prediction_type or "epsilon", beta_schedule, flow_shift=flow_shift),
                          vae=build_preset_vae(preset, resolution or 16, seed=seed), family=self.name)

    def save_text(self, comps: Components, out: Path) -> None:
        comps.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        comps.tokenizer.save_pretrained(out / "tokenizer")

    def save(self, comps: Components, out: Path) -> None:
        comps.unet.save_pretrained(out / "unet", safe_serialization=True)
        self.save_text(comps, out)
        comps.scheduler.save_pretrained(out / "scheduler")
        if comps.vae is not None:
            comps.vae.save_pretrained(out / "vae", safe_serialization=True)

    # ----- exporting -----
    def pipeline(self, comps: Components, scheduler, sampler: str = "ddim"):
        if comps.vae is None:
            return FoundryPixelPipeline(comps.unet, comps.text_encoder, comps.tokenizer, scheduler)
        lcm = sampler == "lcm" and comps.unet.config.time_cond_proj_dim is not None
        cls = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline  # an LCM student takes w as input
        return cls(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
                   scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


register(StableDiffusion())
