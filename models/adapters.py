"""Adapters over a frozen base: LoRA, DoRA, LoHa, LoKr (through peft) and DiffFit-style bias/scale tuning.

An adapter is not a method (DESIGN 3): every method trains with or without one. The base weights stay frozen
and never reach the optimizer; `adapters_disabled(...)` is the frozen-reference view (DPO, LCM-LoRA teacher)
without a second copy of the weights in memory.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer

log = logging.getLogger(__name__)

KINDS = ("none", "lora", "dora", "loha", "lokr", "difffit")
PEFT_KINDS = ("lora", "dora", "loha", "lokr")

# Module-name suffixes peft matches (`target_modules`); presets for diffusers UNets and CLIP text encoders.
TARGET_PRESETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_mlp": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
    "xattn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],  # cross-attention only (ESD-x)
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "text_encoder_mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


@dataclass(frozen=True)
class AdapterSpec:
    """The `adapter` config group. `alpha` null means alpha = rank (scale 1)."""

    kind: str = "none"
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target: str | list[str] = "attn"
    text_encoder: bool = False
    text_encoder_target: str | list[str] = "text_encoder"
    merge: bool = False  # export: fold the adapter into a full model instead of writing adapter files
    extra: dict = field(default_factory=dict)  # passed to the peft config as is (e.g. {"init_weights": "gaussian"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter.kind: '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.kind in PEFT_KINDS and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"adapter.rank={self.rank!r}: expected a positive integer")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout!r}: expected a probability in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def resolve_targets(target: str | list[str], family_presets: dict[str, list[str]] | None = None) -> list[str]:
    """A preset name (the family's own list first: a Flux transformer names its layers differently) or a list."""
    if isinstance(target, str):
        if family_presets and target in family_presets:
            return list(family_presets[target])
        if target not in TARGET_PRESETS:
            raise ValueError(f"adapter target '{target}': not a preset ({', '.join(TARGET_PRESETS)}); "
                             "give a preset name or a list of module-name suffixes")
        return list(TARGET_PRESETS[target])
    return [str(t) for t in target]


def peft_config(spec: AdapterSpec, targets: list[str]) -> PeftConfig:
    """The peft config for one model; every kind shares rank/alpha/dropout/targets."""
    common = {"target_modules": targets, **dict(spec.extra)}
    if spec.kind in ("lora", "dora"):
        return LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout,
                          use_dora=spec.kind == "dora", init_lora_weights=common.pop("init_weights", True), **common)
    if spec.kind == "loha":
        return LoHaConfig(r=spec.rank, alpha=spec.lora_alpha, module_dropout=spec.dropout, **common)
    if spec.kind == "lokr":
        return LoKrConfig(r=spec.rank, alpha=spec.lora_alpha, module_dropout=spec.dropout, **common)
    raise ValueError(f"adapter.kind '{spec.kind}' has no peft config")


def _check_targets(model: torch.nn.Module, targets: list[str], key: str, every: bool = True) -> None:
    """Each named target must exist (`every`); a preset may list layers a small model lacks, but not all of them."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing and (every or len(missing) == len(targets)):
        raise ValueError(f"{key}: no module named {missing} in {type(model).__name__}; "
                         f"use a preset ({', '.join(TARGET_PRESETS)}) or names that exist in the model")


def _add_peft(model: torch.nn.Module, spec: AdapterSpec, targets: list[str], key: str, preset: bool = False) -> None:
    _check_targets(model, targets, key, every=not preset)
    model.requires_grad_(False)
    cfg = peft_config(spec, targets)
    if hasattr(model, "add_adapter") and "adapter_config" in model.add_adapter.__code__.co_varnames:
        model.add_adapter(cfg)  # diffusers models: registers the config so load/save helpers see it
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(cfg, model)
    model.peft_adapter_spec = spec  # read back by exports (rank/alpha metadata)


def _difffit(model: torch.nn.Module) -> None:
    """DiffFit/BitFit: biases and normalization scales train; every weight matrix stays frozen."""
    model.requires_grad_(False)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for mod in model.modules():
        if getattr(mod, "bias", None) is not None and isinstance(mod.bias, torch.nn.Parameter):
            mod.bias.requires_grad_(True)
        if isinstance(mod, norms) and getattr(mod, "weight", None) is not None:
            mod.weight.requires_grad_(True)


def apply_adapter(components, spec: AdapterSpec) -> None:
    """Freeze the base and attach the adapter (UNet, and the text encoder when asked), before any strategy wraps it."""
    if not spec.enabled:
        return
    if spec.kind == "difffit":
        _difffit(components.unet)
        if spec.text_encoder:
            _difffit(components.text_encoder)
    else:
        if spec.text_encoder and not components.spec.text_encoder_lora:
            raise ValueError(f"adapter.text_encoder=true: not available for the {components.family} family here (its "
                             "text encoders sit behind one module whose LoRA its pipeline cannot load); train the "
                             "denoiser's adapter only")
        _add_peft(components.unet, spec, resolve_targets(spec.target, components.spec.adapter_targets),
                  "adapter.target", preset=isinstance(spec.target, str))
        if spec.text_encoder:
            _add_peft(components.text_encoder, spec, resolve_targets(spec.text_encoder_target),
                      "adapter.text_encoder_target")
        elif not any(isinstance(m, BaseTunerLayer) for m in components.text_encoder.modules()):
            components.text_encoder.requires_grad_(False)
    n_train = sum(p.numel() for m in (components.unet, components.text_encoder) for p in m.parameters()
                  if p.requires_grad)
    n_all = sum(p.numel() for m in (components.unet, components.text_encoder) for p in m.parameters())
    log.info("adapter %s (rank %s, alpha %s): %d of %d parameters trainable (%.2f%%)", spec.kind, spec.rank,
             spec.lora_alpha, n_train, n_all, 100.0 * n_train / max(n_all, 1))


def has_peft_adapter(model: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """The base models' own outputs for the duration of the block (no copy of any weight)."""
    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [not m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_enabled in zip(layers, previous):
            m.enable_adapters(was_enabled)


def merge_adapters(model: torch.nn.Module, merge: bool = True) -> torch.nn.Module:
    """Fold every peft layer into its base weight and put the plain layer back (any kind: LoRA, LoHa, LoKr...);
    `merge=False` drops the adapters instead, giving back the untouched base."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "peft_adapter_spec"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return model
