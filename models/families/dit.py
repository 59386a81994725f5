"""The digits world's transformers: a PixArt-style DiT (`PixArtTransformer2DModel`) or an SD3-style MMDiT
(`SD3Transformer2DModel`, pooled vector = mean of the CLIP hidden states) over pixels, one CLIP text encoder,
exported as `FoundryPixelPipeline` (models/backbones.py, models/pipeline.py). Real SD3/SD3.5 folders with their
three text encoders are the `sd3` family."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from models.backbones import TRANSFORMER_PRESETS, FoundryMMDiT, FoundryPixArt
from models.families.base import Components, backbone_class, register
from models.families.sd import StableDiffusion

BACKBONES = {"PixArtTransformer2DModel": FoundryPixArt, "SD3Transformer2DModel": FoundryMMDiT}


class PixelTransformer(StableDiffusion):
    name = "dit"
    pipelines = ("FoundryPixelPipeline",)
    presets = tuple(TRANSFORMER_PRESETS)
    backbones = tuple(BACKBONES)

    def claims(self, folder: Path, index: dict[str, Any]) -> bool:
        if index and index.get("_class_name") != ["pipeline", "FoundryPixelPipeline"]:
            return False
        return backbone_class(folder) in self.backbones and (folder / "unet").is_dir()

    def load_backbone(self, folder: Path):
        return BACKBONES[backbone_class(folder)].from_pretrained(folder, subfolder="unet")

    def packing(self, comps: Components) -> int:
        return int(comps.unet.config.patch_size)

    def pipeline(self, comps: Components, scheduler, sampler: str = "ddim"):
        if comps.vae is not None:
            raise ValueError("export: latent-space PixArt/MMDiT presets have no pipeline here (diffusers' PixArt "
                             "pipelines expect a T5 text encoder); pixel-space transformer presets export and sample")
        return super().pipeline(comps, scheduler, sampler)


register(PixelTransformer())
