"""Stable Diffusion 3 / 3.5: `SD3Transformer2DModel` (MMDiT; 3.5 adds qk-norm and, on medium, dual-attention
layers), three text encoders (CLIP-L and OpenCLIP bigG with projection, T5), a 16-channel AutoencoderKL with shift
and scale, flow matching with a static shift (3.0). Exports as diffusers' `StableDiffusion3Pipeline`, whose
`encode_prompt` is the reference: penultimate CLIP hidden states of both encoders side by side, zero-padded to T5's
width, then T5's tokens after them; the pooled vector is both CLIP projections side by side.

`SD3TextEncoders` returns that context plus the pooled vector as a last row (`[B, L_clip + L_t5 + 1, D]`);
`FoundrySD3` splits it back (called the diffusers way, it is the plain transformer). The digits world's MMDiT
preset with one CLIP encoder is the `dit` family.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from models.backbones import UNetCall
from models.families.base import Components, FlowFamily, register
from models.schedulers import load_scheduler
from models.sdxl import split_packed
from models.tiny import build_small_vae, build_t5_encoder, build_text_encoder, build_tokenizer, default_caption_corpus
from models.tokens import JointTokenizer

LATENT_CHANNELS = 16


class SD3TextEncoders(torch.nn.Module):
    """CLIP-L, CLIP-G and T5 on their own tokenizers' ids, one context tensor out (module docstring)."""

    def __init__(self, clip_l: CLIPTextModelWithProjection, clip_g: CLIPTextModelWithProjection,
                 t5: T5EncoderModel, clip_length: int):
        super().__init__()
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = clip_l, clip_g, t5
        self.clip_length = int(clip_length)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        n = self.clip_length
        out_l = self.text_encoder(input_ids[:, :n], output_hidden_states=True)
        out_g = self.text_encoder_2(input_ids[:, n: 2 * n], output_hidden_states=True)
        t5 = self.text_encoder_3(input_ids[:, 2 * n:])[0]
        clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)
        row = torch.nn.functional.pad(pooled.to(t5.dtype), (0, t5.shape[-1] - pooled.shape[-1]))
        return (torch.cat([clip.to(t5.dtype), t5, row[:, None]], dim=1),)


class FoundrySD3(UNetCall, SD3Transformer2DModel):
    """SD3's transformer with the call signature of every backbone here (module docstring)."""

    diffusers_class = SD3Transformer2DModel

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context, pooled = split_packed(context, self.config.pooled_projection_dim)
        return SD3Transformer2DModel.forward(self, sample, context, pooled, t, return_dict=False)[0]

