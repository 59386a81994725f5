"""Trainable parameters and AdamW state of each adapter kind vs full fine-tuning: measured on the tiny_pixel
model (the optimizer's real state after one step), and counted for an SD1.5-size UNet built on the meta device
(no memory; AdamW state = 2 fp32 tensors per trainable parameter).

    python benchmarks/bench_adapter_memory.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from models.adapters import AdapterSpec, apply_adapter  # noqa: E402
from models.components import Components, build_components  # noqa: E402

KINDS = [("full", None), ("lora_r8", AdapterSpec("lora", rank=8)), ("dora_r8", AdapterSpec("dora", rank=8)),
         ("loha_r8", AdapterSpec("loha", rank=8)), ("lokr_r8", AdapterSpec("lokr", rank=8)),
         ("difffit", AdapterSpec("difffit"))]
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768, layers_per_block=2, attention_head_dim=8)


def measured(spec) -> dict:
    comps = build_components(preset="tiny_pixel")
    if spec is not None:
        apply_adapter(comps, spec)
    params = [p for p in comps.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss = sum((p.float() ** 2).sum() for p in params)
    loss.backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
                and t.ndim > 0)
    return {"trainable_params": sum(p.numel() for p in params), "adamw_state_bytes": state}


def counted(spec) -> dict:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    comps = Components(unet, torch.nn.Linear(1, 1), None, None)
    if spec is not None:
        apply_adapter(comps, spec)
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return {"trainable_params": n, "adamw_state_bytes": 8 * n, "total_unet_params": sum(p.numel() for p in unet.parameters())}


def main() -> None:
    result = {"benchmark": "adapter_memory", "tiny_pixel_measured": {}, "sd15_unet_counted": {}}
    for name, spec in KINDS:
        result["tiny_pixel_measured"][name] = measured(spec)
        result["sd15_unet_counted"][name] = counted(spec)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
