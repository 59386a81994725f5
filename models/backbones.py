"""Transformer backbones from diffusers, called exactly like the UNet so every method, the loop and the sampler work
on them unchanged: `model(sample, timestep, encoder_hidden_states=...) -> .sample`.

`FoundryPixArt` is diffusers' `PixArtTransformer2DModel` (DiT blocks with adaLN-single timestep conditioning and
cross-attention to the text encoder's hidden states) with the UNet's call signature. On disk it is the plain
diffusers class (`save_pretrained` writes `PixArtTransformer2DModel`), so exported folders load in diffusers without
this code, and PixArt/DiT folders load here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import PixArtTransformer2DModel

NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}


class FoundryPixArt(PixArtTransformer2DModel):
    """PixArt-α / DiT-style transformer with the UNet's call signature (see the module docstring)."""

    unet_call = True  # the sampler calls it like a UNet

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None, return_dict: bool = True, **kwargs):
        if timestep_cond is not None:
            raise ValueError("model.guidance_embedding: transformer presets take no guidance-weight input; distil "
                             "them with classifier-free guidance (method.guidance) or use a UNet preset")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t
        return super().forward(sample, encoder_hidden_states=encoder_hidden_states, timestep=t,
                               added_cond_kwargs=NO_EXTRA_CONDITIONS, return_dict=return_dict, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Written as the plain diffusers class, so the folder needs none of this code to load."""
        cls = self.__class__
        try:
            self.__class__ = PixArtTransformer2DModel
            return PixArtTransformer2DModel.save_pretrained(self, *args, **kwargs)
        finally:
            self.__class__ = cls


def is_transformer(model: torch.nn.Module) -> bool:
    return isinstance(model, PixArtTransformer2DModel)


@dataclass(frozen=True)
class TransformerPreset:
    """Sizes of a DiT preset and of its small CLIP text encoder (same fields as the UNet presets' text side)."""

    hidden: int
    heads: int
    layers: int
    patch_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    max_length: int
    vocab_size: int


TRANSFORMER_PRESETS: dict[str, TransformerPreset] = {
    # ~1 M transformer parameters, like tiny_pixel's UNet: 64 patch tokens of 2x2 pixels at 16x16.
    "dit_tiny": TransformerPreset(128, 4, 4, 2, 64, 2, 2, 16, 512),
    # Test-sized.
    "dit_micro": TransformerPreset(32, 2, 1, 2, 16, 1, 2, 12, 300),
    # DiT-XL/2 / PixArt-α size (28 blocks, 1152 wide, 675 M in the blocks): for GPU benchmarks at 32x32 latents.
    "dit_xl2": TransformerPreset(1152, 16, 28, 2, 768, 2, 12, 77, 512),
}


def build_transformer(p: TransformerPreset, resolution: int, in_channels: int, preset: str) -> FoundryPixArt:
    if resolution % p.patch_size:
        raise ValueError(f"model.resolution={resolution}: preset '{preset}' cuts {p.patch_size}x{p.patch_size} "
                         f"patches, which must divide the input size; use a multiple of {p.patch_size}")
    return FoundryPixArt(num_attention_heads=p.heads, attention_head_dim=p.hidden // p.heads, in_channels=in_channels,
                         out_channels=in_channels, num_layers=p.layers, sample_size=resolution,
                         patch_size=p.patch_size, cross_attention_dim=p.hidden, caption_channels=p.text_hidden,
                         use_additional_conditions=False)
