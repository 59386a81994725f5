"""The GPU check's speed, strategy and end-to-end stages (issue 29). Each takes the check's arguments (`device`,
`small`, `work`) and returns a JSON-able dict; on CPU (`--dry-run`) each runs a small stand-in of the same code.

- throughput: an SD1.5-size UNet (860 M, 64x64x3 input, batch 16) and a DiT-XL/2-size transformer (675 M, 256
  tokens, batch 32), random weights, bf16 autocast: samples/s, TFLOP/s and MFU (models/flops.py), eager vs
  `torch.compile` (inductor), peak memory, and the first two steps' seconds (compilation);
- optimizers: AdamW per-parameter / foreach / fused and bitsandbytes' 8-bit AdamW on the SD1.5-size UNet: step
  milliseconds, state bytes, finite weights after the steps;
- strategies: `foundry-train` for a few steps on the SD1.5-size UNet under every strategy that runs on one GPU
  (single, DeepSpeed ZeRO-2/3 with and without CPU offload, FSDP on one rank): peak allocated memory, and the
  memory planner's figure for the same command;
- host_syncs: device synchronisations per training step of the real loop (`torch.cuda.set_sync_debug_mode`);
- demo: the digits demo (`foundry-train` defaults) on the GPU, evaluated every 250 steps: seconds to prompt
  accuracy 0.8 at guidance 2;
- gpu_tests: `pytest -m gpu` (tests/gpu/), passed/failed counts.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

THROUGHPUT = {"sd15_unet": ("sd15", 64, 16), "dit_xl2": ("dit_xl2", 32, 32)}
THROUGHPUT_SMALL = {"sd15_unet": ("micro", 16, 4), "dit_xl2": ("dit_micro", 16, 4)}
STRATEGIES = ("single", "deepspeed_stage2", "deepspeed_stage2_offload", "deepspeed_stage3", "deepspeed_stage3_offload",
              "fsdp")
NO_CUDA = "skipped: no CUDA device"


def cuda(args) -> bool:
    return args.device.startswith("cuda")


def _free(args) -> None:
    if cuda(args):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check_throughput(args) -> dict:
    from bench_speed import build
    from common import random_batch, train_step_seconds
    from models.flops import peak_tflops, train_flops_per_sample

    peak = peak_tflops(torch.device(args.device))
    dtype = torch.bfloat16 if cuda(args) else None
    steps = 10 if cuda(args) else 2
    out = {"peak_tflops": peak, "precision": "bf16-mixed" if dtype else "fp32", "steps": steps}
    for name, (preset, res, batch) in (THROUGHPUT_SMALL if args.small else THROUGHPUT).items():
        row = {"preset": preset, "resolution": res, "batch": batch}
        for variant, switch in (("eager", []), ("compiled", ["model.compile=" + ("true" if cuda(args) else "eager")])):
            _free(args)
            module = build(preset, res, ["model.gradient_checkpointing=false", *switch]).to(args.device).train()
            opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-6, fused=cuda(args))
            batch_data = random_batch(module.components, batch, args.device)
            t0 = time.perf_counter()
            secs = train_step_seconds(module, opt, batch_data, steps, args.device, dtype)
            rate = steps * batch / secs
            flops = train_flops_per_sample(module.components)
            row[variant] = {"samples_per_s": round(rate, 2), "tflops_per_s": round(flops * rate / 1e12, 2),
                            "mfu": round(flops * rate / 1e12 / peak, 4) if peak else None,
                            "first_two_steps_s": round(time.perf_counter() - t0 - secs, 1),
                            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda(args)
                            else None}
            row["parameters"] = sum(p.numel() for p in module.unet.parameters())
            del module, opt, batch_data
        row["compile_speedup"] = round(row["compiled"]["samples_per_s"] / row["eager"]["samples_per_s"], 3)
        out[name] = row
    return out


def check_optimizers(args) -> dict:
    from bench_speed import build
    from common import random_batch
    from train.optim import build_optimizer

    preset, res, batch = (THROUGHPUT_SMALL if args.small else THROUGHPUT)["sd15_unet"]
    module = build(preset, res, ["model.gradient_checkpointing=false"]).to(args.device).train()
    params = module.trainable_parameters()
    batch_data = random_batch(module.components, min(batch, 4), args.device)
    module.method.loss(batch_data, module)["loss"].mean().backward()
    grads = [p.grad.detach().clone() for p in params]
    kinds = {"adamw_forloop": {"name": "adamw", "fused": False}, "adamw_foreach": {"name": "adamw"},
             "adamw_fused": {"name": "adamw", "fused": True}, "adamw8bit": {"name": "adamw8bit"}}
    out = {"parameters": sum(p.numel() for p in params)}
    for kind, cfg in kinds.items():
        if kind == "adamw8bit" and not cuda(args):
            out[kind] = {"skipped": NO_CUDA + " (bitsandbytes' 8-bit optimizers are CUDA only)"}
            continue
        if kind == "adamw_forloop":
            opt = torch.optim.AdamW(params, lr=1e-6, foreach=False)
        else:
            opt = build_optimizer({**cfg, "lr": 1e-6}, params)
        ms = []
        for _ in range(6):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if cuda(args):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if cuda(args):
                torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t))
        out[kind] = {"step_ms": round(sorted(ms[1:])[len(ms[1:]) // 2], 3), "state_bytes": state,
                     "state_bytes_per_param": round(state / out["parameters"], 2),
                     "weights_finite": all(bool(torch.isfinite(p).all()) for p in params)}
        del opt
    return out


def train_cli(args, run: str, overrides: list[str], timeout: float) -> tuple[dict, float, str]:
    """`foundry-train` in a subprocess; (summary.json, wall seconds, log tail)."""
    cmd = [sys.executable, "-m", "train.ops.main", f"paths.output_dir={args.work}", f"run_name={run}",
           "trainer.enable_progress_bar=false", *overrides]
    t0 = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    summary_file = Path(args.work) / run / "summary.json"
    summary = json.loads(summary_file.read_text()) if proc.returncode == 0 and summary_file.exists() else {}
    return summary, wall, (proc.stdout + proc.stderr)[-1500:]


def strategy_overrides(args, strategy: str) -> list[str]:
    preset, res, batch = (THROUGHPUT_SMALL if args.small else THROUGHPUT)["sd15_unet"]
    return [f"strategy={strategy}", f"model.preset={preset}", f"model.resolution={res}", f"data.batch_size={batch}",
            "trainer.max_steps=4", "trainer.log_every_n_steps=2", "callbacks.throughput.log_every_n_steps=2",
            f"trainer.precision={'bf16-mixed' if cuda(args) else '32-true'}", "model.gradient_checkpointing=false",
            "lr_scheduler.warmup_steps=0", "~callbacks.ema", "~callbacks.sample_images",
            "callbacks.digits_eval.enabled=false", "checkpoint.every_n_steps=1000", "logger=none",
            "data.num_workers=1", "tracking.artifacts=false"]


def planned_gib(overrides: list[str]) -> float | None:
    proc = subprocess.run([sys.executable, "-m", "train.ops.plan", *overrides, "--json"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        plan = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None
    overhead = next((v for k, v in plan["rows_gib"].items() if k.startswith("overhead")), 0.0)
    return round(plan["peak_gib"] - overhead, 3)


def check_strategies(args) -> dict:
    out = {}
    for strategy in STRATEGIES:
        if not cuda(args) and strategy != "single":
            out[strategy] = {"skipped": NO_CUDA}
            continue
        overrides = strategy_overrides(args, strategy)
        summary, wall, tail = train_cli(args, f"strategy-{strategy}", overrides, timeout=240)
        shutil.rmtree(Path(args.work) / f"strategy-{strategy}", ignore_errors=True)  # ~10 GB of checkpoint each
        if not summary:
            out[strategy] = {"error": tail}
            continue
        measured = summary.get("perf/peak_memory_mb")
        planned = planned_gib(overrides + ["launcher.gpu_memory_gb=80"])
        out[strategy] = {"peak_allocated_gib": round(measured / 1024, 3) if measured and cuda(args) else None,
                         "planned_gib": planned, "samples_per_s": summary.get("perf/samples_per_sec"),
                         "wall_seconds": round(wall, 1), "steps": summary.get("global_step")}
        if out[strategy]["peak_allocated_gib"] and planned:
            out[strategy]["planned_over_measured"] = round(planned / out[strategy]["peak_allocated_gib"], 3)
    return out


def check_host_syncs(args) -> dict:
    """Synchronisations per optimizer step of the real loop (ours: the guard's one read; Lightning's progress bar
    and logging may add theirs), counted by CUDA's sync debug mode over steps 3-5."""
    import lightning as L
    from bench_speed import build
    from common import random_batch

    from models.tokens import row_keys

    if not cuda(args):
        return {"skipped": NO_CUDA + " (CUDA's sync debug mode counts device synchronisations)"}
    module = build("tiny_pixel", 16, ["model.gradient_checkpointing=false"])
    batch = random_batch(module.components, 64)
    batch["id_keys"] = row_keys(batch["input_ids"])  # as the loader's collate gives them (the text cache's keys)
    data = torch.utils.data.DataLoader([batch] * 8, batch_size=None)
    counted: list[int] = []

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 3:
                torch.cuda.set_sync_debug_mode("warn")
                self.catcher = warnings.catch_warnings(record=True)
                self.records = self.catcher.__enter__()
                warnings.simplefilter("always")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= 3:
                torch.cuda.set_sync_debug_mode(0)
                self.catcher.__exit__(None, None, None)
                counted.append(sum("synchroniz" in str(w.message) for w in self.records))

    trainer = L.Trainer(max_steps=6, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Count()])
    trainer.fit(module, train_dataloaders=data)
    return {"syncs_per_step": counted}


