"""SDXL: a UNet with size/crop micro-conditioning (`addition_embed_type="text_time"`) and two CLIP text encoders
behind one module (models/sdxl.py explains the packed context); exports as diffusers' `StableDiffusionXLPipeline`
with the unconditional branch the encoded empty prompt, as in training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionXLPipeline
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from models.families.base import Components, register
from models.families.sd import StableDiffusion
from models.sdxl import DualCLIPTextEncoder, FoundrySDXLUNet, is_sdxl_unet_config


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    parts = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    presets = ()

    def claims(self, folder: Path, index: dict[str, Any]) -> bool:
        if index:
            return index.get("_class_name") in self.pipelines
        config = folder / "unet" / "config.json"
        return config.is_file() and is_sdxl_unet_config(json.loads(config.read_text()))

    def load_backbone(self, folder: Path):
        unet = FoundrySDXLUNet.from_pretrained(folder, subfolder="unet")
        if (folder / "vae" / "config.json").is_file():
            blocks = json.loads((folder / "vae" / "config.json").read_text()).get("block_out_channels", [0] * 4)
            unet.vae_scale_factor = 2 ** (len(blocks) - 1)
        return unet

    def load_text(self, folder: Path):
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        tokenizer_2 = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
        if len(tokenizer_2) != len(tokenizer) or tokenizer_2.eos_token_id != tokenizer.eos_token_id:
            raise ValueError(f"model.pretrained: '{folder}': tokenizer/ and tokenizer_2/ differ in vocabulary or "
                             "end-of-text token; SDXL's two tokenizers share CLIP's vocabulary")
        dual = DualCLIPTextEncoder(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                                   CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id_2=tokenizer_2.pad_token_id)
        return dual, tokenizer, tokenizer_2

    def save_text(self, comps: Components, out: Path) -> None:
        comps.text_encoder.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        comps.text_encoder.text_encoder_2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
        comps.tokenizer.save_pretrained(out / "tokenizer")
        comps.tokenizer_2.save_pretrained(out / "tokenizer_2")

    def pipeline(self, comps: Components, scheduler, sampler: str = "ddim"):
        if comps.unet.config.time_cond_proj_dim is not None:
            raise ValueError("export: an SDXL model with a guidance-weight input has no pipeline here yet; export "
                             "the LCM-LoRA or use sampler=ddim")
        return StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoder.text_encoder,
                                         text_encoder_2=comps.text_encoder.text_encoder_2, tokenizer=comps.tokenizer,
                                         tokenizer_2=comps.tokenizer_2, unet=comps.unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=False, add_watermarker=False)


register(StableDiffusionXL())
