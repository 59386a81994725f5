"""Qwen-Image: `QwenImageTransformer2DModel` (MMDiT over 2x2-packed latent patches, 3-axis rotary ids),
Qwen2.5-VL as the text encoder (the prompt inside a fixed system template, last hidden states of the real tokens
after the template's first 34), a causal 3-D VAE (`AutoencoderKLQwenImage`, one frame for images) with per-channel
latent mean and std, flow matching with a resolution-dependent shift. Exports as diffusers' `QwenImagePipeline`,
the reference for these conventions; its classifier-free guidance (`true_cfg_scale` with a negative prompt)
rescales the guided prediction to the conditional one's norm, and sampling here goes through that pipeline.

`QwenTextEncoder` returns the caption states padded to a fixed length plus a mask row; `FoundryQwenImage` packs the
latents, builds `img_shapes`, passes the mask and t / 1000, and unpacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from models.backbones import UNetCall
from models.families.base import Components, FlowFamily, register
from models.families.packing import pack, unpack, unpacked_callback
from models.families.text import LLMTextEncoder
from models.schedulers import load_scheduler
from models.tiny import build_tokenizer, default_caption_corpus

LATENT_CHANNELS = 16
NATIVE_RESOLUTION = 1024
# QwenImagePipeline's prompt template and the number of leading template tokens it drops (set in its __init__;
# tests compare the encodings with the pipeline's, so a change upstream shows there)
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34


class TemplateTokenizer:
    """Each prompt inside Qwen-Image's template, padded to `model_max_length` (the caption length) + DROP."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.parts, self.caption_length = (tokenizer,), int(max_length)

    @property
    def model_max_length(self) -> int:
        return self.caption_length + DROP

    def tokenize_prompts(self, prompts) -> torch.Tensor:
        ids = self.parts[0]([TEMPLATE.format(p) for p in prompts], padding="max_length",
                            max_length=self.model_max_length, truncation=True, return_tensors="pt").input_ids
        return ids.to(torch.int64)


class QwenTextEncoder(LLMTextEncoder):
    """Qwen2.5-VL's last hidden states of each prompt's real tokens after the template's first DROP, left-aligned and
    zero-padded to the caption length, with the mask as a last row."""

    def __init__(self, model, pad_token_id: int, caption_length: int):
        super().__init__(model, pad_token_id)
        self.caption_length = int(caption_length)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        mask, states = self.hidden_states(input_ids)
        hidden = states[-1]
        n, width = self.caption_length, hidden.shape[-1]
        out = hidden.new_zeros(hidden.shape[0], n + 1, width)
        for i, (h, m) in enumerate(zip(hidden, mask)):
            caption = h[m][DROP: DROP + n]
            out[i, : caption.shape[0]] = caption
            out[i, n, : caption.shape[0]] = 1.0  # the mask row
        return (out,)


def split_mask(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = context.shape[1] - 1
    return context[:, :n], context[:, n, :n] > 0.5


class FoundryQwenImage(UNetCall, QwenImageTransformer2DModel):
    """Qwen-Image's transformer with the call signature of every backbone here (module docstring)."""

    diffusers_class = QwenImageTransformer2DModel

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = sample.shape
        context, mask = split_mask(context)
        out = QwenImageTransformer2DModel.forward(self, pack(sample), context, mask.long(), timestep=t / 1000,
                                                  img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack(out, h, w)

class FoundryQwenImagePipeline(QwenImagePipeline):
    """QwenImagePipeline called like every sampler here: `guidance_scale` is classifier-free guidance against the empty
    prompt (its `true_cfg_scale`), latents in and out unpacked, the model's own size by default."""

    native_resolution = NATIVE_RESOLUTION

    def model_space(self) -> tuple[int, int]:
        return LATENT_CHANNELS, self.native_resolution // self.vae_scale_factor

    def __call__(self, prompt, height: int | None = None, width: int | None = None, guidance_scale: float = 3.0,
                 negative_prompt=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None, eta: float = 0.0, **kwargs):
        height, width = height or self.native_resolution, width or self.native_resolution
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        cfg = {"true_cfg_scale": float(guidance_scale), "negative_prompt": negative_prompt or ""} \
            if guidance_scale > 1 else {"true_cfg_scale": 1.0}
        kwargs.setdefault("max_sequence_length", int(self.tokenizer.model_max_length) - DROP)
        out = super().__call__(prompt, height=height, width=width, latents=None if latents is None else pack(latents),
                               output_type=output_type, return_dict=return_dict,
                               callback_on_step_end=callback_on_step_end and unpacked_callback(callback_on_step_end,
                                                                                               h, w), **cfg, **kwargs)
        if output_type == "latent":
            images = unpack(out.images if return_dict else out[0], h, w)
            return type(out)(images=images) if return_dict else (images,)
        return out


@dataclass(frozen=True)
class QwenPreset:
    hidden: int
    heads: int
    layers: int
    rope_axes: tuple[int, int, int]
    text_hidden: int
    text_layers: int
    caption_length: int
    vae_dim: int
    vocab_size: int = 512


PRESETS = {"qwen_image_micro": QwenPreset(32, 2, 1, (4, 6, 6), 48, 1, 24, 16, vocab_size=600)}


def qwen_image_transformer() -> QwenImageTransformer2DModel:
    """Qwen-Image's transformer at full size (60 blocks, 3072 wide; 20 B parameters) on the meta device."""
    with torch.device("meta"):
        return QwenImageTransformer2DModel()


def _qwen_vl(p: QwenPreset, tok) -> Qwen2_5_VLForConditionalGeneration:
    heads = 3
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text = dict(vocab_size=len(tok), hidden_size=p.text_hidden, intermediate_size=2 * p.text_hidden,
                num_hidden_layers=p.text_layers, num_attention_heads=heads, num_key_value_heads=1,
                max_position_embeddings=4 * (p.caption_length + DROP) + 64,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **ids)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=p.text_hidden,
                  fullatt_block_indexes=[0], patch_size=2, spatial_merge_size=1, temporal_patch_size=1)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))