class FoundrySD3Pipeline(StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline that tokenizes T5 to the length the model was trained with (exported as the plain
    pipeline: pass `max_sequence_length` yourself, see `SD3.pipeline_kwargs`)."""

    def model_space(self) -> tuple[int, int]:
        return int(self.transformer.config.in_channels), int(self.transformer.config.sample_size)

    def __call__(self, *args, eta: float = 0.0, **kwargs):
        kwargs.setdefault("max_sequence_length", int(self.tokenizer_3.model_max_length))
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class SD3Preset:
    hidden: int
    heads: int
    layers: int
    text_hidden: int  # CLIP-L and CLIP-G (same size here)
    clip_projection: int
    t5_hidden: int
    text_layers: int
    text_heads: int
    max_length: int
    vae_channels: tuple[int, ...]
    dual_attention_layers: tuple[int, ...] = (0,)  # SD3.5-medium's MMDiT-X blocks
    vocab_size: int = 512


PRESETS = {
    # the digits world: 16x16 images, 8x8x16 latents, 16 patch tokens; SD3.5-medium's block mix (dual attention in
    # the first blocks, qk-norm everywhere)
    "sd35_tiny": SD3Preset(128, 4, 4, 64, 32, 64, 2, 2, 16, (32, 64), dual_attention_layers=(0, 1)),
    "sd35_micro": SD3Preset(32, 2, 2, 16, 16, 32, 1, 2, 12, (8, 16)),
}


def sd35_large_transformer() -> SD3Transformer2DModel:
    """SD3.5-large's transformer (38 blocks, 2432 wide, qk-norm; 8.1 B parameters) on the meta device."""
    with torch.device("meta"):
        return SD3Transformer2DModel(sample_size=128, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                                     joint_attention_dim=4096, caption_projection_dim=2432,
                                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                                     qk_norm="rms_norm")


class SD3(FlowFamily):
    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)
    parts = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
             "tokenizer_3", "vae", "scheduler")
    preset_table = PRESETS

    def build_tiny(self, p, resolution: int, seed: int) -> Components:
        corpus = default_caption_corpus()
        toks = [build_tokenizer(corpus, p.vocab_size, p.max_length) for _ in range(3)]
        factor = 2 ** (len(p.vae_channels) - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoders = [build_text_encoder(p, tok, projection_dim=p.clip_projection) for tok in toks[:2]]
            t5 = build_t5_encoder(p.t5_hidden, p.text_layers, p.text_heads, toks[2])
            transformer = FoundrySD3(sample_size=resolution // factor, patch_size=2, in_channels=LATENT_CHANNELS,
                                     num_layers=p.layers, attention_head_dim=p.hidden // p.heads,
                                     num_attention_heads=p.heads, joint_attention_dim=p.t5_hidden,
                                     caption_projection_dim=p.hidden, pooled_projection_dim=2 * p.clip_projection,
                                     out_channels=LATENT_CHANNELS, pos_embed_max_size=resolution // factor // 2 + 8,
                                     qk_norm="rms_norm", dual_attention_layers=p.dual_attention_layers)
            torch.manual_seed(seed + 1)
            vae = build_small_vae(p.vae_channels, LATENT_CHANNELS, resolution)
        comps = Components(transformer, SD3TextEncoders(*encoders, t5, p.max_length), JointTokenizer(*toks),
                           FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, family=self.name)
        return comps

    def load(self, folder: Path) -> Components:
        toks = [AutoTokenizer.from_pretrained(folder / name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        if toks[0].model_max_length != toks[1].model_max_length:
            raise ValueError(f"model.pretrained: '{folder}': tokenizer/ and tokenizer_2/ differ in length "
                             f"({toks[0].model_max_length} vs {toks[1].model_max_length}); SD3 pads both CLIP prompts "
                             "to the first one's length")
        text = SD3TextEncoders(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder"),
                               CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
                               T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3"),
                               toks[0].model_max_length)
        return Components(FoundrySD3.from_pretrained(folder, subfolder="transformer"), text, JointTokenizer(*toks),
                          load_scheduler(folder), vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                          family=self.name)

    def model_channels(self, comps: Components) -> int:
        return int(comps.vae.config.latent_channels)

    def model_side(self, comps: Components) -> int:
        return int(comps.unet.config.sample_size)

    def packing(self, comps: Components) -> int:
        return int(comps.unet.config.patch_size)

    def pipeline(self, comps: Components, scheduler, sampler: str = "euler"):
        enc = comps.text_encoder
        tok, tok_2, tok_3 = comps.tokenizer.parts
        return FoundrySD3Pipeline(transformer=comps.unet, scheduler=scheduler, vae=comps.vae,
                                  text_encoder=enc.text_encoder, tokenizer=tok, text_encoder_2=enc.text_encoder_2,
                                  tokenizer_2=tok_2, text_encoder_3=enc.text_encoder_3, tokenizer_3=tok_3)

    def pipeline_kwargs(self, comps: Components) -> dict[str, Any]:
        return {"max_sequence_length": int(comps.tokenizer.parts[2].model_max_length)}

    def lora_loader(self):
        from diffusers.loaders import SD3LoraLoaderMixin

        return SD3LoraLoaderMixin, "transformer"


register(SD3())
