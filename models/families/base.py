"""The family layer: everything that differs between model families, behind one small interface.

A run's model is a `Components` (denoiser, text encoder(s) behind one module, tokenizer(s), VAE, training scheduler)
tagged with its family. The engine, methods, sampler, caches and exports use only what every family provides:

- `tokenize(tokenizer, prompts)` -> ids; `text_encoder(ids)[0]` -> one context tensor (a family packs its pooled
  vectors or masks into extra rows of that tensor, so caption dropout, guidance and caches handle it as one tensor);
- `unet(x, t, encoder_hidden_states=context).sample` on unpacked model-space tensors `[B, C, h, w]` with flow/DDPM
  timesteps in [0, T] (a family's backbone wrapper packs patches, builds position ids, rescales timesteps and adds
  its guidance embedding);
- `family.encode_latents` / `decode_latents` (the VAE's latent normalization), `family.training_shift` (a
  resolution-dependent timestep shift), `family.pipeline` (the diffusers pipeline class it exports to).

A family is one file in models/families/ that subclasses `Family` and registers itself; the registry picks it from a
folder's `model_index.json` (or its backbone's config) or from a preset name.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

REGISTRY: dict[str, "Family"] = {}
SINGLE_ENCODER_PARTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")  # Z-Image, Qwen-Image, Flux.2


@dataclass
class Components:
    unet: torch.nn.Module  # the denoiser, called like a UNet whatever it is (see the module docstring)
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any
    vae: torch.nn.Module | None = None
    tokenizer_2: Any = None  # a second tokenizer the family saves and exports (SDXL)
    family: str = "sd"
    native_resolution: int | None = None  # set where no config holds the image size (Qwen-Image): model.resolution
    block_swap: Any = None  # a models.block_swap.BlockSwap while training with model.block_swap=N
    sampling_horizon: int | None = None  # a few-step student's first timestep t_c < T-1 (DMD2's conditioning timestep)

    @property
    def spec(self) -> "Family":
        return family_named(self.family)

    @property
    def in_channels(self) -> int:
        """Channels of the model space (pixels, or unpacked latents)."""
        return self.spec.model_channels(self)

    @property
    def sample_size(self) -> int:
        """Side of the model space (pixels, or latents when a VAE is present) at the run's resolution."""
        if self.native_resolution:
            return self.native_resolution // self.vae_factor
        return self.spec.model_side(self)

    @property
    def vae_factor(self) -> int:
        return 1 if self.vae is None else self.spec.vae_factor(self.vae)

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        return self.native_resolution or self.sample_size * self.vae_factor

    def save_pretrained(self, out: str | Path) -> None:
        """Write the family's diffusers folder layout (safetensors)."""
        self.spec.save(self, Path(out))