class QwenImage(FlowFamily):
    name = "qwen_image"
    pipelines = ("QwenImagePipeline",)
    preset_table = PRESETS

    def build_tiny(self, p, resolution: int, seed: int) -> Components:
        # the template in the corpus, so the small BPE spends few tokens on it (Qwen's own: 34 before the prompt)
        tok = build_tokenizer(default_caption_corpus() + [TEMPLATE.format("")] * 20, p.vocab_size,
                              p.caption_length + DROP)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text = QwenTextEncoder(_qwen_vl(p, tok), tok.pad_token_id, p.caption_length)
            transformer = FoundryQwenImage(patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                           num_layers=p.layers, attention_head_dim=p.hidden // p.heads,
                                           num_attention_heads=p.heads, joint_attention_dim=p.text_hidden,
                                           axes_dims_rope=p.rope_axes)
            torch.manual_seed(seed + 1)
            vae = AutoencoderKLQwenImage(base_dim=p.vae_dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                         temperal_downsample=[False], latents_mean=[0.0] * LATENT_CHANNELS,
                                         latents_std=[1.0] * LATENT_CHANNELS)
        tokens = (resolution // 4) ** 2
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=0.9, base_image_seq_len=tokens,
                                                    max_image_seq_len=16 * tokens)
        comps = Components(transformer, text, TemplateTokenizer(tok, p.caption_length), scheduler, vae=vae,
                           family=self.name, native_resolution=resolution)
        return comps

    def load(self, folder: Path) -> Components:
        tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
        if tok.pad_token_id is None:
            raise ValueError(f"model.pretrained: '{folder / 'tokenizer'}' has no pad token; Qwen-Image pads prompts")
        caption = int(tok.model_max_length) - DROP if tok.model_max_length < 10**6 else 1024
        text = QwenTextEncoder(Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, subfolder="text_encoder"),
                               tok.pad_token_id, caption)
        return Components(FoundryQwenImage.from_pretrained(folder, subfolder="transformer"), text,
                          TemplateTokenizer(tok, caption), load_scheduler(folder),
                          vae=AutoencoderKLQwenImage.from_pretrained(folder, subfolder="vae"), family=self.name)

    # ----- shapes and spaces -----
    def vae_factor(self, vae) -> int:
        return 2 ** len(vae.config.temperal_downsample)

    def model_channels(self, comps: Components) -> int:
        return int(comps.vae.config.z_dim)

    def model_side(self, comps: Components) -> int:
        return (comps.native_resolution or NATIVE_RESOLUTION) // comps.vae_factor

    def _stats(self, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1)
        return (torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape),
                torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape))

    def encode_latents(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.to(vae.dtype)[:, :, None]).latent_dist  # one frame
        mean, std = dist.mean[:, :, 0], dist.std[:, :, 0]
        mu, sigma = self._stats(vae, mean)
        return (mean - mu) / sigma, std / sigma

    def decode_latents(self, vae, z: torch.Tensor) -> torch.Tensor:
        mu, sigma = self._stats(vae, z)
        return vae.decode((z * sigma + mu).to(vae.dtype)[:, :, None]).sample[:, :, 0]

    # ----- exporting -----
    def pipeline(self, comps: Components, scheduler, sampler: str = "euler"):
        pipe = FoundryQwenImagePipeline(scheduler=scheduler, vae=comps.vae, transformer=comps.unet,
                                        text_encoder=comps.text_encoder.text_encoder,
                                        tokenizer=comps.tokenizer.parts[0])
        pipe.native_resolution = comps.resolution
        return pipe

    def pipeline_kwargs(self, comps: Components) -> dict[str, Any]:
        """For the exported QwenImagePipeline (with `true_cfg_scale=g, negative_prompt=""` for guidance g > 1)."""
        return {"max_sequence_length": comps.tokenizer.caption_length}

    def lora_loader(self):
        from diffusers.loaders import QwenImageLoraLoaderMixin

        return QwenImageLoraLoaderMixin, "transformer"


register(QwenImage())
