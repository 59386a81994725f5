"""Z-Image: `ZImageTransformer2DModel` (a single-stream DiT with refiner blocks over 2x2 latent patches and caption
tokens, 3-axis rotary ids), Qwen3 as the text encoder (the prompt as a chat turn, penultimate hidden states of the
real tokens only), a 16-channel AutoencoderKL, flow matching. Exports as diffusers' `ZImagePipeline`, the reference
for every convention here:

- the transformer is given t' = 1 - sigma (0 = noise, 1 = clean) and predicts the negative of the flow target,
  so `FoundryZImage` passes (1000 - t) / 1000 and returns minus its output: the same `noise - x0` objective as every
  flow model here;
- captions have their own lengths: `ZImageTextEncoder` returns the padded hidden states plus a last row holding the
  attention mask, and the backbone cuts each caption to its real tokens;
- its pipeline's `guidance_scale` s computes cond + s (cond - uncond), so our scale g (uncond + g (cond - uncond)) is
  s = g - 1 (`FoundryZImagePipeline` converts; the exported plain pipeline wants s).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import AutoModel, AutoTokenizer, Qwen3Model

from models.backbones import UNetCall
from models.families.base import Components, FlowFamily, register
from models.families.text import LLMTextEncoder
from models.schedulers import load_scheduler
from models.tiny import build_chat_tokenizer, build_qwen3, build_small_vae
from models.tokens import ChatTokenizer

LATENT_CHANNELS = 16
TEMPLATE = {"enable_thinking": True}  # what ZImagePipeline passes to apply_chat_template


class ZImageTextEncoder(LLMTextEncoder):
    """Qwen3 on chat-templated ids: penultimate hidden states (zero at padding) and the mask as a last row."""

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        mask, states = self.hidden_states(input_ids)
        hidden = states[-2]
        if hidden.shape[-1] < hidden.shape[1]:
            raise ValueError(f"Z-Image text encoder: {hidden.shape[1]} tokens do not fit a mask row of width "
                             f"{hidden.shape[-1]}; lower the tokenizer's model_max_length")
        hidden = hidden * mask[..., None]
        row = torch.nn.functional.pad(mask.to(hidden.dtype), (0, hidden.shape[-1] - mask.shape[1]))
        return (torch.cat([hidden, row[:, None]], dim=1),)


def captions(context: torch.Tensor) -> list[torch.Tensor]:
    """[B, L + 1, D] from `ZImageTextEncoder` -> each caption's real tokens, [L_i, D]."""
    hidden, mask = context[:, :-1], context[:, -1, : context.shape[1] - 1] > 0.5
    return [h[m] for h, m in zip(hidden, mask)]


class FoundryZImage(UNetCall, ZImageTransformer2DModel):
    """Z-Image's transformer with the call signature of every backbone here (module docstring)."""

    diffusers_class = ZImageTransformer2DModel

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = ZImageTransformer2DModel.forward(self, list(sample.unsqueeze(2).unbind(0)), (1000 - t) / 1000,
                                               captions(context), return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(sample.dtype)

class FoundryZImagePipeline(ZImagePipeline):
    """ZImagePipeline called like every sampler here (module docstring: g -> s = g - 1)."""

    def model_space(self) -> tuple[int, int]:
        return int(self.vae.config.latent_channels), int(self.vae.config.sample_size) // self.vae_scale_factor

    def __call__(self, prompt, height: int | None = None, width: int | None = None, guidance_scale: float = 3.0,
                 eta: float = 0.0, **kwargs):
        size = self.vae.config.sample_size
        kwargs.setdefault("max_sequence_length", int(self.tokenizer.model_max_length))
        return super().__call__(prompt, height=height or size, width=width or size,
                                guidance_scale=float(guidance_scale) - 1.0, **kwargs)


@dataclass(frozen=True)
class ZImagePreset:
    dim: int
    heads: int
    layers: int
    refiner_layers: int
    axes_dims: tuple[int, int, int]
    text_hidden: int
    text_layers: int
    max_length: int
    vae_channels: tuple[int, ...]
    vocab_size: int = 512


PRESETS = {"zimage_micro": ZImagePreset(32, 2, 1, 1, (4, 6, 6), 48, 1, 40, (8, 16))}


def z_image_transformer() -> ZImageTransformer2DModel:
    """Z-Image's transformer at full size (30 blocks, 3840 wide; 6.2 B parameters) on the meta device."""
    with torch.device("meta"):
        return ZImageTransformer2DModel()


class ZImage(FlowFamily):
    name = "zimage"
    pipelines = ("ZImagePipeline",)
    preset_table = PRESETS

    def build_tiny(self, p, resolution: int, seed: int) -> Components:
        tok = build_chat_tokenizer(p.vocab_size, p.max_length)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            qwen = build_qwen3(Qwen3Model, tok, p.text_hidden, p.text_layers + 1, heads=max(1, p.text_hidden // 16))
            transformer = FoundryZImage(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS,
                                        dim=p.dim, n_layers=p.layers, n_refiner_layers=p.refiner_layers,
                                        n_heads=p.heads, n_kv_heads=p.heads, cap_feat_dim=p.text_hidden,
                                        axes_dims=list(p.axes_dims), axes_lens=[p.max_length + 64, 64, 64])
            torch.manual_seed(seed + 1)
            vae = build_small_vae(p.vae_channels, LATENT_CHANNELS, resolution)
        comps = Components(transformer, ZImageTextEncoder(qwen, tok.pad_token_id), ChatTokenizer(tok, **TEMPLATE),
                           FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, family=self.name)
        return comps

    def planning_inputs(self, comps: Components, batch: int, resolution: int,
                        context_shape: tuple[int, ...]) -> dict[str, Any]:
        """The transformer's own list inputs with every caption at full length (the memory's worst case): the
        caption mask `denoise` reads is data, which a fake-tensor trace cannot see."""
        side = resolution // comps.vae_factor
        return {"sample": [torch.empty(comps.in_channels, 1, side, side) for _ in range(batch)],
                "timestep": torch.empty(batch),
                "encoder_hidden_states": [torch.empty(context_shape[0] - 1, context_shape[1]) for _ in range(batch)]}

    def load(self, folder: Path) -> Components:
        tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        if tok.pad_token_id is None:
            raise ValueError(f"model.pretrained: '{folder / 'tokenizer'}' has no pad token; Z-Image pads prompts to "
                             "a fixed length and masks the padding")
        text = ZImageTextEncoder(AutoModel.from_pretrained(folder, subfolder="text_encoder"), tok.pad_token_id)
        return Components(FoundryZImage.from_pretrained(folder, subfolder="transformer"), text,
                          ChatTokenizer(tok, **TEMPLATE), load_scheduler(folder),
                          vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"), family=self.name)

    def model_channels(self, comps: Components) -> int:
        return int(comps.vae.config.latent_channels)

    def model_side(self, comps: Components) -> int:
        return int(comps.vae.config.sample_size) // comps.vae_factor

    def pipeline(self, comps: Components, scheduler, sampler: str = "euler"):
        return FoundryZImagePipeline(scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder.text_encoder,
                                     tokenizer=comps.tokenizer.parts[0], transformer=comps.unet)

    def pipeline_kwargs(self, comps: Components) -> dict[str, Any]:
        """For the exported ZImagePipeline: our guidance g is its `guidance_scale` g - 1."""
        return {"max_sequence_length": comps.tokenizer.model_max_length}

    def lora_loader(self):
        from diffusers.loaders import ZImageLoraLoaderMixin

        return ZImageLoraLoaderMixin, "transformer"


register(ZImage())
