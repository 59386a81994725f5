"""Run a training program unmodified and record when each of its optimizer steps ends.

    python benchmarks/step_clock.py --out steps.json [--side DIR] -- path/to/script.py ARGS...
    python benchmarks/step_clock.py --out steps.json -- -m train.ops.main ARGS...

A global optimizer step post-hook (`register_optimizer_step_post_hook`) stamps every step of
every torch optimizer, so two different programs are clocked the same way without touching either; the stamps are
written to --out when the program exits. `samples_per_s` in benchmarks/peer_speed.py is computed from them (clock
from the end of step 1).

--side DIR: packages the program needs and the project does not (diffusers' script: `datasets`, `torchvision`),
installed with `pip install --no-deps --target DIR`, on this process's path only. Where only a CUDA build of
torchvision is reachable, its compiled operators do not load into a CPU torch; declaring the two schemas its Python
side registers fake kernels for lets `torchvision.transforms` (PIL and tensor code only) import (shared NOTES).
"""
from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from pathlib import Path


def declare_torchvision_ops() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive by the registry below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    declare_torchvision_ops.lib = lib


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: step_clock.py --out FILE [--side DIR] -- (script.py | -m module) ARGS...")
    cut = argv.index("--")
    own, program = argv[:cut], argv[cut + 1:]
    opts = dict(zip(own[::2], own[1::2]))
    if "--out" not in opts:
        raise SystemExit("step_clock.py: --out FILE is required")
    if "--side" in opts:
        sys.path.insert(0, opts["--side"])
        if (Path(opts["--side"]) / "torchvision").is_dir():
            declare_torchvision_ops()
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))

    def write() -> None:
        with open(opts["--out"], "w") as f:
            json.dump({"program": program, "step_end_seconds": stamps}, f)

    atexit.register(write)
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(program)
        sys.path.insert(0, str(Path(program[0]).resolve().parent))
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
