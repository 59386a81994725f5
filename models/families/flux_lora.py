"""Flux.1 LoRA files in the layout ComfyUI, Forge and kohya's sd-scripts read: Black Forest Labs' module names
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_3_linear1`, ...), with q, k, v (and, in single
blocks, the MLP input) fused into one projection.

A fused projection's LoRA is written block-diagonally: `lora_down` stacks the parts' down matrices ([k r, in]) and
`lora_up` holds each part's up matrix on its own rows and rank columns, zeros elsewhere; `alpha` is k times the
trained alpha, so alpha / rank is unchanged. That is exactly what such a fused LoRA computes, and it is the
"sparse" case diffusers' converter (`_convert_kohya_flux_lora_to_diffusers`, used by `FluxPipeline.load_lora_weights`
for these files) splits back into per-part LoRAs without loss. Parts without a LoRA get zero rows.
"""
from __future__ import annotations

import re

import torch

# diffusers module path (under the transformer) -> (BFL name, part index, number of parts)
_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3),
           "attn.to_v": ("img_attn_qkv", 2, 3), "attn.to_out.0": ("img_attn_proj", 0, 1),
           "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
           "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
           "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
           "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
           "norm1.linear": ("img_mod_lin", 0, 1), "norm1_context.linear": ("txt_mod_lin", 0, 1)}
_SINGLE = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
           "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1)}
_SINGLE_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_DOUBLE_PARTS = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def _bfl_name(module: str) -> tuple[str, int, int, str]:
    """(kohya key, part, parts, block prefix) of a diffusers module path; one line naming it when it has none."""
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    table = _DOUBLE if m and m.group(1) == "transformer_blocks" else _SINGLE
    if not m or m.group(3) not in table:
        raise ValueError(f"Flux kohya/ComfyUI export: the LoRA on '{module}' has no place in that layout (it covers "
                         "the double/single blocks' attention, MLP and modulation layers); use the diffusers file "
                         "or adapter.target=attn|attn_mlp")
    name, part, parts = table[m.group(3)]
    kind = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
    return f"lora_unet_{kind}_{m.group(2)}_{name}", part, parts, f"{m.group(1)}.{m.group(2)}."


def _fused_parts(key: str) -> tuple[str, ...]:
    if key.endswith("_linear1"):
        return _SINGLE_PARTS
    return next((parts for name, parts in _DOUBLE_PARTS.items() if key.endswith(name)), ())


def flux_kohya_state(state: dict[str, torch.Tensor], alpha: float, transformer: torch.nn.Module
                     ) -> dict[str, torch.Tensor]:
    """peft LoRA tensors of a Flux transformer (`<module>.lora_A.weight` / `.lora_B.weight`) -> BFL-named kohya
    tensors (module docstring). `transformer` gives the output sizes of fused parts that carry no LoRA."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, suffix = key.rpartition(".lora_")
        if suffix not in ("A.weight", "B.weight"):
            raise ValueError(f"Flux kohya/ComfyUI export: '{key}' is not a LoRA tensor (LoRA only: adapter.kind=lora)")
        modules.setdefault(module, {})[suffix[0]] = value.detach().float().cpu()
    fused: dict[str, dict[int, tuple[str, dict[str, torch.Tensor]]]] = {}
    for module, ab in modules.items():
        key, part, parts, prefix = _bfl_name(module)
        fused.setdefault(key, {})[part] = (prefix, ab)
    out: dict[str, torch.Tensor] = {}
    for key, parts in fused.items():
        prefix = next(iter(parts.values()))[0]
        names = _fused_parts(key)
        count = len(names) or 1
        rank = next(iter(parts.values()))[1]["A"].shape[0]
        downs, ups = [], []
        for i in range(count):
            if i in parts:
                downs.append(parts[i][1]["A"])
                ups.append(parts[i][1]["B"])
            else:  # a fused part without a LoRA: zero rows of its output size
                layer = transformer.get_submodule(prefix + names[i])
                weight = getattr(layer, "base_layer", layer).weight
                downs.append(torch.zeros(rank, weight.shape[1]))
                ups.append(torch.zeros(weight.shape[0], rank))
        out[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
        out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha) * count)
    return out