def check_demo(args) -> dict:
    """The README demo on the GPU; CPU stand-in: the micro preset for 4 steps (the same parsing)."""
    every = 250 if cuda(args) else 2
    overrides = [f"callbacks.digits_eval.every_n_steps={every}", "callbacks.digits_eval.guidance_scales=[2.0]",
                 "logger=wandb"]
    if not cuda(args):
        overrides += ["model.preset=micro", "trainer.max_steps=4", "data.batch_size=8", "data.num_workers=0",
                      "lr_scheduler.warmup_steps=0", "callbacks.digits_eval.n_per_digit=1",
                      "callbacks.digits_eval.num_inference_steps=2", "~callbacks.sample_images",
                      "model.gradient_checkpointing=false"]
    summary, wall, tail = train_cli(args, "demo", overrides, timeout=330)
    rows = []
    metrics = Path(args.work) / "demo" / "csv" / "metrics.csv"
    if metrics.exists():
        with open(metrics, newline="") as f:
            rows = [(int(r["step"]), float(r["val/prompt_accuracy"])) for r in csv.DictReader(f)
                    if r.get("val/prompt_accuracy")]
    steps = int(summary.get("global_step") or 0)
    first = next((s for s, acc in rows if acc >= 0.8), None)
    return {"completed": bool(summary), "steps": steps, "wall_seconds": round(wall, 1),
            "prompt_accuracy_by_step": rows, "first_step_at_0.8": first,
            "seconds_to_0.8_estimate": round(wall * first / steps, 1) if first and steps else None,
            **({} if summary else {"error": tail})}


def check_gpu_tests(args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "tests/gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return {"returncode": proc.returncode, "summary": last}


STAGES = {"throughput": check_throughput, "optimizers": check_optimizers, "strategies": check_strategies,
          "host_syncs": check_host_syncs, "demo": check_demo, "gpu_tests": check_gpu_tests}
