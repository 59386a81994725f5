"""The planner's figures for full-size runs people make, beside the figures peer trainers publish for the same runs
(on paper: no GPU, no weights; train/plan.py on models/real_sizes.py).

    python benchmarks/memory_paper.py

Peers' figures are quoted from their own repositories (source given per row; read 2026-12-07); "measured" marks a
reported peak, "minimum" a "works on / needs N GB" recommendation. The planner's peak includes its fixed 0.8 GiB
CUDA-context margin; where a peer reports a peak allocation without the context, compare without it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.adapters import AdapterSpec  # noqa: E402
from train.plan import GIB, Settings, parts_for_real_size, plan_memory  # noqa: E402

LORA16 = AdapterSpec(kind="lora", rank=16, target="attn_mlp")
LORA4_ATTN = AdapterSpec(kind="lora", rank=4, target="attn")
BF16 = dict(precision="bf16-mixed", gradient_checkpointing=True, batch=1, resolution=1024)

RUNS = [
    # (name, model, settings, peer figure GB, kind, source, what the peer's settings are)
    ("flux_lora_bf16_cached", "flux1_dev", dict(BF16, adapter=LORA16, optimizer="adamw", cached=True), 30.0,
     "measured ('a bit more than')", "bghira/SimpleTuner documentation/quickstart/FLUX.md",
     "rank-16 LoRA, bf16 base, batch 1, checkpointing, cached text and latents"),
    ("flux_lora_int8_cached", "flux1_dev", dict(BF16, adapter=LORA16, optimizer="adamw", cached=True, quantize="int8"),
     18.0, "measured ('a bit more than')", "bghira/SimpleTuner documentation/quickstart/FLUX.md",
     "int8 base (+ bf16 LoRA), rank 16, batch 1, checkpointing, cached"),
    ("flux_lora_nf4_cached", "flux1_dev", dict(BF16, adapter=LORA16, optimizer="adamw", cached=True, quantize="nf4"),
     9.0, "measured ('a bit more than')", "bghira/SimpleTuner documentation/quickstart/FLUX.md",
     "NF4 base, rank 16, batch 1, checkpointing, cached"),
    ("flux_lora_fp8_ai_toolkit", "flux1_dev", dict(BF16, adapter=LORA16, optimizer="adamw8bit", quantize="fp8",
                                                 quantize_text_encoder=True, ema=True), 24.0, "minimum",
     "ostris/ai-toolkit config/examples/train_lora_flux_24gb.yaml + README",
     "qfloat8 transformer and T5 (T5 on the GPU: text not cached), rank 16, 1024 px, batch 1, adamw8bit, EMA"),
    ("flux_lora_fp8_sd_scripts_24gb", "flux1_dev", dict(BF16, adapter=AdapterSpec(kind="lora", rank=4, target="attn_mlp"),
                                                      optimizer="adamw8bit", quantize="fp8", cached=True, batch=2),
     24.0, "minimum", "kohya-ss/sd-scripts README (Flux section) and docs/flux_train_network.md",
     "--fp8_base, dim 4, 1024 px batch 2, adamw8bit, checkpointing, cached text and latents"),
    ("flux_lora_fp8_swap_like_16", "flux1_dev", dict(BF16, adapter=AdapterSpec(kind="lora", rank=4, target="attn_mlp"),
                                             optimizer="adamw8bit", quantize="fp8", cached=True, block_swap=36),
     12.0, "minimum", "kohya-ss/sd-scripts docs/flux_train_network.md",
     "--fp8_base, --blocks_to_swap 16 (sd-scripts swaps 16 // 2 = 8 double + 16 single blocks: 4.98 B parameters; "
     "ours swaps the last 36 blocks, 5.10 B), 1024 px batch 1, adamw8bit, cached"),
    ("flux_lora_fp8_swap_like_28", "flux1_dev", dict(BF16, adapter=AdapterSpec(kind="lora", rank=4, target="attn_mlp"),
                                             optimizer="adamw8bit", quantize="fp8", cached=True, block_swap=48),
     8.0, "minimum", "kohya-ss/sd-scripts docs/flux_train_network.md",
     "--fp8_base, --blocks_to_swap 28 (14 double + 28 single: 8.72 B parameters; ours: the last 48 blocks, 8.78 B)"),
    ("flux_qlora_nf4_diffusers_blog", "flux1_dev", dict(BF16, adapter=LORA4_ATTN, optimizer="adamw8bit", cached=True,
                                                      quantize="nf4", resolution=640), 9.0, "measured peak",
     "huggingface/blog diffusers-quantization2.md", "NF4, rank 4 attention, 512x768 (planned at 640x640, the same "
     "pixel count), batch 1, 8-bit Adam, checkpointing, cached"),
    ("flux_lora_bf16_diffusers_blog", "flux1_dev", dict(BF16, adapter=LORA4_ATTN, optimizer="adamw8bit", cached=True,
                                                      resolution=640), 26.0, "measured peak",
     "huggingface/blog diffusers-quantization2.md", "bf16 base, otherwise as the NF4 row"),
    ("sdxl_full_zero2_offload", "sdxl", dict(precision="bf16-mixed", gradient_checkpointing=True, batch=8,
                                            resolution=1024, zero_stage=2, offload_optimizer=True, cached=True),
     12.8, "measured (nvidia-smi, 13102 MiB)", "bghira/SimpleTuner documentation/DEEPSPEED.md",
     "SDXL full U-Net, ZeRO-2 offload, 1024 px batch 8, one RTX 4090"),
    ("sdxl_full_zero2_8gpu", "sdxl", dict(precision="bf16-mixed", gradient_checkpointing=True, batch=8,
                                         resolution=1024, zero_stage=2, world_size=8, cached=True), None, "", "", ""),
    ("sdxl_full_zero3_8gpu", "sdxl", dict(precision="bf16-mixed", gradient_checkpointing=True, batch=8,
                                         resolution=1024, zero_stage=3, world_size=8, cached=True), None, "", "", ""),
]


def main() -> None:
    parts_by_model: dict = {}
    rows = []
    for name, model, settings, peer, kind, source, peer_settings in RUNS:
        t0 = time.perf_counter()
        parts = parts_by_model.setdefault(model, parts_for_real_size(model))
        plan = plan_memory(parts, Settings(**settings), gpu_memory_gb=1e9, suggest=False,
                           _cache=parts_by_model.setdefault(model + "_cache", {}))
        row = {"run": name, "model": model, "ours_gib": round(plan.peak / GIB, 2), "settings": plan.settings.label(),
               "ours_rows_gib": {k: round(v / GIB, 2) for k, v in plan.rows.items() if v},
               "plan_seconds": round(time.perf_counter() - t0, 1)}
        if peer is not None:
            row.update(peer_gb=peer, peer_kind=kind, source=source, peer_settings=peer_settings,
                       ratio_ours_to_peer=round(plan.peak / GIB / peer, 2))
        rows.append(row)
        print(f"{name}: ours {row['ours_gib']} GiB, peer {peer}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "memory_paper", "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
