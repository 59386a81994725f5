"""Adapter files the ecosystem loads: diffusers' `pytorch_lora_weights.safetensors` and the kohya/LyCORIS layout.

- diffusers format (LoRA, DoRA): `pipeline.load_lora_weights(folder)` on the base pipeline.
- kohya/LyCORIS format (every peft kind): `lora_unet_<module_path_with_underscores>.<param>` plus `.alpha`,
  what A1111, ComfyUI and kohya's scripts read (LoRA: lora_down/lora_up, DoRA adds dora_scale, LoHa: hada_w*,
  LoKr: lokr_w*). diffusers' own `convert_state_dict_to_kohya` writes alpha = rank whatever the trained alpha
  was, which silently rescales a LoRA trained with alpha != rank; the real alpha is written here.
Both files carry the adapter's metadata (kind, rank, alpha, base model, trigger prompt) in the safetensors header.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.adapters import AdapterSpec, has_peft_adapter

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# peft parameter suffix -> kohya/LyCORIS parameter suffix
PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora_magnitude_vector": "dora_scale", "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b",
                 "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b", "lokr_w1": "lokr_w1", "lokr_w2": "lokr_w2",
                 "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b", "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b"}
KOHYA_TO_PEFT = {v: k for k, v in PEFT_TO_KOHYA.items()}


def _split(key: str, table: dict[str, str]) -> tuple[str, str]:
    for suffix in sorted(table, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise ValueError(f"adapter tensor '{key}' is not a LoRA/DoRA/LoHa/LoKr parameter")


def peft_to_kohya(state: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """peft keys (`a.b.to_q.lora_A.weight`) -> kohya keys (`lora_unet_a_b_to_q.lora_down.weight` + `.alpha`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, suffix = _split(key, PEFT_TO_KOHYA)
        name = prefix + module.replace(".", "_")
        if suffix == "lora_magnitude_vector":
            value = value.reshape(-1, 1)  # LyCORIS stores the DoRA magnitude per output row as [out, 1]
        out[f"{name}.{PEFT_TO_KOHYA[suffix]}"] = value.detach().contiguous().cpu()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_to_peft(state: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of `peft_to_kohya` for `model` (underscores are ambiguous, so names come from the model)."""
    names = {n.replace(".", "_"): n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix) or key.endswith(".alpha"):
            continue
        flat, suffix = key[len(prefix):].split(".", 1)
        if flat not in names:
            raise ValueError(f"kohya key '{key}': no adapted module '{flat}' in {type(model).__name__}")
        if suffix == "dora_scale":
            value = value.reshape(-1)
        out[f"{names[flat]}.{KOHYA_TO_PEFT[suffix]}"] = value
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained adapter tensors of one model, peft naming, adapter name stripped."""
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def header(spec: AdapterSpec, base_model: str, trigger: str | None) -> dict[str, str]:
    meta = {"kind": spec.kind, "rank": spec.rank, "alpha": spec.lora_alpha, "target": spec.target,
            "text_encoder": spec.text_encoder, "base_model": base_model, "trigger_prompt": trigger or ""}
    return {"foundry_adapter": json.dumps(meta), "ss_network_dim": str(spec.rank),
            "ss_network_alpha": str(spec.lora_alpha), "ss_base_model_version": base_model}


def _add_header(path: Path, extra: dict[str, str]) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**meta, **extra})


def save_adapter(components, spec: AdapterSpec, out: str | Path, base_model: str,
                 trigger: str | None = None) -> dict[str, Path]:
    """Write the adapter files for `components` into `out`; returns {format: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = {name: getattr(components, name) for name in PREFIXES if has_peft_adapter(getattr(components, name))}
    if not models:
        raise ValueError("export: the model has no peft adapter to save (adapter.kind none or difffit); "
                         "export the full model instead")
    meta = header(spec, base_model, trigger)
    written: dict[str, Path] = {}
    states = {name: adapter_state(model) for name, model in models.items()}
    if spec.kind in ("lora", "dora"):
        # peft key layout (lora_A/lora_B), which load_lora_weights reads directly; diffusers' own
        # convert_state_dict_to_diffusers rewrites only attention keys to its legacy names and leaves the rest,
        # and that mixed file then loads without its attention LoRA (seen with target=attn_mlp).
        loader, denoiser = components.spec.lora_loader()  # the family's pipeline reads its own key prefix
        layers: dict[str, Any] = {}
        for name, model in models.items():
            key = denoiser if name == "unet" else name
            layers[f"{key}_lora_layers"] = states[name]
            layers[f"{key}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
        loader.save_lora_weights(out, safe_serialization=True, **layers)
        written["diffusers"] = out / DIFFUSERS_WEIGHTS
        _add_header(written["diffusers"], meta)
    kohya: dict[str, torch.Tensor] = {}
    for name, state in states.items():
        family_layout = components.spec.kohya_state(components, state, spec.lora_alpha) if name == "unet" else None
        kohya.update(family_layout if family_layout is not None else peft_to_kohya(state, PREFIXES[name],
                                                                                   spec.lora_alpha))
    written["kohya"] = out / KOHYA_WEIGHTS
    save_file(kohya, str(written["kohya"]), metadata=meta)
    return written


def read_header(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("foundry_adapter", "{}"))
