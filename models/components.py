"""The one place diffusion components are built: from a size preset or a local diffusers folder.

A run's model is a `Components`: UNet, optional VAE (latent diffusion; None for pixel space),
text encoder, tokenizer and the training noise scheduler. Every method, the sampler and the
exporter work on this object, so pixel and latent models differ only here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from models.backbones import FoundryMMDiT, FoundryPixArt, is_transformer
from models.sdxl import DualCLIPTextEncoder, FoundrySDXLUNet, is_sdxl_unet_config
from models.tiny import build_preset, build_preset_vae
from models.tokens import tokenize  # noqa: F401 - re-exported: models' callers tokenize prompts here

log = logging.getLogger(__name__)

REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # flow: flow matching / rectified flow


@dataclass
class Components:
    unet: UNet2DConditionModel  # the denoiser: a UNet, or a transformer with the UNet's call (models/backbones.py)
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    vae: AutoencoderKL | None = None
    tokenizer_2: PreTrainedTokenizerBase | None = None  # SDXL's second tokenizer (saved and exported with the model)

    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def sample_size(self) -> int:
        """Side of the UNet's input (pixels, or latents when a VAE is present)."""
        return int(self.unet.config.sample_size)

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        if self.vae is None:
            return self.sample_size
        return self.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def save_pretrained(self, out: str | Path) -> None:
        """Write the diffusers folder layout (subfolders as `from_pretrained` expects, safetensors)."""
        out = Path(out)

        self.unet.save_pretrained(out / "unet", safe_serialization=True)
        if isinstance(self.text_encoder, DualCLIPTextEncoder):
            self.text_encoder.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
            self.text_encoder.text_encoder_2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
            self.tokenizer_2.save_pretrained(out / "tokenizer_2")
        else:
            self.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.scheduler.save_pretrained(out / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(out / "vae", safe_serialization=True)


def make_scheduler(prediction_type: str, beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
                   flow_shift: float = 1.0):
    """The training noise schedule: a DDPM schedule (epsilon | v_prediction) or flow matching (`flow`, with SD3's
    `shift` of the timesteps toward noise; 1.0 is plain rectified flow)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type: '{prediction_type}' is not one of {PREDICTION_TYPES}")
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False)


def scheduler_objective(scheduler) -> str:
    return "flow" if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else scheduler.config.prediction_type


def with_guidance_embedding(unet: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """The same UNet taking a guidance-weight embedding (`timestep_cond`, LCM / guidance distillation).

    The new projection starts at zero, so the student starts as exactly its teacher; called without
    `timestep_cond`, the UNet is the teacher unchanged."""
    if is_transformer(unet):
        raise ValueError(f"model.guidance_embedding={dim}: transformer presets take no guidance-weight input; use a "
                         "UNet model for LCM / guidance distillation")
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


def check_pretrained_folder(path: str | Path) -> Path:
    """Fail before any heavy work, with one line naming what is missing and the fix."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model.pretrained: '{p}' is not a folder; give a local diffusers model folder "
                                "(with unet/, text_encoder/, tokenizer/, scheduler/) or use model=tiny_pixel")
    has = {s for s in REQUIRED_SUBFOLDERS if (p / s).is_dir()} | ({"unet"} if (p / "transformer").is_dir() else set())
    missing = [s for s in REQUIRED_SUBFOLDERS if s not in has]
    if missing:
        raise FileNotFoundError(f"model.pretrained: '{p}' lacks subfolder(s) {', '.join(missing)}; a diffusers "
                                "model folder (as saved by save_pretrained) has unet/, text_encoder/, tokenizer/, "
                                "scheduler/ and, for latent models, vae/")
    return p


def with_prediction_type(scheduler, prediction_type: str | None, flow_shift: float = 1.0):
    """The same model trained toward another objective: epsilon <-> v keep the noise schedule; to or from `flow` the
    schedule itself changes (reflow fine-tunes a VP teacher into a rectified-flow student)."""
    current = scheduler_objective(scheduler)
    if not prediction_type or prediction_type == current:
        return scheduler
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type: '{prediction_type}' is not one of {PREDICTION_TYPES}")
    log.info("switching prediction_type %s -> %s", current, prediction_type)
    if prediction_type == "flow":
        return make_scheduler("flow", num_train_timesteps=scheduler.config.num_train_timesteps, flow_shift=flow_shift)
    if current == "flow":
        return make_scheduler(prediction_type, num_train_timesteps=scheduler.config.num_train_timesteps)
    return DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)


def load_scheduler(folder: Path):
    """The training scheduler of a diffusers folder: flow-matching models keep theirs; others load as DDPM."""
    import json

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else {}
    if "FlowMatch" in str(config.get("_class_name", "")):
        return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    return DDPMScheduler.from_pretrained(folder, subfolder="scheduler")


