"""Flux.1 (dev / schnell): `FluxTransformer2DModel` (double- and single-stream blocks over 2x2-packed latent patches
with 3-axis rotary position ids), CLIP-L for the pooled vector and T5 for the context, a 16-channel AutoencoderKL
with a shift and scale, flow matching with a resolution-dependent shift, and on dev a guidance-embedding input.
Exports as diffusers' `FluxPipeline`; its `encode_prompt`, `_pack_latents` and `_prepare_latent_image_ids` are the
reference for every convention here (tests compare against them).

- `FluxTextEncoders` runs CLIP on the first tokenizer's ids (pooler output) and T5 on the second's (last hidden
  state), and returns `[B, L + 1, D]`: the T5 context, then the pooled vector zero-padded to D as a last row.
- `FoundryFlux` takes the call every backbone here takes (`[B, 16, h, w]` latents, timesteps in [0, 1000], that
  context) and does the rest: packing, `img_ids`/`txt_ids`, t / 1000, the training guidance value (1.0 by default,
  `model.guidance`), unpacking. Called the diffusers way (`hidden_states=`), it is the plain transformer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from models.backbones import UNetCall
from models.families.base import Components, FlowFamily, backbone_class, register
from models.families.flux_lora import flux_kohya_state
from models.families.packing import pack, unpack, unpacked_callback
from models.schedulers import load_scheduler
from models.sdxl import split_packed
from models.tiny import build_small_vae, build_t5_encoder, build_text_encoder, build_tokenizer, default_caption_corpus
from models.tokens import JointTokenizer

LATENT_CHANNELS = 16


class FluxTextEncoders(torch.nn.Module):
    """CLIP (pooled) + T5 (context) on their own tokenizers' ids, one context tensor out (module docstring)."""

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel, clip_length: int):
        super().__init__()
        self.text_encoder, self.text_encoder_2, self.clip_length = clip, t5, int(clip_length)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder_2.dtype

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        pooled = self.text_encoder(input_ids[:, : self.clip_length]).pooler_output
        context = self.text_encoder_2(input_ids[:, self.clip_length:])[0]
        row = torch.nn.functional.pad(pooled.to(context.dtype), (0, context.shape[-1] - pooled.shape[-1]))
        return (torch.cat([context, row[:, None]], dim=1),)


