"""Transformer backbones from diffusers, called exactly like the UNet so every method, the loop and the sampler work
on them unchanged: `model(sample, timestep, encoder_hidden_states=...) -> .sample`.

- `FoundryPixArt` is diffusers' `PixArtTransformer2DModel` (DiT blocks with adaLN-single timestep conditioning and
  cross-attention to the text encoder's hidden states).
- `FoundryMMDiT` is diffusers' `SD3Transformer2DModel` (SD3's MMDiT: joint attention over image and text tokens, the
  timestep and a pooled text vector modulating every block). SD3 takes a pooled vector from its CLIP encoders'
  projection heads; here it is the mean of the text hidden states (`pipeline.pooled_text`), so the backbone needs only
  the one CLIP text encoder every model here has, and the exported pipeline computes it the same way.

On disk each is the plain diffusers class (`save_pretrained` writes `PixArtTransformer2DModel` /
`SD3Transformer2DModel`), so exported folders load in diffusers without this code, and such folders load here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from models.pipeline import pooled_text

NO_EXTRA_CONDITIONS = {"resolution": None, "aspect_ratio": None}


def _batched(timestep, sample: torch.Tensor, timestep_cond) -> torch.Tensor:
    if timestep_cond is not None:
        raise ValueError("model.guidance_embedding: transformer presets take no guidance-weight input; distil "
                         "them with classifier-free guidance (method.guidance) or use a UNet preset")
    t = torch.as_tensor(timestep, device=sample.device)
    return t.expand(sample.shape[0]) if t.ndim == 0 else t


class _SavedAsDiffusersClass:
    """`save_pretrained` writes the plain diffusers base class, so the folder needs none of this code to load."""

    def save_pretrained(self, *args, **kwargs):
        cls, base = self.__class__, self.diffusers_class
        try:
            self.__class__ = base
            return base.save_pretrained(self, *args, **kwargs)
        finally:
            self.__class__ = cls


class UNetCall(_SavedAsDiffusersClass):
    """A family's diffusers transformer called like every backbone here: `model(sample, t, encoder_hidden_states=
    context).sample` on model-space `[B, C, h, w]` tensors with timesteps in [0, T]; the family's `denoise` does the
    packing, ids and conventions. Called the diffusers way (`hidden_states=`, or lists for Z-Image), it is the plain
    transformer, so the family's own pipeline runs it."""

    unet_call = True

    def forward(self, sample=None, timestep=None, encoder_hidden_states=None, *args, hidden_states=None,
                timestep_cond=None, return_dict: bool = True, **kwargs):
        if hidden_states is not None:
            return self.diffusers_class.forward(self, hidden_states=hidden_states,
                                                encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                                return_dict=return_dict, **kwargs)
        if isinstance(sample, list):
            return self.diffusers_class.forward(self, sample, timestep, encoder_hidden_states, *args,
                                                return_dict=return_dict, **kwargs)
        if timestep_cond is not None:
            raise ValueError(f"model.guidance_embedding: {self.diffusers_class.__name__} takes no guidance-weight "
                             "input (Flux.1-dev's own guidance embedding is model.guidance)")
        t = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype)
        out = self.denoise(sample, t.expand(sample.shape[0]) if t.ndim == 0 else t, encoder_hidden_states)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FoundryPixArt(_SavedAsDiffusersClass, PixArtTransformer2DModel):
    """PixArt-α / DiT-style transformer with the UNet's call signature (see the module docstring)."""

    unet_call = True  # the sampler calls it like a UNet
    diffusers_class = PixArtTransformer2DModel

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None, return_dict: bool = True, **kwargs):
        return super().forward(sample, encoder_hidden_states=encoder_hidden_states,
                               timestep=_batched(timestep, sample, timestep_cond),
                               added_cond_kwargs=NO_EXTRA_CONDITIONS, return_dict=return_dict, **kwargs)


class FoundryMMDiT(_SavedAsDiffusersClass, SD3Transformer2DModel):
    """SD3-style MMDiT with the UNet's call signature (see the module docstring)."""

    unet_call = True
    diffusers_class = SD3Transformer2DModel

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                timestep_cond: torch.Tensor | None = None, return_dict: bool = True, **kwargs):
        return super().forward(sample, encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=pooled_text(encoder_hidden_states),
                               timestep=_batched(timestep, sample, timestep_cond), return_dict=return_dict, **kwargs)


def is_transformer(model: torch.nn.Module) -> bool:
    """Any transformer backbone (patch tokens, no guidance-weight input)."""
    return isinstance(model, (PixArtTransformer2DModel, SD3Transformer2DModel))


def is_dit(model: torch.nn.Module) -> bool:
    """A DiT/PixArt stack of self-attention blocks on patch tokens (what patch masking and REPA hook into)."""
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
    kind: str = "dit"  # dit (PixArt/DiT) | mmdit (SD3)


TRANSFORMER_PRESETS: dict[str, TransformerPreset] = {
    # ~1 M transformer parameters, like tiny_pixel's UNet: 64 patch tokens of 2x2 pixels at 16x16.
    "dit_tiny": TransformerPreset(128, 4, 4, 2, 64, 2, 2, 16, 512),
    # Test-sized.
    "dit_micro": TransformerPreset(32, 2, 1, 2, 16, 1, 2, 12, 300),
    # DiT-XL/2 / PixArt-α size (28 blocks, 1152 wide, 675 M in the blocks): for GPU benchmarks at 32x32 latents.
    "dit_xl2": TransformerPreset(1152, 16, 28, 2, 768, 2, 12, 77, 512),
    # SD3-style MMDiT: joint attention over image and text tokens. ~1.3 M parameters at the digits size.
    "mmdit_tiny": TransformerPreset(96, 4, 4, 2, 64, 2, 2, 16, 512, kind="mmdit"),
    "mmdit_micro": TransformerPreset(32, 2, 2, 2, 16, 1, 2, 12, 300, kind="mmdit"),
    # SD3-medium's transformer size (24 blocks, 1536 wide; 2 B parameters) for GPU benchmarks.
    "mmdit_sd3m": TransformerPreset(1536, 24, 24, 2, 768, 2, 12, 77, 512, kind="mmdit"),
}


def build_transformer(p: TransformerPreset, resolution: int, in_channels: int,
                      preset: str) -> FoundryPixArt | FoundryMMDiT:
    if resolution % p.patch_size:
        raise ValueError(f"model.resolution={resolution}: preset '{preset}' cuts {p.patch_size}x{p.patch_size} "
                         f"patches, which must divide the input size; use a multiple of {p.patch_size}")
    if p.kind == "mmdit":
        return FoundryMMDiT(sample_size=resolution, patch_size=p.patch_size, in_channels=in_channels,
                            out_channels=in_channels, num_layers=p.layers, attention_head_dim=p.hidden // p.heads,
                            num_attention_heads=p.heads, joint_attention_dim=p.text_hidden,
                            caption_projection_dim=p.hidden, pooled_projection_dim=p.text_hidden,
                            pos_embed_max_size=max(resolution // p.patch_size, 16))
    return FoundryPixArt(num_attention_heads=p.heads, attention_head_dim=p.hidden // p.heads, in_channels=in_channels,
                         out_channels=in_channels, num_layers=p.layers, sample_size=resolution,
                         patch_size=p.patch_size, cross_attention_dim=p.hidden, caption_channels=p.text_hidden,
                         use_additional_conditions=False)
