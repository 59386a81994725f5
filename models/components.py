"""The one place diffusion components are built: from a size preset or a local diffusers folder.

A run's model is a `Components` (models/families/base.py): denoiser, optional VAE (latent diffusion; None for pixel
space), text encoder(s), tokenizer(s) and the training noise scheduler, tagged with its family. What differs between
families lives in models/families/, one file each; this module builds, then applies the family-independent switches
(prediction type, guidance-weight input, gradient checkpointing, what trains).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from models.backbones import is_transformer
from models.families import Components, Family, family_for_folder, family_for_preset, family_named
from models.schedulers import (PREDICTION_TYPES, make_scheduler, scheduler_objective,  # noqa: F401 - re-exported
                               with_prediction_type)
from models.tokens import tokenize  # noqa: F401 - re-exported: models' callers tokenize prompts here

log = logging.getLogger(__name__)


def with_guidance_embedding(unet: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """The same UNet taking a guidance-weight embedding (`timestep_cond`, LCM / guidance distillation).

    The new projection starts at zero, so the student starts as exactly its teacher; called without
    `timestep_cond`, the UNet is the teacher unchanged."""
    if is_transformer(unet) or not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"model.guidance_embedding={dim}: transformer presets take no guidance-weight input; use a "
                         "UNet model for LCM / guidance distillation (Flux.1-dev has its own: model.guidance)")
    if unet.config.time_cond_proj_dim == dim:
        return unet
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"model.guidance_embedding={dim}: the model already has a {unet.config.time_cond_proj_dim}-d "
                         "guidance embedding; use that size")
    new = type(unet).from_config(unet.config, time_cond_proj_dim=dim)
    old = unet.state_dict()
    extra = set(new.state_dict()) - set(old)
    if extra != {"time_embedding.cond_proj.weight"} or set(old) - set(new.state_dict()):
        raise RuntimeError(f"guidance embedding: unexpected weight layout change {sorted(extra)}")
    new.load_state_dict(old, strict=False)
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new.to(next(unet.parameters()).dtype)


def load_pretrained(path: str | Path, prediction_type: str | None = None, flow_shift: float = 1.0) -> Components:
    """Load components from a local diffusers folder of any family (models/families/), our exports included."""
    folder = Path(path).expanduser()
    comps = family_for_folder(folder).load(folder)
    comps.scheduler = with_prediction_type(comps.scheduler, prediction_type, flow_shift)
    return comps


def build_components(pretrained: str | None = None, preset: str = "tiny_pixel", resolution: int | None = None,
                     prediction_type: str | None = None, beta_schedule: str = "squaredcos_cap_v2",
                     seed: int = 0, gradient_checkpointing: bool = False,
                     train_text_encoder: bool = False, base: Components | None = None,
                     guidance_embedding: int | None = None, flow_shift: float = 1.0,
                     guidance: float | None = None) -> Components:
    """The Hydra `model` group lands here: `base` (already loaded, e.g. from a checkpoint) wins, then a local
    pretrained folder, then the preset."""
    if base is not None:
        comps = base
        comps.scheduler = with_prediction_type(comps.scheduler, prediction_type, flow_shift)
        for model in (comps.unet, comps.text_encoder):
            model.requires_grad_(True)
    elif pretrained:
        comps = load_pretrained(pretrained, prediction_type, flow_shift)
    else:
        comps = family_for_preset(preset).build_preset(preset, resolution, seed, prediction_type=prediction_type,
                                                      beta_schedule=beta_schedule, flow_shift=flow_shift)
    if resolution and (pretrained or base is not None):
        comps.native_resolution = int(resolution)  # the run's image size where the folder's configs hold none
    comps.spec.configure(comps, guidance=guidance)
    if guidance_embedding:
        comps.unet = with_guidance_embedding(comps.unet, int(guidance_embedding))
    if gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    comps.text_encoder.requires_grad_(train_text_encoder)
    if not train_text_encoder:
        comps.text_encoder.eval()  # a frozen encoder runs as in inference (T5's dropout off), in training and sampling
    if comps.vae is not None:
        comps.vae.requires_grad_(False)
    n = sum(p.numel() for p in comps.unet.parameters())
    source = "a checkpoint's model" if base is not None else (pretrained or f"preset {preset}")
    log.info("built model: %s (%s family), denoiser %.2fM params, %s space %dx%d, %s", source, comps.family, n / 1e6,
             "latent" if comps.vae is not None else "pixel", comps.resolution, comps.resolution,
             scheduler_objective(comps.scheduler))
    return comps


def apply_speed_switches(unet: torch.nn.Module, compile: bool | str = False, channels_last: bool = False) -> None:
    """`model.channels_last`: the denoiser's weights in channels-last memory format (convolutions on tensor cores).
    `model.compile`: `torch.compile` in place (`nn.Module.compile`, so state-dict keys, checkpoints and exports are
    unchanged); true = inductor, or a backend name. Compilation happens lazily at the first training forward."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        backend = "inductor" if compile is True else str(compile)
        from torch import _dynamo

        if backend not in _dynamo.list_backends(exclude_tags=()):
            raise ValueError(f"model.compile={compile}: not a torch.compile backend; use true (inductor) or one of "
                             f"{', '.join(_dynamo.list_backends())}")
        unet.compile(backend=backend)


def vae_moments(vae: AutoencoderKL, pixels: torch.Tensor,
                family: Family | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's latent distribution for pixels in [-1, 1], already in the UNet's
    scale (the family's latent normalization; SD's `(z - shift_factor) * scaling_factor` by default): a training latent is `mean + std * noise`. Shared by training
    (models encode on the fly) and the latent cache (`foundry-shards encode`), so both see the same latents."""
    return (family or family_named("sd")).encode_latents(vae, pixels)


@torch.no_grad()
def encode_prompts(comps: Components, input_ids: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states for token ids (the UNet's cross-attention context)."""
    return comps.text_encoder(input_ids.to(comps.text_encoder.device))[0]
