"""One-step students on the digits world, through the real CLI: reflow (2-rectified flow on teacher couplings, then
one-step distillation), progressive distillation (8 -> 4 -> 2 -> 1 steps), DMD2 at 1, 2 and 4 steps (and with its GAN
term) and image-free VSD (and VSD started at T-1, the first version's setting). Prompt accuracy and Fréchet
distance at 1, 2, 4 steps against the teacher at 25 guided DDIM steps, training wall-clock per route, and the
straightness of the reflow students' flows.

    python benchmarks/onestep_digits.py --teacher RUN_DIR --out /tmp/onestep [--routes reflow progressive dmd2 vsd ...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import ROOT, digits_metrics, dump, train

GUIDANCE_TEACHER = (1.0, 2.0, 3.0)


def scores(model, sampler: str, steps: int, guidance=(1.0,)) -> dict:
    from train.build import load_pipeline

    m = digits_metrics(load_pipeline(model, sampler=sampler), guidance, steps=steps)
    keep = ("prompt_accuracy", "independent_accuracy_g1", "frechet", "best_guidance", "straightness")
    return {k: m[k] for k in keep if k in m}


def last(out: Path, name: str) -> Path:
    return out / name / "checkpoints" / "last.ckpt"


EXTRA: list[str] = []  # --extra: overrides for every training run (e.g. a smoke test's lr_scheduler.warmup_steps=0)


def quiet(*extra: str) -> list[str]:
    return ["callbacks.digits_eval.enabled=false", "callbacks.sample_images.every_n_steps=0", *extra, *EXTRA]


def reflow(args, teacher: Path) -> dict:
    couplings = args.out / "couplings"
    subprocess.run([sys.executable, "-m", "train.ops.shards", "couplings", "--teacher", str(teacher), "--out", str(couplings),
                    "--n", str(args.couplings), "--guidance", str(args.teacher_guidance)], cwd=ROOT, check=True)
    s1 = train(args.out, "reflow", "experiment=reflow", f"method.teacher={teacher}", f"data.urls={couplings}",
               f"trainer.max_steps={args.reflow_steps}", *quiet())
    s2 = train(args.out, "reflow_1step", "experiment=reflow", f"method.teacher={last(args.out, 'reflow')}",
               "method.sigma=1.0", f"data.urls={couplings}", f"trainer.max_steps={args.distill_steps}", *quiet())
    return {"couplings": args.couplings, "reflow_seconds": s1["wall_seconds"], "distill_seconds": s2["wall_seconds"],
            "commands": [s1["command"], s2["command"]],
            "2-rectified": {f"{n}_steps": scores(last(args.out, "reflow"), "euler", n) for n in (1, 2, 4)},
            "distilled": {f"{n}_steps": scores(last(args.out, "reflow_1step"), "euler", n) for n in (1, 2, 4)}}


def progressive(args, teacher: Path) -> dict:
    s0 = train(args.out, "teacher_v", f"model.pretrained={teacher}", "model.prediction_type=v_prediction",
               f"trainer.max_steps={args.convert_steps}", "optimizer.lr=2e-4", "lr_scheduler.warmup_steps=20",
               *quiet())
    s1 = train(args.out, "progressive", "experiment=progressive", f"method.teacher={last(args.out, 'teacher_v')}",
               f"method.guidance={args.teacher_guidance}", f"method.steps_per_round={args.round_steps}",
               f"trainer.max_steps={3 * args.round_steps}", *quiet())
    return {"convert_seconds": s0["wall_seconds"], "distill_seconds": s1["wall_seconds"],
            "commands": [s0["command"], s1["command"]],
            "v_teacher_ddim25": scores(last(args.out, "teacher_v"), "ddim", 25, GUIDANCE_TEACHER),
            **{f"{n}_steps": scores(last(args.out, "progressive"), "ddim_trailing", n) for n in (1, 2, 4)}}


DM_ROUTES = {  # distribution matching (train/methods/dmd.py): student steps K and the run's overrides
    "dmd2": (1, ["experiment=dmd2"]),
    "dmd2_2step": (2, ["experiment=dmd2", "method.student_steps=2"]),
    "dmd2_4step": (4, ["experiment=dmd2", "method.student_steps=4"]),
    "dmd2_gan": (1, ["experiment=dmd2", "method.gan_weight=0.01"]),
    "vsd": (1, ["experiment=vsd"]),  # image-free, LoRA fake score
    "vsd_t999": (1, ["experiment=vsd", "method.conditioning_timestep=null"]),  # the first version's start at T-1
}


def distribution_matching(route: str):
    def run(args, teacher: Path) -> dict:
        k, overrides = DM_ROUTES[route]
        s = train(args.out, route, *overrides, f"method.teacher={teacher}", f"method.guidance_min={args.dm_guidance}",
                  f"method.guidance_max={args.dm_guidance}", f"trainer.max_steps={args.dm_steps}",
                  *(["method.conditioning_timestep=899"] if route != "vsd_t999" else []),
                  "method.fake_updates=2", "optimizer.lr=1e-5", "method.fake_lr=1e-4", *quiet())
        return {"seconds": s["wall_seconds"], "command": s["command"],
                f"{k}_steps": scores(last(args.out, route), "lcm", k)}
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--routes", nargs="+", default=["reflow", "progressive", *DM_ROUTES],
                    choices=["reflow", "progressive", *DM_ROUTES])
    ap.add_argument("--teacher-guidance", type=float, default=2.0)
    ap.add_argument("--couplings", type=int, default=4096)
    ap.add_argument("--reflow-steps", type=int, default=1000)
    ap.add_argument("--distill-steps", type=int, default=500)
    ap.add_argument("--convert-steps", type=int, default=300)
    ap.add_argument("--round-steps", type=int, default=300)
    ap.add_argument("--dm-steps", type=int, default=300, help="DMD2/VSD optimizer steps (fake + generator)")
    ap.add_argument("--dm-guidance", type=float, default=3.0, help="the teacher's guidance in DMD2/VSD")
    ap.add_argument("--extra", nargs="*", default=[])
    args = ap.parse_args()
    EXTRA.extend(args.extra)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher / "checkpoints" / "last.ckpt" if args.teacher.is_dir() else args.teacher
    result = {"benchmark": "onestep_digits", "teacher": str(teacher),
              "teacher_ddim25": scores(teacher, "ddim", 25, GUIDANCE_TEACHER)}
    for route in args.routes:
        run = {"reflow": reflow, "progressive": progressive}.get(route) or distribution_matching(route)
        result[route] = run(args, teacher)
        dump(result, args.out / "onestep_digits.json")


if __name__ == "__main__":
    main()
