"""Side by side with diffusers' own training script: samples/s on the same tiny Stable-Diffusion pipeline.

The peer is `examples/text_to_image/train_text_to_image.py` from a diffusers checkout at the pinned release, run
unmodified from the path given (the project keeps no copy of it). Both programs are clocked the same way, from
outside, by benchmarks/step_clock.py (a global optimizer-step hook): samples/s = batch x (steps - 1) / (time from
the end of step 1 to the end of the last step). Variants alternate within each round, in one run.

Same model, data and settings for every variant: a CLIP text encoder, AutoencoderKL (32, 64) and
UNet2DConditionModel (32, 64) (the tiny_latent preset, exported as a StableDiffusionPipeline folder), the 1,797 digits
at 32 px (an imagefolder for the peer, the same samples as shards for us), batch 32, fp32, AdamW lr 1e-4 constant
with weight decay 0.01 and gradient clipping at 1.0, plain MSE (no min-SNR, no caption dropout), one loader worker,
W&B offline, no EMA, samples, evaluation or checkpoints inside the clocked steps.

- `diffusers`: the peer script;
- `foundry`: `foundry-train model=pretrained` encoding images and captions on the fly;
- `foundry_cached`: the same from `foundry-shards encode` caches (VAE moments + text embeddings).

    # the peer needs `datasets` and torchvision, which the project does not install: a side folder for it only
    pip install --no-deps --target /tmp/peer-side datasets dill multiprocess pandas torchvision==0.28.0
    git clone --depth 1 -b v0.42.1 https://github.com/huggingface/diffusers /tmp/diffusers
    python benchmarks/peer_speed.py --script /tmp/diffusers/examples/text_to_image/train_text_to_image.py \\
        --side /tmp/peer-side [--steps 60] [--rounds 3] [--variants diffusers foundry foundry_cached]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import ROOT, dump

RESOLUTION, PRESET = 32, "tiny_latent"
SETTINGS = {"batch": 32, "lr": 1e-4, "weight_decay": 0.01, "max_grad_norm": 1.0, "workers": 1, "seed": 42}


def export_pipeline_folder(out: Path) -> Path:
    """The tiny_latent preset at 32 px as a StableDiffusionPipeline folder (both programs load it)."""
    from hydra import compose, initialize_config_dir

    from models.export import export_pipeline
    from train.build import build_module
    from train.ops.resolvers import register_resolvers

    if not (out / "model_index.json").exists():
        register_resolvers()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"model.preset={PRESET}", f"model.resolution={RESOLUTION}",
                                              "logger=none"])
        export_pipeline(build_module(cfg).components, out)
    return out


def imagefolder_from_shards(shards: str, out: Path) -> Path:
    """The shards' samples as a Hugging Face imagefolder (PNG files + metadata.jsonl with a `text` column)."""
    import glob

    if (out / "metadata.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shard in sorted(glob.glob(shards)):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                key = name.removesuffix(".png")
                (out / name).write_bytes(tar.extractfile(members[name]).read())
                rows.append({"file_name": name, "text": tar.extractfile(members[key + ".txt"]).read().decode()})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def encode_cache(shards: str, pipe: Path, out: Path) -> Path:
    if not (out / "cache.json").exists():
        subprocess.run([sys.executable, "-m", "train.ops.shards", "encode", shards, "--out", str(out),
                        "--model", str(pipe)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def peer_command(script: Path, pipe: Path, images: Path, out: Path, steps: int) -> list[str]:
    s = SETTINGS
    return [str(script), "--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(images),
            "--resolution", str(RESOLUTION), "--center_crop", "--train_batch_size", str(s["batch"]),
            "--max_train_steps", str(steps), "--learning_rate", str(s["lr"]), "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--adam_weight_decay", str(s["weight_decay"]),
            "--max_grad_norm", str(s["max_grad_norm"]), "--dataloader_num_workers", str(s["workers"]),
            "--mixed_precision", "no", "--report_to", "wandb", "--seed", str(s["seed"]), "--output_dir", str(out)]


def foundry_command(pipe: Path, urls: str, out: Path, steps: int, extra: list[str]) -> list[str]:
    s = SETTINGS
    return ["-m", "train.ops.main", "model=pretrained", f"model.pretrained={pipe}", f"model.resolution={RESOLUTION}",
            f"data.urls={urls}", f"data.batch_size={s['batch']}", f"data.num_workers={s['workers']}",
            "data.caption_dropout=0", f"optimizer.lr={s['lr']}", f"optimizer.weight_decay={s['weight_decay']}",
            f"trainer.gradient_clip_val={s['max_grad_norm']}", "lr_scheduler.name=constant",
            "lr_scheduler.warmup_steps=0", "loss.min_snr_gamma=null", f"trainer.max_steps={steps}",
            "~callbacks.ema", "~callbacks.sample_images", "callbacks.digits_eval.enabled=false",
            "checkpoint.every_n_steps=1000000", f"seed={s['seed']}", "logger=wandb", f"paths.output_dir={out}",
            "run_name=run", *extra]


def clocked(program: list[str], side: str | None, work: Path, name: str) -> dict:
    """Run `program` under step_clock; its samples/s from the end of step 1, and the whole wall-clock."""
    stamps = work / f"{name}.steps.json"
    side_args = ["--side", side] if side else []
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_clock.py"), "--out", str(stamps), *side_args, "--",
           *program]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}); see {work / f'{name}.log'}")
    t = json.loads(stamps.read_text())["step_end_seconds"]
    return {"samples_per_s": SETTINGS["batch"] * (len(t) - 1) / (t[-1] - t[0]), "steps": len(t),
            "wall_seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--script", required=True, help="diffusers' examples/text_to_image/train_text_to_image.py")
    ap.add_argument("--side", default=None, help="a folder with the peer's extra packages (datasets, torchvision)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["diffusers", "foundry", "foundry_cached"],
                    choices=["diffusers", "foundry", "foundry_cached"])
    ap.add_argument("--foundry-args", nargs="*", default=[], help="extra overrides for the foundry variants")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "peer_speed"))
    args = ap.parse_args()
    script = Path(args.script).resolve()
    if not script.is_file():
        raise SystemExit(f"--script {script}: not a file; pass diffusers' examples/text_to_image/"
                         "train_text_to_image.py from a checkout at the pinned release")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FOUNDRY_CACHE", str(work / "cache"))
    from data.digits import ensure_digits_shards

    shards = ensure_digits_shards(RESOLUTION)
    pipe = export_pipeline_folder(work / "pipeline")
    programs = {
        "diffusers": lambda r: peer_command(script, pipe, imagefolder_from_shards(shards, work / "images"),
                                            work / f"peer-{r}", args.steps),
        "foundry": lambda r: foundry_command(pipe, shards, work / f"foundry-{r}", args.steps, args.foundry_args),
        "foundry_cached": lambda r: foundry_command(pipe, str(encode_cache(shards, pipe, work / "latents")),
                                                    work / f"cached-{r}", args.steps, args.foundry_args),
    }
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in args.variants:
            runs[v].append(clocked(programs[v](r), args.side if v == "diffusers" else None, work, f"{v}-{r}"))
    rate = {v: [round(x["samples_per_s"], 1) for x in xs] for v, xs in runs.items()}
    med = {v: statistics.median(xs) for v, xs in rate.items()}
    result = {"benchmark": "peer_speed", "peer_script": str(script), "model": f"{PRESET} at {RESOLUTION} px",
              "settings": SETTINGS, "steps": args.steps, "rounds": args.rounds, "samples_per_s": rate,
              "wall_seconds": {v: [round(x["wall_seconds"], 1) for x in xs] for v, xs in runs.items()},
              "foundry_args": args.foundry_args}
    if "diffusers" in med:
        result["ratio_vs_diffusers"] = {v: round(m / med["diffusers"], 3) for v, m in med.items()}
        result["ratio_vs_diffusers_per_round"] = {
            v: [round(a / b, 3) for a, b in zip(rate[v], rate["diffusers"])] for v in med}
    dump(result, work / "result.json")


if __name__ == "__main__":
    main()