class Family:
    """One model family. Subclasses override what differs; the defaults are a UNet with one CLIP encoder."""

    name: ClassVar[str]
    pipelines: ClassVar[tuple[str, ...]] = ()  # model_index.json `_class_name`s this family loads
    parts: ClassVar[tuple[str, ...]] = ("unet", "text_encoder", "tokenizer", "scheduler")
    presets: ClassVar[tuple[str, ...]] = ()
    patch: ClassVar[int] = 1  # model-space side must be a multiple of this (packing)

    # ----- recognizing a folder -----
    def claims(self, folder: Path, index: dict[str, Any]) -> bool:
        return _class_name(index) in self.pipelines

    def check_folder(self, folder: Path) -> None:
        missing = [p for p in self.parts if not (folder / p).is_dir()]
        if missing:
            raise FileNotFoundError(f"model.pretrained: '{folder}' is a {self.name}-family folder but lacks "
                                    f"subfolder(s) {', '.join(missing)}; such a folder (as save_pretrained writes it) "
                                    f"has {', '.join(self.parts)}")

    # ----- building -----
    def load(self, folder: Path) -> Components:
        raise NotImplementedError

    def build_preset(self, preset: str, resolution: int | None, seed: int, prediction_type: str | None = None,
                     beta_schedule: str = "squaredcos_cap_v2", flow_shift: float = 1.0) -> Components:
        raise NotImplementedError

    def require_flow(self, prediction_type: str | None) -> None:
        """Transformer families are flow-matching models; another objective is refused in one line."""
        if prediction_type not in (None, "flow"):
            raise ValueError(f"model.prediction_type={prediction_type}: the {self.name} family is trained by flow "
                             "matching; use flow (or leave it null)")

    def save(self, comps: Components, out: Path) -> None:
        """The family's pipeline folder, naming diffusers' own classes (loads in diffusers alone)."""
        pipe = self.pipeline(comps, comps.scheduler)
        pipe.save_pretrained(out, safe_serialization=True)
        plain_index(out, pipe, self.pipelines[0])

    def configure(self, comps: Components, guidance: float | None = None) -> None:
        """Family options of the `model` group (Flux.1-dev's training guidance value)."""
        if guidance is not None:
            raise ValueError(f"model.guidance={guidance}: the {self.name} family has no guidance-embedding input; "
                             "leave it null (classifier-free guidance is a sampling setting)")

    # ----- shapes and spaces -----
    def vae_factor(self, vae) -> int:
        """Pixels per latent along a side."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def model_channels(self, comps: Components) -> int:
        return int(comps.unet.config.in_channels)

    def model_side(self, comps: Components) -> int:
        return int(comps.unet.config.sample_size)

    def packing(self, comps: Components) -> int:
        """Side of the patches the backbone cuts from the model space (1: none)."""
        return self.patch

    def check_resolution(self, comps: Components, resolution: int) -> None:
        patch = self.packing(comps)
        step = comps.vae_factor * patch
        if resolution % step:
            raise ValueError(f"data.resolution={resolution}: the {self.name} family packs {patch}x{patch} patches "
                             f"of a {comps.vae_factor}x VAE's latents, so the side must be a multiple of {step}")

    def encode_latents(self, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the latent distribution of pixels in [-1, 1], normalized the way the denoiser sees it."""
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
        return (dist.mean - shift) * scale, dist.std * scale

    def decode_latents(self, vae, z: torch.Tensor) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor + shift).sample

    def training_shift(self, comps: Components, shape: torch.Size) -> float | None:
        """A resolution-dependent flow shift for a model-space batch of `shape`: exp(mu) with mu from the image's
        token count, as the family's pipeline shifts its sampling sigmas when the scheduler has
        `use_dynamic_shifting` (Flux, Z-Image, Qwen-Image); None: the scheduler's static shift."""
        config = getattr(comps.scheduler, "config", {})
        if not config.get("use_dynamic_shifting"):
            return None
        patch = self.packing(comps)
        tokens = (shape[-2] // patch) * (shape[-1] // patch)
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        return math.exp(lo + (hi - lo) * (tokens - base) / (top - base))  # diffusers' calculate_shift

    # ----- exporting -----
    def pipeline(self, comps: Components, scheduler) -> Any:
        raise NotImplementedError

    def planning_inputs(self, comps: Components, batch: int, resolution: int,
                        context_shape: tuple[int, ...]) -> dict[str, Any]:
        """The denoiser's keyword inputs for one training step, as empty tensors: what the memory planner
        (train/plan.py) traces on fake tensors. `context_shape` is the text encoder's output per sample."""
        side = resolution // comps.vae_factor
        return {"sample": torch.empty(batch, comps.in_channels, side, side), "timestep": torch.empty(batch),
                "encoder_hidden_states": torch.empty(batch, *context_shape)}

    def pipeline_kwargs(self, comps: Components) -> dict[str, Any]:
        """Keyword arguments a user passes to the exported pipeline to get what `foundry-sample` gives."""
        return {}

    def kohya_state(self, comps: Components, state: dict[str, torch.Tensor], alpha: float
                    ) -> dict[str, torch.Tensor] | None:
        """The denoiser's adapter in the layout A1111/ComfyUI/kohya read for this family; None: the generic
        `lora_unet_<module path>` layout (models/adapter_files.py)."""
        return None

    text_encoder_lora: ClassVar[bool] = True  # adapter.text_encoder works (and exports) for this family
    adapter_targets: ClassVar[dict[str, list[str]]] = {}  # adapter.target presets that differ from the UNet's

    def lora_loader(self) -> tuple[Any, str]:
        """(diffusers LoRA loader mixin, its denoiser key) for `save_lora_weights`."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin, "unet"


class FlowFamily(Family):
    """The transformer families (Flux, Flux.2, Qwen-Image, Z-Image, SD3): flow matching only, a transformer folder
    with one text encoder unless they say otherwise, 2x2 patches, text-encoder LoRA refused. A preset is a row of
    `preset_table` that `build_tiny` turns into components."""

    parts = SINGLE_ENCODER_PARTS
    patch = 2
    text_encoder_lora = False
    preset_table: ClassVar[dict[str, Any]] = {}

    @property
    def presets(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.preset_table)

    def build_preset(self, preset: str, resolution: int | None, seed: int, prediction_type: str | None = None,
                     beta_schedule: str = "", flow_shift: float = 1.0) -> Components:
        self.require_flow(prediction_type)
        comps = self.build_tiny(self.preset_table[preset], resolution or 16, seed)
        self.check_resolution(comps, resolution or 16)
        return comps

    def build_tiny(self, p: Any, resolution: int, seed: int) -> Components:
        raise NotImplementedError


def register(family: Family) -> Family:
    REGISTRY[family.name] = family
    return family


def family_named(name: str) -> Family:
    if name not in REGISTRY:
        raise ValueError(f"model.family: unknown family '{name}'; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def family_for_preset(preset: str) -> Family:
    for family in REGISTRY.values():
        if preset in family.presets:
            return family
    known = sorted(p for f in REGISTRY.values() for p in f.presets)
    raise ValueError(f"model.preset: unknown preset '{preset}'; choose one of {known} or set "
                     "model.pretrained=/path/to/folder")


def read_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _class_name(index: dict[str, Any]) -> str:
    name = index.get("_class_name", "")
    return name[-1] if isinstance(name, list) else str(name)


def family_for_folder(folder: str | Path) -> Family:
    """The family of a local diffusers folder: from `model_index.json`, else from its backbone's config."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model.pretrained: '{p}' is not a folder; give a local diffusers model folder "
                                "or use a preset (model=tiny_pixel, model=flux_tiny, ...)")
    index = read_index(p)
    for family in REGISTRY.values():
        if family.claims(p, index):
            family.check_folder(p)
            return family
    lora = p / "pytorch_lora_weights.safetensors"
    if lora.is_file():
        raise ValueError(f"model.pretrained: '{p}' holds a LoRA (adapter files), not a model; point model.pretrained "
                         f"at the base it was trained on ({adapter_base(lora) or 'see the file header'}) and train a "
                         "new adapter over it")
    what = f"a {_class_name(index)} pipeline" if index else "no model_index.json and no known backbone"
    known = sorted({n for f in REGISTRY.values() for n in f.pipelines})
    raise ValueError(f"model.pretrained: '{p}' holds {what}; the families trained here load {', '.join(known)} "
                     "folders (or a folder with unet/ or transformer/ saved by save_pretrained)")


def adapter_base(path: Path) -> str:
    """The base model an exported adapter file names in its header ('' when it names none)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return str(json.loads(meta.get("foundry_adapter", "{}")).get("base_model", ""))


def backbone_class(folder: Path) -> str:
    """`_class_name` of a folder's denoiser config (`transformer/` or `unet/`), '' when there is none."""
    for sub in ("transformer", "unet"):
        config = folder / sub / "config.json"
        if config.is_file():
            return str(json.loads(config.read_text()).get("_class_name", ""))
    return ""


def plain_index(out: Path, pipe: Any, class_name: str | list[str]) -> dict[str, Any]:
    """Rewrite a saved pipeline's `model_index.json` to name diffusers' own classes: the pipeline's, and for each of
    our subclasses (saved as their base class) that base, so the folder loads without this project."""
    path = out / "model_index.json"
    index = json.loads(path.read_text())
    index["_class_name"] = class_name
    for name, component in pipe.components.items():
        if hasattr(component, "diffusers_class"):
            index[name] = ["diffusers", component.diffusers_class.__name__]
    path.write_text(json.dumps(index, indent=2))
    return index
