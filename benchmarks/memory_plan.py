"""The memory planner against measured memory, on this CPU: for each configuration, the planner's peak (train/plan.py,
a fake-tensor trace + arithmetic) beside the measured increase of the training process's peak resident memory over
its resident memory before the model is built (`foundry-train`'s own `train()`, in a fresh process per
configuration, glibc told to hand large freed blocks back so resident memory follows live memory).

The model is the `flux_small` preset: a Flux-architecture transformer (512 wide, 4 double + 8 single blocks, ~72 M
parameters, so weights, gradients and optimizer state stand out of the process's own overhead) at 64 px, built in
memory: a model loaded from safetensors on the CPU stays mapped from its file, so after quantizing it there the
original weights' pages stay resident (file-backed, and never a GPU's cost) and would blur the quantized rows.

    python benchmarks/memory_plan.py [--steps 6] [--out /tmp/memory_plan]

Prints one JSON object: per configuration the planner's rows, its peak, the measured increase, their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ["trainer.accelerator=cpu", "logger=none", "callbacks=none", "data.num_workers=0", "data.shuffle_buffer=64",
          "lr_scheduler.warmup_steps=0", "checkpoint.every_n_steps=100000", "trainer.enable_progress_bar=false",
          "model=flux_tiny", "model.preset=flux_small", "model.resolution=64", "optimizer.lr=1e-4"]
CONFIGS = {
    "full": ["data.batch_size=16"],
    "full_checkpointing": ["data.batch_size=16", "model.gradient_checkpointing=true"],
    "lora": ["data.batch_size=16", "adapter=lora", "adapter.rank=16"],
    "lora_int8": ["data.batch_size=16", "adapter=lora", "adapter.rank=16", "model.quantize=int8"],
    "lora_nf4": ["data.batch_size=16", "adapter=lora", "adapter.rank=16", "model.quantize=nf4"],
    "lora_block_swap": ["data.batch_size=16", "adapter=lora", "adapter.rank=16", "model.block_swap=6"],
    "lora_checkpointing_b64": ["data.batch_size=64", "adapter=lora", "adapter.rank=16",
                               "model.gradient_checkpointing=true"],
    "lora_b64": ["data.batch_size=64", "adapter=lora", "adapter.rank=16", "model.gradient_checkpointing=false"],
    "lora_cached": ["data.batch_size=16", "adapter=lora", "adapter.rank=16", "data.random_flip=false"],
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(overrides: list[str]) -> None:
    """One configuration in this fresh process: measure a short run, then plan it."""
    from train.build import build_base
    from train.ops.resolvers import compose_config
    from train.ops.run import train
    from train.plan_config import plan_for_config

    cfg = compose_config(overrides)
    baseline = _status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    t0 = time.perf_counter()
    train(cfg)
    measured = _status("VmHWM:") - baseline
    plan = plan_for_config(cfg, build_base(cfg))
    print("RESULT " + json.dumps({"measured_bytes": measured, "planned_bytes": plan.peak, "plan": plan.to_json(),
                                  "train_seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def build_model(folder: Path) -> None:
    """The preset's VAE and text encoder as a folder, to encode the latent cache with (the same seed: the same
    weights, which the cache's fingerprint check confirms)."""
    from models.components import build_components

    build_components(preset="flux_small", resolution=64).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/memory_plan")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    out = Path(args.out)
    model = out / "flux_small"
    if not (model / "model_index.json").is_file():
        build_model(model)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2",
           "WANDB_MODE": "offline"}
    cache = out / "cache"
    results = {}
    for name in args.only or CONFIGS:
        extra = list(CONFIGS[name])
        if name == "lora_cached":
            if not (cache / "cache.json").is_file():
                from data.digits import ensure_digits_shards

                subprocess.run([sys.executable, "-m", "train.ops.shards", "encode", ensure_digits_shards(64),
                                "--out", str(cache), "--model", str(model), "--dtype", "fp32"], cwd=ROOT, check=True,
                               env=env, capture_output=True)
            extra.append(f"data.urls={cache}")
        overrides = [*COMMON, f"trainer.max_steps={args.steps}",
                     f"paths.output_dir={out / 'runs'}", f"run_name={name}", *extra]
        shutil.rmtree(out / "runs" / name, ignore_errors=True)  # a fresh run, never a resumed one
        res = subprocess.run([sys.executable, __file__, "--child", *overrides], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            results[name] = {"error": res.stderr[-1500:]}
            continue
        r = json.loads(line[len("RESULT "):])
        r["ratio_planned_to_measured"] = round(r["planned_bytes"] / r["measured_bytes"], 3)
        r["command"] = "foundry-train " + " ".join(o for o in overrides if not o.startswith(("paths.", "run_name")))
        results[name] = r
        print(f"{name}: planned {r['planned_bytes'] / 2**20:.0f} MiB, measured {r['measured_bytes'] / 2**20:.0f} MiB "
              f"({r['ratio_planned_to_measured']})", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "memory_plan", "configs": results}, indent=2))


if __name__ == "__main__":
    main()
