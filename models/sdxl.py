"""SDXL-style models: a UNet with size/crop micro-conditioning and two CLIP text encoders, behind the one interface
every method here uses (`text_encoder(input_ids)[0]` -> context; `unet(sample, t, context).sample`).

- `DualCLIPTextEncoder` runs SDXL's two encoders on the same token ids (CLIP ViT-L `text_encoder/` and OpenCLIP
  bigG with projection `text_encoder_2/`), exactly as diffusers' `StableDiffusionXLPipeline.encode_prompt` does:
  the penultimate hidden states of both, concatenated on the feature axis, and the second encoder's projected
  pooled vector. It returns them as one tensor, `[B, L + 1, D]`: the L context tokens, then the pooled vector
  (zero-padded to D) as a last row. So caption dropout, classifier-free guidance, reference models and every loss
  handle SDXL's two outputs as the single context tensor they already pass around.
- `FoundrySDXLUNet` is diffusers' `UNet2DConditionModel` (`addition_embed_type="text_time"`) that splits that
  tensor back into `encoder_hidden_states` and `text_embeds`, and adds SDXL's `time_ids` (original size, crop
  top-left, target size) for an uncropped image at the sample's size — what diffusers' SDXL pipeline passes by
  default. Called the diffusers way (with `added_cond_kwargs`), it is the plain UNet, so diffusers' pipeline runs it.
  On disk it is the plain `UNet2DConditionModel`.

The two tokenizers of an SDXL folder share CLIP's vocabulary and differ in the pad token; the second encoder gets
the ids with padding rewritten to its own pad id, so its outputs equal the pipeline's bit for bit.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from models.backbones import _SavedAsDiffusersClass


def is_sdxl_unet_config(config) -> bool:
    return getattr(config, "addition_embed_type", None) == "text_time" or \
        (isinstance(config, dict) and config.get("addition_embed_type") == "text_time")


class DualCLIPTextEncoder(torch.nn.Module):
    """SDXL's two text encoders as one module (see the module docstring)."""

    def __init__(self, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                 eos_token_id: int, pad_token_id_2: int | None = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id_2 = None if pad_token_id_2 is None else int(pad_token_id_2)

    @property
    def config(self):
        return self.text_encoder.config

    @property
    def context_dim(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.text_encoder_2.config.projection_dim

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    def ids_for_second(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first tokenizer's ids with the padding after the end-of-text token set to the second's pad id."""
        if self.pad_token_id_2 is None:
            return input_ids
        is_eos = input_ids == self.eos_token_id
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first end-of-text token
        return torch.where(after_eos, torch.full_like(input_ids, self.pad_token_id_2), input_ids)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        h1 = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(self.ids_for_second(input_ids), output_hidden_states=True)
        h2, pooled = out2.hidden_states[-2], out2.text_embeds
        context = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
        row = torch.nn.functional.pad(pooled.to(h1.dtype), (0, context.shape[-1] - pooled.shape[-1]))
        return (torch.cat([context, row[:, None]], dim=1),)


def split_packed(packed: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L + 1, D] from `DualCLIPTextEncoder` -> (context [B, L, D], pooled [B, pooled_dim])."""
    return packed[:, :-1], packed[:, -1, :pooled_dim]


def default_time_ids(height: int, width: int, n: int, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning for an uncropped image generated at its own size: (h, w, 0, 0, h, w)."""
    return torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype).expand(n, -1)


class FoundrySDXLUNet(_SavedAsDiffusersClass, UNet2DConditionModel):
    """SDXL UNet called like every other backbone here (see the module docstring)."""

    diffusers_class = UNet2DConditionModel
    vae_scale_factor = 8  # pixels per latent; set from the folder's VAE when loaded
    micro_conditioning: torch.Tensor | None = None  # per-sample time_ids of a bucketed batch, set by the module

    @property
    def pooled_dim(self) -> int:
        return self.config.projection_class_embeddings_input_dim - 6 * self.config.addition_time_embed_dim

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                *args, added_cond_kwargs: dict | None = None, **kwargs):
        if added_cond_kwargs is None:  # our call: unpack the pooled row, add the default size conditioning
            encoder_hidden_states, pooled = split_packed(encoder_hidden_states, self.pooled_dim)
            h, w = (s * self.vae_scale_factor for s in sample.shape[-2:])
            time_ids = self.micro_conditioning
            if time_ids is None or time_ids.shape[0] != sample.shape[0]:
                time_ids = default_time_ids(h, w, sample.shape[0], sample.device, pooled.dtype)
            added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.to(sample.device, pooled.dtype)}
        return super().forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                               **kwargs)
