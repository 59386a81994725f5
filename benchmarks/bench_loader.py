"""Data-loader throughput vs the raw decode-and-resize limit of the same files, in one run.

Writes JPEG shards of synthetic photos (smooth colour fields with texture, `--size` WxH), then measures images/s:
- `raw`: this process reads the tar members and runs the same decode (`load_image`) and resize/crop
  (`ImageTransform`) in a plain loop: the single-process limit;
- `loader_wN`: the training data module (shuffle buffer, collation, tokenized captions) with N workers;
- `*_draft`: the same with `data.jpeg_draft=true` (JPEG DCT-domain downscaling);
- `buckets_wN`: the loader with aspect-ratio buckets (`data.buckets.enabled=true`) vs `loader_wN`.
Images come in four shapes (the `--size` W x H, its transpose, a square of side W, and a 2:1 strip).
The acceptance ratio is loader images/s / raw images/s (goal >= 0.9 with enough workers).

    python benchmarks/bench_loader.py [--n 1000] [--size 512x384] [--resolution 128] [--workers 0 1 2]
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT  # noqa: F401  (puts the repo on sys.path)


def write_shards(out: Path, n: int, size: tuple[int, int], per_shard: int = 250) -> list[str]:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [size, size[::-1], (size[0], size[0]), (size[0], size[0] // 2)]
    grids = {s: np.mgrid[0:s[1], 0:s[0]].astype(np.float32) for s in shapes}
    paths = []
    for s in range(0, n, per_shard):
        path = out / f"photos-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(s, min(n, s + per_shard)):
                a, b, c = rng.uniform(0.002, 0.02, 3)
                w, h = shapes[i % len(shapes)]
                yy, xx = grids[(w, h)]
                img = np.stack([np.sin(xx * a + i) * 60 + 128, np.cos(yy * b) * 60 + 128,
                                np.sin((xx + yy) * c) * 60 + 128], -1) + rng.normal(0, 12, (h, w, 3))
                buf = io.BytesIO()
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": f"a photo number {i}".encode()})
        paths.append(str(path))
    return paths


def raw_rate(paths: list[str], resolution: int, draft: bool) -> float:
    from data.transforms import ImageTransform, load_image

    transform = ImageTransform(resolution)
    t0, count = time.perf_counter(), 0
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    transform(load_image(tar.extractfile(m).read(), resolution if draft else None))
                    count += 1
    return count / (time.perf_counter() - t0)


def loader_rate(paths: list[str], resolution: int, workers: int, draft: bool, tokenizer, buckets: bool = False,
                n: int = 0) -> float:
    from data.datamodule import ShardDataModule

    # buckets need the resampled stream: the same number of images as one pass
    stream = {"resampled": True, "steps_per_epoch": max(1, n // 32)} if buckets else \
        {"resampled": False, "steps_per_epoch": None}
    dm = ShardDataModule(urls=paths, resolution=resolution, batch_size=32, num_workers=workers, shuffle_buffer=100,
                         persistent_workers=False, jpeg_draft=draft,
                         buckets={"enabled": True, "step": 16} if buckets else None, **stream)
    dm.set_tokenizer(tokenizer)
    loader = dm.train_dataloader()
    t0, count = time.perf_counter(), 0
    for batch in loader:  # includes worker start-up, as a training epoch does
        count += len(batch["pixels"])
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", default="512x384")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    from models.tiny import build_tokenizer, default_caption_corpus

    tokenizer = build_tokenizer(default_caption_corpus(), 300, 12)
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.n, size)
        rates = {}
        for draft in (False, True):
            tag = "_draft" if draft else ""
            rates[f"raw{tag}"] = raw_rate(paths, args.resolution, draft)
            for w in args.workers:
                rates[f"loader_w{w}{tag}"] = loader_rate(paths, args.resolution, w, draft, tokenizer)
        for w in args.workers:
            rates[f"buckets_w{w}"] = loader_rate(paths, args.resolution, w, False, tokenizer, True, args.n)
    out = {"benchmark": "loader", "images": args.n, "size": args.size, "resolution": args.resolution,
           "images_per_s": {k: round(v, 1) for k, v in rates.items()},
           "ratio_vs_raw": {k: round(v / rates["raw_draft" if k.endswith("_draft") else "raw"], 3)
                            for k, v in rates.items() if k.startswith("loader")},
           "ratio_buckets_vs_square": {f"w{w}": round(rates[f"buckets_w{w}"] / rates[f"loader_w{w}"], 3)
                                       for w in args.workers},
           "draft_speedup_raw": round(rates["raw_draft"] / rates["raw"], 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
