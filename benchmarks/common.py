"""Shared helpers for the digits-world proof scripts: run the real CLI, time it, score checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train.ops.console import install as quiet_console  # noqa: E402  (after the path: scripts run from a checkout)

quiet_console()

# `foundry-recipe NAME --smoke` sets this: every run of the chain takes a few steps of small batches and every
# evaluation a few samples, to check that a chain runs end to end before spending its real hour (numbers meaningless).
SMOKE = os.environ.get("FOUNDRY_RECIPE_SMOKE") == "1"
SMOKE_OVERRIDES = ["trainer.max_steps=4", "data.batch_size=8", "data.shuffle_buffer=16", "data.num_workers=0",
                   "checkpoint.every_n_steps=2", "callbacks.sample_images.every_n_steps=0",
                   "callbacks.digits_eval.n_per_digit=1", "callbacks.digits_eval.guidance_scales=[2.0]",
                   "callbacks.digits_eval.num_inference_steps=2"]


def train(out: Path, run_name: str, *overrides: str, log: Path | None = None) -> dict:
    """`foundry-train` through the real CLI; returns summary.json plus the wall-clock, fails loudly."""
    cmd = [sys.executable, "-m", "train.ops.main", f"paths.output_dir={out}", f"run_name={run_name}", "logger=wandb",
           "trainer.enable_progress_bar=false", *overrides, *(SMOKE_OVERRIDES if SMOKE else [])]
    t0 = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline"}
    with open(log or out / f"{run_name}.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's own peak resident memory, not the max of all children
        proc.returncode = os.waitstatus_to_exitcode(status)
    res = proc
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"training failed ({res.returncode}): {' '.join(cmd)}; see {log or out / f'{run_name}.log'}")
    summary = json.loads((out / run_name / "summary.json").read_text())
    summary["wall_seconds"] = round(wall, 1)
    summary["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    summary["command"] = " ".join(["foundry-train", *overrides])
    return summary


def plot(out: Path, runs: list[str], metric: str) -> str:
    """The runs' `metric` curves, last evaluations and sample grids as one PNG (foundry-report) in `out`."""
    from train.ops.report import load_run, render

    png = out / f"curves_{metric.replace('/', '_')}.png"
    return str(render([load_run(out / r) for r in runs if (out / r).is_dir()], png, metric))


def pipeline(ckpt: str | Path, use_ema: bool = True):
    from train.build import load_pipeline

    return load_pipeline(ckpt, use_ema=use_ema)


def digits_metrics(pipe, guidance_scales=(1.0, 2.0, 3.0, 4.0), n_per_digit: int = 20, digits=tuple(range(10)),
                   steps: int = 25, seed: int = 1234) -> dict:
    from train.digits_eval import evaluate_digits

    if SMOKE:
        n_per_digit, steps, guidance_scales = 1, 2, tuple(guidance_scales)[:1]
    m = evaluate_digits(pipe, guidance_scales=guidance_scales, n_per_digit=n_per_digit, digits=tuple(digits),
                        steps=steps, seed=seed)
    return {k.removeprefix("val/"): round(v, 4) for k, v in m.items()}


def dump(result: dict, out: Path | None = None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if out is not None:
        out.write_text(text)


def train_step_seconds(module, opt, batch: dict, steps: int, device: str = "cpu", dtype=None) -> float:
    """Seconds for `steps` training steps of the module's own method loss (backward, optimizer step), after 2 warm-up
    steps (compilation happens there); CUDA is synchronised around the timed span."""
    import torch

    for i in range(steps + 2):
        if i == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = module.method.loss(batch, module)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def random_batch(comps, n: int, device: str = "cpu") -> dict:
    """A fixed random image batch with one caption, in the model's input size."""
    import torch

    from models.components import tokenize

    g = torch.Generator().manual_seed(0)
    c, r = (3 if comps.vae is not None else comps.unet.config.in_channels), comps.resolution
    return {"pixels": (torch.rand(n, c, r, r, generator=g) * 2 - 1).to(device),
            "input_ids": tokenize(comps.tokenizer, ["a handwritten digit seven"] * n).to(device)}


def run_result(summary: dict, prefixes: tuple[str, ...] = ("val/",)) -> dict:
    """What a proof script keeps of one training run: command, wall-clock, steps and the metrics under `prefixes`."""
    return {"command": summary["command"], "wall_seconds": summary["wall_seconds"],
            "steps": summary.get("global_step"), **{k: v for k, v in summary.items() if k.startswith(prefixes)}}


def save_result(out: Path, name: str, result: dict) -> None:
    """OUT/result_<name>.json (one per variant, so variants can run in parallel processes)."""
    (out / f"result_{name}.json").write_text(json.dumps(result, indent=2))


def dump_results(out: Path) -> None:
    """Print every variant's result found in OUT as one JSON object."""
    dump({p.stem.removeprefix("result_"): json.loads(p.read_text()) for p in sorted(out.glob("result_*.json"))})
