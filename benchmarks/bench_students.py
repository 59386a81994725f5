"""Images/s of a teacher at 25 classifier-free-guided DDIM steps vs few-step students (LCMScheduler at 1/2/4 steps,
and a guidance-distilled student: one forward per step), same batch, same process.

    python benchmarks/bench_students.py --teacher RUN_OR_CKPT [--lcm RUN] [--guidance-student RUN] [--batch 64]
Without student checkpoints, the teacher's own weights stand in (the cost depends only on forwards per image).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train.build import load_pipeline


def rate(pipe, batch: int, steps: int, guidance: float, rounds: int) -> float:
    prompts = ["a handwritten digit six"] * batch
    out = []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(r),
             output_type="pt")
        if r:
            out.append(batch / (time.perf_counter() - t0))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--lcm")
    ap.add_argument("--guidance-student")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    teacher = load_pipeline(args.teacher)
    lcm = load_pipeline(args.lcm or args.teacher, sampler="lcm")
    result = {"benchmark": "student_throughput", "batch": args.batch, "threads": torch.get_num_threads(),
              "teacher_25_guided_images_per_s": round(rate(teacher, args.batch, 25, 3.0, args.rounds), 1)}
    for steps in (1, 2, 4):
        result[f"lcm_{steps}_steps_images_per_s"] = round(rate(lcm, args.batch, steps, 3.0, args.rounds), 1)
        result[f"speedup_lcm_{steps}"] = round(result[f"lcm_{steps}_steps_images_per_s"]
                                              / result["teacher_25_guided_images_per_s"], 2)
    if args.guidance_student:
        g = load_pipeline(args.guidance_student)
        result["guidance_student_25_images_per_s"] = round(rate(g, args.batch, 25, 3.0, args.rounds), 1)
        result["speedup_guidance_student"] = round(result["guidance_student_25_images_per_s"]
                                                   / result["teacher_25_guided_images_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
