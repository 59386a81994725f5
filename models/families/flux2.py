"""Flux.2 [klein]: `Flux2Transformer2DModel` (double- and single-stream blocks, 4-axis rotary ids) over latents that
are 2x2-patchified and batch-normalized, Qwen3 as the text encoder (the prompt as a chat turn without thinking;
hidden states of three layers at a quarter, half and three quarters of its depth, side by side), the 32-channel
`AutoencoderKLFlux2`. Exports as diffusers' `Flux2KleinPipeline`, the reference for these conventions.

The model space here is the pipeline's: `[B, 4 C, h/2, w/2]`, patchified VAE latents normalized by the VAE's
batch-norm running statistics. `FoundryFlux2` turns it into tokens with their (t, h, w, l) ids, passes t / 1000 and
no guidance embedding (klein samples with classifier-free guidance; its distilled variants take none), and back.
Training draws timesteps with the shift the pipeline samples with at its default 50 steps (its empirical mu).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from transformers import AutoTokenizer, Qwen3ForCausalLM

from models.backbones import UNetCall
from models.families.base import Components, FlowFamily, register
from models.families.text import LLMTextEncoder
from models.schedulers import load_scheduler
from models.tiny import build_chat_tokenizer, build_qwen3, build_small_vae
from models.tokens import ChatTokenizer

TEMPLATE = {"enable_thinking": False}  # what Flux2KleinPipeline passes to apply_chat_template
SAMPLING_STEPS = 50  # the pipeline's default; the training shift is its sampling shift at this many steps


def out_layers(model) -> tuple[int, int, int]:
    """The hidden-state layers Flux.2 reads: (9, 18, 27) of Qwen3's 36, the same fractions of a smaller model."""
    n = int(model.config.num_hidden_layers)
    return n // 4, n // 2, 3 * n // 4


class Flux2TextEncoder(LLMTextEncoder):
    """Qwen3 on chat-templated ids; three layers' hidden states side by side, `[B, L, 3 D]` (padding included, as the
    pipeline passes it)."""

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        _, states = self.hidden_states(input_ids)
        return (torch.cat([states[k] for k in out_layers(self.text_encoder)], dim=-1),)


def patchify(x: torch.Tensor) -> torch.Tensor:
    return Flux2KleinPipeline._patchify_latents(x)


def tokens_to_space(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`[B, h w, C]` tokens in raster order (the pipeline's `_pack_latents`) -> `[B, C, h, w]`."""
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], h, w)


class FoundryFlux2(UNetCall, Flux2Transformer2DModel):
    """Flux.2's transformer with the call signature of every backbone here (module docstring)."""

    diffusers_class = Flux2Transformer2DModel

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, h, w = sample.shape
        img_ids = Flux2KleinPipeline._prepare_latent_ids(sample).to(sample.device)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(context).to(sample.device)
        out = Flux2Transformer2DModel.forward(self, Flux2KleinPipeline._pack_latents(sample), context,
                                              timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=None,
                                              return_dict=False)[0]
        return tokens_to_space(out, h, w)

class FoundryFlux2Pipeline(Flux2KleinPipeline):
    """Flux2KleinPipeline called like every sampler here: latents in (and, for `output_type="latent"`, out) in the
    model space, the text encoder's layers and length as trained."""

    def model_space(self) -> tuple[int, int]:
        return 4 * int(self.vae.config.latent_channels), int(self.vae.config.sample_size) // self.vae_scale_factor // 2

    def __call__(self, prompt, height: int | None = None, width: int | None = None, eta: float = 0.0,
                 callback_on_step_end=None, output_type: str = "pil", return_dict: bool = True, **kwargs):
        size = self.vae.config.sample_size
        height, width = height or size, width or size
        h, w = height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2
        kwargs.setdefault("max_sequence_length", int(self.tokenizer.model_max_length))
        kwargs.setdefault("text_encoder_out_layers", out_layers(self.text_encoder))
        if callback_on_step_end is not None:  # the caller sees model-space latents, as from every pipeline here
            user = callback_on_step_end

            def callback_on_step_end(pipe, i, t, tensors):
                out = user(pipe, i, t, {**tensors, "latents": tokens_to_space(tensors["latents"], h, w)})
                new = out.get("latents")
                return tensors if new is None else {**tensors, "latents": Flux2KleinPipeline._pack_latents(new)}
        out = super().__call__(prompt=prompt, height=height, width=width, callback_on_step_end=callback_on_step_end,
                               output_type=output_type, return_dict=return_dict, **kwargs)
        if output_type == "latent":  # the pipeline returns VAE latents: back to the model space
            images = Flux2.normalize(self.vae, patchify(out.images if return_dict else out[0]))
            return type(out)(images=images) if return_dict else (images,)
        return out


