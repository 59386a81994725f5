"""The models people fine-tune, at full size on the meta device: what the memory planner (train/plan.py) and the FLOPs
counter see without any weights on disk.

Each entry builds the denoiser (the families' own full-size builders), its frozen text encoder(s) and VAE from their
published configs, and says how the denoiser is called at a resolution and batch (the diffusers class's own inputs,
as its pipeline builds them). Configs follow the released checkpoints' config.json files (parameter counts in the
docstrings of the builders are checked by tests/unit/test_plan.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage, UNet2DConditionModel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel)

from models.families.flux import flux1_dev_transformer
from models.families.qwen_image import qwen_image_transformer
from models.families.sd3 import sd35_large_transformer
from models.families.zimage import z_image_transformer


def _meta(build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def on_meta() -> torch.nn.Module:
        with torch.device("meta"):
            return build()
    return on_meta


def clip_l() -> torch.nn.Module:  # 123 M
    return CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768))


def clip_g() -> torch.nn.Module:  # OpenCLIP bigG text tower, 695 M
    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                      num_attention_heads=20, projection_dim=1280,
                                                      hidden_act="gelu"))


def t5_xxl() -> torch.nn.Module:  # encoder only, 4.76 B
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"))


def qwen3_4b() -> torch.nn.Module:  # Z-Image's text encoder, 4.0 B
    return Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                  tie_word_embeddings=True))


def qwen25_vl_7b() -> torch.nn.Module:  # Qwen-Image's text encoder, 8.3 B with its vision tower
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, rope_scaling={"type": "mrope",
                                                                             "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def sd_vae(latent_channels: int = 4) -> torch.nn.Module:  # SD/SDXL (4 channels) and Flux/SD3 (16): 84 M
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def sd15_unet() -> torch.nn.Module:  # 860 M
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)


def sdxl_unet() -> torch.nn.Module:  # 2.57 B
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@dataclass(frozen=True)
class RealSize:
    """A full-size model as the planner needs it: parts on meta and the denoiser's inputs for a batch."""

    name: str
    family: str
    denoiser: Callable[[], torch.nn.Module]
    text_encoders: tuple[Callable[[], torch.nn.Module], ...]
    vae: Callable[[], torch.nn.Module]
    resolution: int  # the native training size
    inputs: Callable[[int, int], dict[str, Any]]  # (batch, resolution) -> the denoiser's keyword arguments
    vae_factor: int = 8


def _latents(batch: int, resolution: int, channels: int) -> torch.Tensor:
    return torch.empty(batch, channels, resolution // 8, resolution // 8)


def _sd15_inputs(batch: int, res: int) -> dict[str, Any]:
    return {"sample": _latents(batch, res, 4), "timestep": torch.empty(batch),
            "encoder_hidden_states": torch.empty(batch, 77, 768)}


def _sdxl_inputs(batch: int, res: int) -> dict[str, Any]:
    return {"sample": _latents(batch, res, 4), "timestep": torch.empty(batch),
            "encoder_hidden_states": torch.empty(batch, 77, 2048),
            "added_cond_kwargs": {"text_embeds": torch.empty(batch, 1280), "time_ids": torch.empty(batch, 6)}}


def _sd3_inputs(batch: int, res: int) -> dict[str, Any]:
    return {"hidden_states": _latents(batch, res, 16), "timestep": torch.empty(batch),
            "encoder_hidden_states": torch.empty(batch, 77 + 256, 4096), "pooled_projections": torch.empty(batch, 2048)}


def _packed(batch: int, res: int) -> tuple[torch.Tensor, int]:
    tokens = (res // 16) ** 2  # 16-channel latents at 1/8, packed 2x2
    return torch.empty(batch, tokens, 64), tokens


def _flux_inputs(batch: int, res: int) -> dict[str, Any]:
    hidden, tokens = _packed(batch, res)
    return {"hidden_states": hidden, "encoder_hidden_states": torch.empty(batch, 512, 4096),
            "pooled_projections": torch.empty(batch, 768), "timestep": torch.empty(batch),
            "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3), "guidance": torch.empty(batch)}


def _qwen_image_inputs(batch: int, res: int) -> dict[str, Any]:
    hidden, _ = _packed(batch, res)
    return {"hidden_states": hidden, "encoder_hidden_states": torch.empty(batch, 256, 3584),
            "encoder_hidden_states_mask": torch.ones(batch, 256), "timestep": torch.empty(batch),
            "img_shapes": [[(1, res // 16, res // 16)]] * batch}


def _zimage_inputs(batch: int, res: int) -> dict[str, Any]:
    side = res // 8
    return {"x": [torch.empty(16, 1, side, side) for _ in range(batch)], "t": torch.empty(batch),
            "cap_feats": [torch.empty(512, 2560) for _ in range(batch)]}


REAL_SIZES: dict[str, RealSize] = {r.name: r for r in (
    RealSize("sd15", "sd", _meta(sd15_unet), (_meta(clip_l),), _meta(sd_vae), 512, _sd15_inputs),
    RealSize("sdxl", "sdxl", _meta(sdxl_unet), (_meta(clip_l), _meta(clip_g)), _meta(sd_vae), 1024, _sdxl_inputs),
    RealSize("sd35_large", "sd3", sd35_large_transformer, (_meta(clip_l), _meta(clip_g), _meta(t5_xxl)),
             _meta(lambda: sd_vae(16)), 1024, _sd3_inputs),
    RealSize("flux1_dev", "flux", flux1_dev_transformer, (_meta(clip_l), _meta(t5_xxl)), _meta(lambda: sd_vae(16)),
             1024, _flux_inputs),
    RealSize("qwen_image", "qwen_image", qwen_image_transformer, (_meta(qwen25_vl_7b),),
             _meta(lambda: AutoencoderKLQwenImage()), 1328, _qwen_image_inputs),
    RealSize("zimage", "zimage", z_image_transformer, (_meta(qwen3_4b),), _meta(lambda: sd_vae(16)), 1024,
             _zimage_inputs),
)}


def real_size(name: str) -> RealSize:
    if name not in REAL_SIZES:
        raise ValueError(f"model.preset={name!r}: not a full-size model the planner knows; use one of "
                         f"{', '.join(REAL_SIZES)} (or model.pretrained=<folder>)")
    return REAL_SIZES[name]
