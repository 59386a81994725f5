"""The GPU check's memory stages (issue 23), on a Flux-architecture transformer with random weights (1536 wide, 8
double + 16 single blocks, ~1.5 B parameters; small: 256 wide) in bf16, LoRA rank 16, batch 1 at 512 px:
- block swap: peak allocated memory with half the blocks swapped vs none; goal: the drop is >= 70% of the swapped
  blocks' weight bytes, and the loss is identical;
- quantized bases: int8 / fp8 (compute capability >= 8.9) / nf4: a LoRA step runs, its loss is finite, and the
  weights' allocated bytes;
- planner: train/plan.py's peak (without its fixed CUDA-context margin) vs `torch.cuda.max_memory_allocated` for
  LoRA with and without gradient checkpointing and full fine-tuning.
Run through benchmarks/gpu_check.py.
"""
from __future__ import annotations

import copy
import time

import torch

from models.adapters import AdapterSpec, apply_adapter
from models.block_swap import BlockSwap, transformer_blocks
from models.families.flux import FoundryFlux
from models.families.base import Components
from models.quantize import quantize_frozen
from train.plan import ACTIVATIONS, Parts, Settings, plan_memory


def flux_model(small: bool) -> torch.nn.Module:
    width, double, single = (256, 2, 4) if small else (1536, 8, 16)
    with torch.device("meta"):
        return FoundryFlux(in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128 if not
                           small else 64, num_attention_heads=width // (64 if small else 128), joint_attention_dim=1024,
                           pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56) if not small
                           else (8, 28, 28))


def materialize(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    return model.to(dtype)


def inputs(batch: int, resolution: int, device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    side = resolution // 8
    return {"sample": torch.randn(batch, 16, side, side, device=device, dtype=dtype, generator=gen),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": torch.randn(batch, 65, 1024, device=device, dtype=dtype, generator=gen)}


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    apply_adapter(Components(model, torch.nn.Identity(), None, None, family="flux"),
                  AdapterSpec(kind="lora", rank=16, target="attn", extra={"init_weights": False}))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def step(model, batch, device) -> tuple[float, int]:
    """One training forward/backward under bf16 autocast; (loss, peak allocated bytes above the start)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        out = model(**batch).sample
    loss = out.float().pow(2).mean()
    loss.backward()
    sync()
    peak = torch.cuda.max_memory_allocated() - start if device.startswith("cuda") else 0
    return float(loss), peak


def check_block_swap(args) -> dict:
    base = with_lora(materialize(flux_model(args.small), "cpu", torch.bfloat16))
    batch = inputs(1, args.resolution, args.device, torch.bfloat16)
    plain = copy.deepcopy(base).to(args.device)
    loss, peak = step(plain, batch, args.device)
    weights_plain = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
    del plain
    swapped = copy.deepcopy(base)
    n = len(transformer_blocks(swapped)) // 2
    swap = BlockSwap(swapped, n)  # before the move: the swapped weights never reach the GPU whole
    swapped.to(args.device)
    loss_s, peak_s = step(swapped, batch, args.device)
    weights_swapped = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
    drop = (weights_plain + peak) - (weights_swapped + peak_s)
    return {"swapped_blocks": n, "swapped_bytes": swap.nbytes, "loss": loss, "loss_swapped": loss_s,
            "identical_loss": loss == loss_s, "peak_bytes": weights_plain + peak, "peak_bytes_swapped":
            weights_swapped + peak_s, "drop_bytes": drop, "drop_share_of_swapped": round(drop / swap.nbytes, 3),
            "goal_drop_share": 0.7, "resident_swapped_bytes_after": swap.resident_bytes()}


def check_quantize(args) -> dict:
    out = {}
    for kind in ("int8", "fp8", "nf4"):
        if kind == "fp8" and (not args.device.startswith("cuda") or torch.cuda.get_device_capability() < (8, 9)):
            out[kind] = {"skipped": "needs compute capability >= 8.9"}
            continue
        try:
            model = materialize(flux_model(args.small), "cpu", torch.bfloat16).requires_grad_(False)
            before = sum(p.numel() * p.element_size() for p in model.parameters())
            quantize_frozen(model, kind)
            model = with_lora(model).to(args.device)
            t0 = time.perf_counter()
            loss, peak = step(model, inputs(1, args.resolution, args.device, torch.bfloat16), args.device)
            out[kind] = {"loss": loss, "finite": loss == loss and abs(loss) != float("inf"), "step_peak_bytes": peak,
                         "bf16_weight_bytes": before, "seconds": round(time.perf_counter() - t0, 2),
                         "allocated_bytes": torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0}
        except Exception as err:  # noqa: BLE001 - a check reports, the next one runs
            out[kind] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return out


def check_planner(args) -> dict:
    out = {}
    parts = Parts("flux", lambda: flux_model(args.small), [], None,
                  lambda b, r: {k: torch.empty(v.shape) for k, v in inputs(b, r, "cpu", torch.float32).items()})
    for name, lora, ckpt in (("lora", True, False), ("lora_checkpointing", True, True), ("full", False, True)):
        s = Settings(batch=1, resolution=args.resolution, precision="bf16-mixed", gradient_checkpointing=ckpt,
                     adapter=AdapterSpec(kind="lora", rank=16, target="attn") if lora else AdapterSpec(),
                     optimizer="adamw", device="cuda")
        plan = plan_memory(parts, s, gpu_memory_gb=1e6, suggest=False)
        model = materialize(flux_model(args.small), "cpu", torch.float32)
        if lora:
            model = with_lora(model.requires_grad_(False))
        # as the module holds it: frozen weights in bf16 under bf16-mixed, trained ones fp32
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        if ckpt:
            model.enable_gradient_checkpointing()
        model.to(args.device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        batch = inputs(1, args.resolution, args.device, torch.float32)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the second step runs with the optimizer state allocated
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
                loss = model(**batch).sample.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        measured = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
        planned = plan.peak - plan.rows.get("overhead (CUDA context, allocator)", 0)
        out[name] = {"planned_bytes": planned, "measured_max_allocated": measured,
                     "ratio": round(planned / measured, 3) if measured else None,
                     "planned_activations": plan.rows[ACTIVATIONS]}
        del model, opt
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out