@dataclass(frozen=True)
class Flux2Preset:
    hidden: int
    heads: int
    layers: int
    single_layers: int
    rope_axes: tuple[int, int, int, int]
    text_hidden: int
    text_layers: int
    max_length: int
    vae_channels: tuple[int, ...]
    latent_channels: int = 8
    vocab_size: int = 512


PRESETS = {"flux2_klein_micro": Flux2Preset(32, 2, 1, 1, (4, 4, 4, 4), 32, 4, 48, (8, 16))}


def flux2_klein_4b_transformer() -> Flux2Transformer2DModel:
    """Flux.2 [klein] 4B's transformer (5 + 20 blocks, 3072 wide, Qwen3-4B's 3 x 2560 text features) on meta."""
    with torch.device("meta"):
        return Flux2Transformer2DModel(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                       joint_attention_dim=7680, guidance_embeds=False)


class Flux2(FlowFamily):
    name = "flux2"
    pipelines = ("Flux2KleinPipeline",)
    preset_table = PRESETS
    patch = 1  # the 2x2 patchify is part of its model space (vae_factor), the transformer cuts none

    def build_tiny(self, p, resolution: int, seed: int) -> Components:
        tok = build_chat_tokenizer(p.vocab_size, p.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            qwen = build_qwen3(Qwen3ForCausalLM, tok, p.text_hidden, p.text_layers)
            transformer = FoundryFlux2(in_channels=4 * p.latent_channels, num_layers=p.layers,
                                       num_single_layers=p.single_layers, attention_head_dim=p.hidden // p.heads,
                                       num_attention_heads=p.heads, joint_attention_dim=3 * p.text_hidden,
                                       axes_dims_rope=p.rope_axes, guidance_embeds=False)
            torch.manual_seed(seed + 1)
            vae = build_small_vae(p.vae_channels, p.latent_channels, resolution, cls=AutoencoderKLFlux2)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        comps = Components(transformer, Flux2TextEncoder(qwen, tok.pad_token_id), ChatTokenizer(tok, **TEMPLATE),
                           scheduler, vae=vae, family=self.name)
        return comps

    def load(self, folder: Path) -> Components:
        tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        if tok.pad_token_id is None:
            raise ValueError(f"model.pretrained: '{folder / 'tokenizer'}' has no pad token; Flux.2 pads prompts")
        text = Flux2TextEncoder(Qwen3ForCausalLM.from_pretrained(folder, subfolder="text_encoder"), tok.pad_token_id)
        return Components(FoundryFlux2.from_pretrained(folder, subfolder="transformer"), text,
                          ChatTokenizer(tok, **TEMPLATE), load_scheduler(folder),
                          vae=AutoencoderKLFlux2.from_pretrained(folder, subfolder="vae"), family=self.name)

    # ----- shapes and spaces -----
    def vae_factor(self, vae) -> int:
        """Pixels per model-space cell: the VAE's downsampling, then the 2x2 patchify."""
        return 2 ** len(vae.config.block_out_channels)

    def model_channels(self, comps: Components) -> int:
        return 4 * int(comps.vae.config.latent_channels)

    def model_side(self, comps: Components) -> int:
        return int(comps.vae.config.sample_size) // comps.vae_factor

    @staticmethod
    def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @classmethod
    def normalize(cls, vae, patchified: torch.Tensor) -> torch.Tensor:
        mean, std = cls._bn(vae, patchified)
        return (patchified - mean) / std

    def encode_latents(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        _, std = self._bn(vae, dist.mean)
        return self.normalize(vae, patchify(dist.mean)), patchify(dist.std) / std

    def decode_latents(self, vae, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn(vae, z)
        return vae.decode(Flux2KleinPipeline._unpatchify_latents(z * std + mean).to(vae.dtype)).sample

    def training_shift(self, comps: Components, shape: torch.Size) -> float | None:
        return math.exp(compute_empirical_mu(image_seq_len=shape[-2] * shape[-1], num_steps=SAMPLING_STEPS))

    # ----- exporting -----
    def pipeline(self, comps: Components, scheduler, sampler: str = "euler"):
        return FoundryFlux2Pipeline(scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder.text_encoder,
                                    tokenizer=comps.tokenizer.parts[0], transformer=comps.unet)

    def pipeline_kwargs(self, comps: Components) -> dict[str, Any]:
        return {"max_sequence_length": comps.tokenizer.model_max_length,
                "text_encoder_out_layers": out_layers(comps.text_encoder.text_encoder)}

    def lora_loader(self):
        from diffusers.loaders import Flux2LoraLoaderMixin

        return Flux2LoraLoaderMixin, "transformer"


register(Flux2())
