"""Preference pairs (Pick-a-Pic layout): `txt`, `jpg_0`/`png_0`, `jpg_1`/`png_1`, `json` with `label_0`.

`label_0` is 1 when image 0 was preferred, 0 when image 1 was, 0.5 for a tie. A decoded pair puts the winner first;
both images get the *same* crop and flip (one augmentation draw replayed), so the pair differs only in what the
annotator judged. Ties are dropped (counted as `tie`) or kept as `tie=True` pairs that the DPO loss splits evenly
between both orders. A pair with a missing/unreadable image, a bad label or a non-text caption is skipped and
counted by reason, like any bad sample.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from data.batch import collate
from data.transforms import BadSample, ImageTransform, decode_caption, drop_caption, load_image

PAIR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TIES = ("drop", "split")


def _image(sample: dict[str, Any], index: int) -> bytes:
    for ext in PAIR_IMAGE_KEYS:
        if f"{ext}_{index}" in sample:
            return sample[f"{ext}_{index}"]
    raise BadSample("no_image", f"pair has no image {index} ({', '.join(f'{e}_{index}' for e in PAIR_IMAGE_KEYS)})")


def parse_label(meta: dict[str, Any]) -> float:
    value = meta.get("label_0")
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise BadSample("bad_label", f"label_0={value!r}") from None
    if label not in (0.0, 0.5, 1.0):
        raise BadSample("bad_label", f"label_0={value!r} is not 0, 0.5 or 1")
    return label


def decode_pair(sample: dict[str, Any], *, transform: ImageTransform, aug_rng: random.Random,
                drop_rng: random.Random, caption_dropout: float, ties: str) -> dict[str, Any]:
    """Raw members -> {"pixels": winner, "pixels_lose": loser, "tie", "caption", "key", "meta"}."""
    try:
        meta = json.loads(sample.get("json") or b"{}")
    except (ValueError, TypeError):
        raise BadSample("bad_label", "json member is not valid JSON") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_label", "json member is not an object")
    label = parse_label(meta)
    if label == 0.5 and ties == "drop":
        raise BadSample("tie")
    caption = decode_caption(sample.get("txt"))
    images = [load_image(_image(sample, i)) for i in (0, 1)]
    state = aug_rng.getstate()
    pixels = []
    for img in images:
        aug_rng.setstate(state)  # replay the same crop/flip draw for both images
        pixels.append(transform(img, aug_rng))
    winner, loser = (pixels[0], pixels[1]) if label >= 0.5 else (pixels[1], pixels[0])
    return {"pixels": winner, "pixels_lose": loser, "tie": label == 0.5,
            "caption": drop_caption(caption, caption_dropout, drop_rng),
            "key": f"{sample.get('__url__', '')}/{sample['__key__']}", "meta": meta}


def collate_pairs(samples: Sequence[dict[str, Any]], skipped: dict[str, int] | None = None,
                  tokenizer: Any = None) -> dict[str, Any]:
    """The batch contract plus `pixels_lose` [N,3,H,W] and `tie` [N] (winners are `pixels`)."""
    batch = collate(samples, skipped, tokenizer=tokenizer)
    batch["pixels_lose"] = torch.stack([s["pixels_lose"] for s in samples]).to(torch.float32)
    batch["tie"] = torch.tensor([bool(s["tie"]) for s in samples])
    return batch


# ----------------------------------------------------------------------------------------- foundry-shards pairs
COLUMNS = {"caption": ("caption", "text", "prompt"), "image_0": ("image_0", "jpg_0", "path_0"),
           "image_1": ("image_1", "jpg_1", "path_1"), "label_0": ("label_0", "preference")}


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL, CSV or Parquet file (Parquet needs pyarrow)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exn:
                    raise ValueError(f"foundry-shards pairs: {path}:{n} is not valid JSON ({exn.msg})") from None
        return rows
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("foundry-shards pairs: reading Parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"foundry-shards pairs: {path} is not .jsonl, .csv or .parquet")


def _column(row: dict[str, Any], name: str) -> Any:
    return next((row[c] for c in COLUMNS[name] if c in row and row[c] is not None), None)


def _pair_images(root: Path, row: dict[str, Any]) -> tuple[dict[str, bytes], str | None]:
    """Both images' bytes keyed png_i/jpg_i, or the reason the pair is skipped (no_image | decode)."""
    members: dict[str, bytes] = {}
    for i in (0, 1):
        rel = _column(row, f"image_{i}")
        path = root / str(rel) if rel else None
        if path is None or not path.is_file():
            return {}, "no_image"
        data = path.read_bytes()
        try:
            load_image(data)
        except BadSample:
            return {}, "decode"
        members[f"{'png' if path.suffix.lower() == '.png' else 'jpg'}_{i}"] = data
    return members, None


def write_pair_shards(table: str | Path, out: str | Path, maxcount: int = 1000) -> dict[str, Any]:
    """Pair shards from a table of (caption, image_0, image_1, label_0); image paths relative to the table."""
    import webdataset as wds

    table, out = Path(table).expanduser(), Path(out).expanduser()
    if not table.is_file():
        raise ValueError(f"foundry-shards pairs: no file at {table}; give a .jsonl/.csv/.parquet of pairs")
    rows = read_table(table)
    out.mkdir(parents=True, exist_ok=True)
    skipped = {"no_image": 0, "decode": 0, "bad_label": 0, "bad_caption": 0}
    written = 0
    with wds.ShardWriter(str(out / "pairs-%06d.tar"), maxcount=maxcount, verbose=0, encoder=False, mtime=0) as sink:
        for row in rows:
            caption = _column(row, "caption")
            if not isinstance(caption, str) or not caption.strip():
                skipped["bad_caption"] += 1
                continue
            try:
                label = parse_label({"label_0": _column(row, "label_0")})
            except BadSample:
                skipped["bad_label"] += 1
                continue
            members, reason = _pair_images(table.parent, row)
            if reason:
                skipped[reason] += 1
                continue
            meta = {**{k: v for k, v in row.items() if isinstance(v, (str, int, float))}, "label_0": label}
            sink.write({"__key__": f"{written:08d}", "txt": caption.encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8"), **members})
            written += 1
    if written == 0:
        raise ValueError(f"foundry-shards pairs: no usable pair in {table} (skipped {skipped})")
    return {"written": written, "skipped": skipped, "shards": sorted(str(p) for p in out.glob("pairs-*.tar"))}
