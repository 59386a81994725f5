"""The GPU check: one prepared, unattended script for the first minutes a CUDA GPU is available (`make gpu-check`).
Each stage is independent (a failure is recorded and the next one runs), stages stop being started once the time
budget is spent (default 450 s: the whole check fits in 8 minutes on one H100), and the whole prints one JSON
object, also written to --out. What runs here was only ever exercised on CPU; this is where it meets a GPU.

    python benchmarks/gpu_check.py --out outputs/gpu_check.json     # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --dry-run                        # CPU: every stage's stand-in, tiny sizes
    python benchmarks/gpu_check.py --only throughput strategies     # some stages

Without a CUDA device (and without --dry-run) every stage reports "skipped: no CUDA device".
Stages: benchmarks/gpu_stages.py (throughput and MFU eager vs compiled, optimizers, strategies' peak memory against
the planner, host syncs per step, the digits demo, the `gpu` tests) and benchmarks/gpu_memory.py (block swap,
quantized bases, the planner on a Flux-size transformer).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gpu_memory import check_block_swap, check_planner, check_quantize  # noqa: E402
from gpu_stages import NO_CUDA, STAGES  # noqa: E402

CHECKS = {**STAGES, "block_swap": check_block_swap, "quantize": check_quantize, "planner": check_planner}


def run_checks(args) -> dict:
    """Every chosen stage in order, each recorded (result, error or skip) with its seconds."""
    result = {"benchmark": "gpu_check", "torch": torch.__version__, "device": args.device, "dry_run": args.dry_run,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "budget_s": args.budget_s}
    start = time.perf_counter()
    for name in args.only or CHECKS:
        if not args.device.startswith("cuda") and not args.dry_run:
            result[name] = {"skipped": NO_CUDA}
            continue
        if time.perf_counter() - start > args.budget_s:
            result[name] = {"skipped": f"time budget of {args.budget_s:g} s spent"}
            continue
        t0 = time.perf_counter()
        try:
            result[name] = CHECKS[name](args)
        except Exception:  # noqa: BLE001 - recorded; the next check still runs
            result[name] = {"error": traceback.format_exc()[-2000:]}
        result[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"gpu_check: {name} done in {result[name + '_seconds']} s", file=sys.stderr, flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="on CPU: every stage's stand-in at tiny sizes")
    ap.add_argument("--small", action="store_true", help="tiny sizes on the chosen device")
    ap.add_argument("--resolution", type=int, default=None, help="the memory stages' image side (512; small: 64)")
    ap.add_argument("--only", nargs="*", choices=list(CHECKS))
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no stage after this many seconds")
    ap.add_argument("--work", type=Path, default=Path("outputs/gpu_check"), help="runs the stages launch")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.small = "cpu", True
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        args.device = "none"  # every stage: skipped
    args.resolution = args.resolution or (64 if args.small else 512)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.work = args.work.resolve()
    shutil.rmtree(args.work, ignore_errors=True)  # a previous check's runs would be resumed, not measured
    args.work.mkdir(parents=True, exist_ok=True)
    text = json.dumps(run_checks(args), indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