class FoundryFlux(UNetCall, FluxTransformer2DModel):
    """Flux's transformer with the call signature of every backbone here (module docstring)."""

    diffusers_class = FluxTransformer2DModel
    train_guidance = 1.0  # the guidance-embedding value of training and sampling (Flux.1-dev; `model.guidance`)

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = sample.shape
        context, pooled = split_packed(context, self.config.pooled_projection_dim)
        guidance = torch.full((b,), float(self.train_guidance), device=sample.device, dtype=torch.float32) \
            if self.config.guidance_embeds else None
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, sample.device, sample.dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=sample.device, dtype=sample.dtype)
        out = FluxTransformer2DModel.forward(self, pack(sample), context, pooled, timestep=t / 1000, img_ids=img_ids,
                                             txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return unpack(out, h, w)

class FoundryFluxPipeline(FluxPipeline):
    """FluxPipeline called like every sampler here: `guidance_scale` is classifier-free guidance against the empty
    prompt (Flux's `true_cfg_scale`), the guidance embedding gets the training value, latents in and out unpacked.
    Exported as the plain `FluxPipeline`: pass `Flux.pipeline_kwargs` to get the same images from it."""

    def model_space(self) -> tuple[int, int]:
        """(channels, side) of the unpacked latents this pipeline takes and returns."""
        return int(self.vae.config.latent_channels), int(self.vae.config.sample_size) // self.vae_scale_factor

    @torch.no_grad()
    def __call__(self, prompt, height: int | None = None, width: int | None = None, num_inference_steps: int = 28,
                 guidance_scale: float = 3.0, negative_prompt=None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None, **kwargs):
        size = self.vae.config.sample_size
        height, width = height or size, width or size
        factor = self.vae_scale_factor
        h, w = height // factor, width // factor
        if latents is not None:
            latents = pack(latents)
        if callback_on_step_end is not None:  # the caller sees unpacked latents, as from every pipeline here
            callback_on_step_end = unpacked_callback(callback_on_step_end, h, w)
        cfg = {"true_cfg_scale": float(guidance_scale), "negative_prompt": negative_prompt or ""} \
            if guidance_scale > 1 else {}
        out = super().__call__(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                               num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                               output_type=output_type, return_dict=return_dict,
                               callback_on_step_end=callback_on_step_end, **cfg,
                               **Flux.call_kwargs(self.transformer, self.tokenizer_2), **kwargs)
        if output_type == "latent":
            images = unpack(out.images if return_dict else out[0], h, w)
            return type(out)(images=images) if return_dict else (images,)
        return out


@dataclass(frozen=True)
class FluxPreset:
    hidden: int
    heads: int
    layers: int  # double-stream blocks
    single_layers: int
    rope_axes: tuple[int, int, int]
    text_hidden: int  # CLIP
    t5_hidden: int
    text_layers: int
    text_heads: int
    max_length: int
    vae_channels: tuple[int, ...]
    vocab_size: int = 512
    guidance_embeds: bool = True


PRESETS: dict[str, FluxPreset] = {
    # the digits world: 16x16 images, 8x8x16 latents, 16 packed tokens; ~1.6 M transformer parameters
    "flux_tiny": FluxPreset(128, 4, 2, 4, (8, 12, 12), 64, 64, 2, 2, 16, (32, 64)),
    "flux_micro": FluxPreset(32, 2, 1, 1, (4, 6, 6), 16, 32, 1, 2, 12, (8, 16)),
    # ~72 M transformer parameters: weights, gradients and optimizer state that stand out of a process's own
    # overhead, for benchmarks/memory_plan.py (the planner against measured memory)
    "flux_small": FluxPreset(512, 4, 4, 8, (16, 56, 56), 64, 64, 2, 2, 16, (32, 64)),
}


def flux1_dev_transformer() -> FluxTransformer2DModel:
    """Flux.1-dev's transformer at full size (19 + 38 blocks, 3072 wide, 11.9 B parameters), built on the meta
    device: parameter counts, FLOPs and memory plans without allocating it."""
    with torch.device("meta"):
        return FluxTransformer2DModel(guidance_embeds=True)


class Flux(FlowFamily):
    name = "flux"
    pipelines = ("FluxPipeline",)
    parts = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
    preset_table = PRESETS

    def claims(self, folder: Path, index: dict[str, Any]) -> bool:
        return super().claims(folder, index) or (not index and backbone_class(folder) == "FluxTransformer2DModel")

    # ----- building -----
    def build_tiny(self, p, resolution: int, seed: int) -> Components:
        corpus = default_caption_corpus()
        tok, tok_2 = build_tokenizer(corpus, p.vocab_size, p.max_length), build_tokenizer(corpus, p.vocab_size,
                                                                                            p.max_length)
        factor = 2 ** (len(p.vae_channels) - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = build_text_encoder(p, tok)
            t5 = build_t5_encoder(p.t5_hidden, p.text_layers, p.text_heads, tok_2)
            transformer = FoundryFlux(in_channels=4 * LATENT_CHANNELS, num_layers=p.layers,
                                      num_single_layers=p.single_layers, attention_head_dim=p.hidden // p.heads,
                                      num_attention_heads=p.heads, joint_attention_dim=p.t5_hidden,
                                      pooled_projection_dim=p.text_hidden, guidance_embeds=p.guidance_embeds,
                                      axes_dims_rope=p.rope_axes)
            torch.manual_seed(seed + 1)
            vae = build_small_vae(p.vae_channels, LATENT_CHANNELS, resolution)
        tokens = (resolution // factor // 2) ** 2
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=tokens,
                                                    max_image_seq_len=16 * tokens)
        comps = Components(transformer, FluxTextEncoders(clip, t5, p.max_length), JointTokenizer(tok, tok_2),
                           scheduler, vae=vae, family=self.name)
        return comps

    def load(self, folder: Path) -> Components:
        tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        tok_2 = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
        text = FluxTextEncoders(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                                T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2"),
                                tok.model_max_length)
        return Components(FoundryFlux.from_pretrained(folder, subfolder="transformer"), text,
                          JointTokenizer(tok, tok_2), load_scheduler(folder),
                          vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"), family=self.name)

    def configure(self, comps: Components, guidance: float | None = None) -> None:
        if guidance is None:
            return
        if not comps.unet.config.guidance_embeds:
            raise ValueError(f"model.guidance={guidance}: this Flux model has no guidance embedding (schnell-style); "
                             "leave model.guidance null")
        comps.unet.train_guidance = float(guidance)

    # ----- shapes and spaces -----
    def model_channels(self, comps: Components) -> int:
        return int(comps.vae.config.latent_channels)

    def model_side(self, comps: Components) -> int:
        return int(comps.vae.config.sample_size) // comps.vae_factor

    # ----- exporting -----
    def pipeline(self, comps: Components, scheduler, sampler: str = "euler"):
        clip, t5 = comps.text_encoder.text_encoder, comps.text_encoder.text_encoder_2
        tok, tok_2 = comps.tokenizer.parts
        return FoundryFluxPipeline(scheduler=scheduler, vae=comps.vae, text_encoder=clip, tokenizer=tok,
                                   text_encoder_2=t5, tokenizer_2=tok_2, transformer=comps.unet)

    @staticmethod
    def call_kwargs(transformer, tokenizer_2) -> dict[str, Any]:
        return {"guidance_scale": float(getattr(transformer, "train_guidance", 1.0)),
                "max_sequence_length": int(tokenizer_2.model_max_length)}

    def pipeline_kwargs(self, comps: Components) -> dict[str, Any]:
        return self.call_kwargs(comps.unet, comps.tokenizer.parts[1])

    # attention of both streams, the MLPs, the single blocks' fused MLP input: the layers peer trainers adapt, all
    # with a place in the kohya/ComfyUI layout (models/families/flux_lora.py)
    adapter_targets = {"attn_mlp": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                    "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                    "ff_context.net.2", "proj_mlp"]}

    def kohya_state(self, comps: Components, state: dict[str, torch.Tensor], alpha: float):
        return flux_kohya_state(state, alpha, comps.unet)

    def lora_loader(self):
        from diffusers.loaders import FluxLoraLoaderMixin

        return FluxLoraLoaderMixin, "transformer"


register(Flux())