def load_backbone(folder: Path):
    """The denoiser of a diffusers folder: a UNet (`unet/`), or a DiT/MMDiT transformer (`transformer/`, or our
    exports' `unet/` holding one), the latter wrapped to take the UNet's call signature."""
    import json


    sub = "unet" if (folder / "unet").is_dir() else "transformer"
    config = folder / sub / "config.json"
    config = json.loads(config.read_text()) if config.is_file() else {}
    name = config.get("_class_name", "")
    if name == "PixArtTransformer2DModel":
        return FoundryPixArt.from_pretrained(folder, subfolder=sub)
    if name == "SD3Transformer2DModel":
        return FoundryMMDiT.from_pretrained(folder, subfolder=sub)
    if "Transformer" in name:
        raise ValueError(f"model.pretrained: '{folder / sub}' holds a {name}; the transformer backbones loaded here "
                         "are PixArtTransformer2DModel (DiT) and SD3Transformer2DModel (MMDiT)")
    if is_sdxl_unet_config(config):
        if not (folder / "text_encoder_2").is_dir() or not (folder / "tokenizer_2").is_dir():
            raise FileNotFoundError(f"model.pretrained: '{folder}' holds an SDXL UNet (text_time conditioning) but "
                                    "lacks text_encoder_2/ or tokenizer_2/; give the whole SDXL folder")
        unet = FoundrySDXLUNet.from_pretrained(folder, subfolder=sub)
        if (folder / "vae" / "config.json").is_file():
            blocks = json.loads((folder / "vae" / "config.json").read_text()).get("block_out_channels", [0] * 4)
            unet.vae_scale_factor = 2 ** (len(blocks) - 1)
        return unet
    return UNet2DConditionModel.from_pretrained(folder, subfolder=sub)


def load_text_encoder(folder: Path):
    """(text encoder, tokenizer, second tokenizer): one CLIP encoder, or SDXL's two behind one module."""
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    if not (folder / "text_encoder_2").is_dir():
        return text_encoder, tokenizer, None
    from transformers import CLIPTextModelWithProjection

    tokenizer_2 = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
    if len(tokenizer_2) != len(tokenizer) or tokenizer_2.eos_token_id != tokenizer.eos_token_id:
        raise ValueError(f"model.pretrained: '{folder}': tokenizer/ and tokenizer_2/ differ in vocabulary or "
                         "end-of-text token; SDXL's two tokenizers share CLIP's vocabulary")
    dual = DualCLIPTextEncoder(text_encoder,
                               CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"),
                               eos_token_id=tokenizer.eos_token_id, pad_token_id_2=tokenizer_2.pad_token_id)
    return dual, tokenizer, tokenizer_2


def load_pretrained(path: str | Path, prediction_type: str | None = None, flow_shift: float = 1.0) -> Components:
    """Load components from a local diffusers folder (Stable Diffusion layout or our own exports)."""
    p = check_pretrained_folder(path)
    scheduler = with_prediction_type(load_scheduler(p), prediction_type, flow_shift)
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae") if (p / "vae").is_dir() else None
    text_encoder, tokenizer, tokenizer_2 = load_text_encoder(p)
    return Components(unet=load_backbone(p), text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                      vae=vae, tokenizer_2=tokenizer_2)


def build_components(pretrained: str | None = None, preset: str = "tiny_pixel", resolution: int | None = None,
                     prediction_type: str | None = None, beta_schedule: str = "squaredcos_cap_v2",
                     seed: int = 0, gradient_checkpointing: bool = False,
                     train_text_encoder: bool = False, base: Components | None = None,
                     guidance_embedding: int | None = None, flow_shift: float = 1.0) -> Components:
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

        unet, text_encoder, tokenizer = build_preset(preset, resolution or 16, seed=seed)
        comps = Components(unet, text_encoder, tokenizer,
                           make_scheduler(prediction_type or "epsilon", beta_schedule, flow_shift=flow_shift),
                           vae=build_preset_vae(preset, resolution or 16, seed=seed))
    if guidance_embedding:
        comps.unet = with_guidance_embedding(comps.unet, int(guidance_embedding))
    if gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    comps.text_encoder.requires_grad_(train_text_encoder)
    if comps.vae is not None:
        comps.vae.requires_grad_(False)
    n = sum(p.numel() for p in comps.unet.parameters())
    source = "a checkpoint's model" if base is not None else (pretrained or f"preset {preset}")
    log.info("built model: %s, UNet %.2fM params, %s space %dx%d, %s", source, n / 1e6,
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


def vae_moments(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's latent distribution for pixels in [-1, 1], already in the UNet's
    scale (`(z - shift_factor) * scaling_factor`): a training latent is `mean + std * noise`. Shared by training
    (models encode on the fly) and the latent cache (`foundry-shards encode`), so both see the same latents."""
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    return (dist.mean - shift) * scale, dist.std * scale


@torch.no_grad()
def encode_prompts(comps: Components, input_ids: torch.Tensor) -> torch.Tensor:
    """Text-encoder hidden states for token ids (the UNet's cross-attention context)."""
    return comps.text_encoder(input_ids.to(comps.text_encoder.device))[0]
