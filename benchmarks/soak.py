"""Soak: train through the real CLI for N minutes while killing it at random (SIGKILL) and feeding 1% corrupt
samples; every relaunch resumes from last.ckpt. Prints JSON: kills, steps lost per kill (must stay within the
checkpoint interval), whether redone steps saw exactly the samples the killed run saw, skipped-sample counts.

    python benchmarks/soak.py --minutes 30 [--every 25] [--preset tiny_pixel] [--out /tmp/soak]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def corrupt_copy(src_glob: str, out: Path, rate: float, seed: int = 0) -> int:
    """Copy the digits shards, replacing `rate` of the PNGs with garbage bytes; returns how many."""
    rng, bad = random.Random(seed), 0
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(p) for p in __import__("glob").glob(src_glob)):
        with tarfile.open(src) as tin, tarfile.open(out / src.name, "w") as tout:
            for member in tin.getmembers():
                data = tin.extractfile(member).read()
                if member.name.endswith(".png") and rng.random() < rate:
                    data, bad = b"\x89PNG\r\n\x1a\n" + bytes(rng.getrandbits(8) for _ in range(40)), bad + 1
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))
    return bad


def read_keys(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when the process was killed
            pass
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=int, default=25, help="checkpoint.every_n_steps")
    ap.add_argument("--preset", default="tiny_pixel")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--corrupt", type=float, default=0.01)
    ap.add_argument("--kill-after", type=float, nargs=2, default=(30.0, 90.0), help="seconds, uniform")
    ap.add_argument("--out", default="/tmp/foundry-soak")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from data.digits import ensure_digits_shards

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    n_bad = corrupt_copy(ensure_digits_shards(16), out / "shards", args.corrupt, args.seed)
    keys = out / "keys.jsonl"
    cmd = [sys.executable, "-m", "train.ops.main", f"paths.output_dir={out}", "run_name=soak", f"model.preset={args.preset}",
           f"data.urls={out / 'shards'}", f"data.batch_size={args.batch}", "trainer.max_steps=1000000",
           f"checkpoint.every_n_steps={args.every}", "callbacks=none", "logger=csv", "trainer.enable_progress_bar=false",
           "+callbacks.ema._target_=callbacks.ema.EMA", "+callbacks.keys._target_=tests.helpers.RecordKeys",
           f"+callbacks.keys.path={keys}", "data.steps_per_epoch=200"]
    rng = random.Random(args.seed)
    deadline = time.time() + args.minutes * 60
    kills: list[dict] = []
    ckpt = out / "soak" / "checkpoints" / "last.ckpt"
    import torch

    while time.time() < deadline:
        start_step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] if ckpt.exists() else 0
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait = min(rng.uniform(*args.kill_after), max(1.0, deadline - time.time()))
        time.sleep(wait)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen = read_keys(keys)
        reached = max((r["step"] for r in seen), default=0)
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] if ckpt.exists() else 0
        kills.append({"after_s": round(wait, 1), "resumed_from": start_step, "reached": reached,
                      "checkpointed": saved, "lost": reached - saved})
    rows = read_keys(keys)
    by_step: dict[int, list] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["keys"])
    redone = {s: v for s, v in by_step.items() if len(v) > 1}
    identical = all(all(k == v[0] for k in v[1:]) for v in redone.values())
    metrics = out / "soak" / "csv" / "metrics.csv"
    skipped = 0.0
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        header = lines[0].split(",")
        if "data/skipped" in header:
            col = header.index("data/skipped")
            vals = [float(x.split(",")[col]) for x in lines[1:] if x.split(",")[col]]
            skipped = max(vals, default=0.0)
    lost = [k["lost"] for k in kills]
    print(json.dumps({
        "benchmark": "soak", "minutes": args.minutes, "preset": args.preset, "batch": args.batch,
        "checkpoint_every": args.every, "corrupt_pngs_written": n_bad, "kills": len(kills),
        "final_checkpoint_step": kills[-1]["checkpointed"] if kills else 0,
        "max_steps_lost_per_kill": max(lost, default=0), "all_losses_within_interval": all(x <= args.every for x in lost),
        "redone_steps": len(redone), "redone_steps_saw_identical_samples": identical,
        "skipped_samples_total": skipped, "detail": kills,
    }, indent=2))


if __name__ == "__main__":
    main()
