"""Peak memory per rank and throughput of each strategy, through the real CLI (2 ranks on CPU, or N GPUs).

On CPU the figure is each process's peak resident set: for the ~1 M-parameter digits model the Python process and
its libraries dominate, so differences between strategies are small; on GPUs it is `max_memory_allocated`.

    python benchmarks/bench_strategies.py [--devices 2] [--steps 30] [--preset tiny_pixel] [--accelerator cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import dump, train

from tests.helpers import free_port

STRATEGIES = ["single", "ddp", "deepspeed_stage2", "deepspeed_stage2_offload", "deepspeed_stage3",
              "deepspeed_stage3_offload"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32, help="per device")
    ap.add_argument("--preset", default="tiny_pixel")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--extra", nargs="*", default=[])
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="foundry-strategies-"))
    result = {"benchmark": "strategies", "accelerator": args.accelerator, "preset": args.preset,
              "devices": args.devices, "batch_per_device": args.batch, "steps": args.steps, "runs": {}}
    for name in args.strategies:
        devices = 1 if name == "single" else args.devices
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        os.environ.pop("FOUNDRY_RUN_NAME", None)
        s = train(out, name, f"strategy={name}", f"trainer.devices={devices}", f"trainer.accelerator={args.accelerator}",
                  f"trainer.precision={args.precision}", f"model.preset={args.preset}", f"data.batch_size={args.batch}",
                  f"trainer.max_steps={args.steps}", "~callbacks.sample_images", "~callbacks.digits_eval",
                  "~callbacks.ema",
                  f"checkpoint.every_n_steps={args.steps}", "lr_scheduler.warmup_steps=0",
                  "+callbacks.throughput.log_every_n_steps=5", *args.extra)
        result["runs"][name] = {
            "devices": devices, "peak_memory_mb_per_rank": [round(s[k], 1) for k in sorted(s) if
                                                            k.startswith("perf/peak_memory_mb_rank")],
            "samples_per_sec": round(s.get("perf/samples_per_sec", float("nan")), 1),
            "wall_seconds": s["wall_seconds"]}
    dump(result, out / "strategies.json")
    print(f"runs in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
