"""Shard writers (the ``foundry-shards`` console script is train/ops/shards.py).

Training always reads WebDataset shards, so every source (the built-in digits,
a DreamBooth/kohya folder, a diffusers ImageFolder) is converted once by a
writer here. Image bytes are stored as they are (no re-encode, no quality
loss); each image is decoded once while writing so that unreadable files are
reported now, by the writer, rather than later as skip counts in training.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.transforms import BadSample, load_image

# Suffix -> member key in the shard (".jpeg" is stored as "jpg", like img2dataset does).
IMAGE_EXTS: dict[str, str] = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
CAPTION_COLUMNS: tuple[str, ...] = ("text", "caption")

NO_IMAGES_HINT = (
    "point it at a folder of images with .txt captions or a metadata.jsonl/metadata.csv with file_name,text columns"
)


@dataclass
class Record:
    """One image to write: where it is, its caption (None = missing) and extra metadata."""

    path: Path
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class WriteSummary:
    """What a writer did; printed as one line by the CLI."""

    shards: list[str] = field(default_factory=list)
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    missing_captions: list[str] = field(default_factory=list)

    def line(self, command: str, out: Path) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()) if v) or "none"
        where = _shard_span(self.shards) if self.shards else str(out)
        text = f"foundry-shards {command}: wrote {self.written} samples in {len(self.shards)} shard(s) {where}"
        text += f"; skipped {skipped} ({reasons})"
        if self.missing_captions:
            text += f"; {len(self.missing_captions)} image(s) had no caption and got \"\""
        return text


def count_samples(shards: list[str]) -> int:
    import tarfile

    keys = set()
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys.update((shard, m.name.split(".", 1)[0]) for m in tar.getmembers())
    return len(keys)


def _shard_span(shards: list[str]) -> str:
    return shards[0] if len(shards) == 1 else f"{shards[0]} .. {Path(shards[-1]).name}"


def _caption_from_row(row: dict[str, Any]) -> str | None:
    for column in CAPTION_COLUMNS:
        value = row.get(column)
        if value is not None and str(value).strip():
            return str(value)
    return None


def _metadata_records(meta_path: Path) -> list[Record]:
    """Records from a diffusers ImageFolder ``metadata.jsonl`` / ``metadata.csv``."""
    rows: list[dict[str, Any]] = []
    where = f"foundry-shards folder: {meta_path}"
    if meta_path.suffix == ".jsonl":
        for lineno, line in enumerate(meta_path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exn:
                raise ValueError(f"{where}:{lineno} is not valid JSON ({exn.msg}); fix or delete that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}:{lineno} is not a JSON object; each line needs file_name and text")
            rows.append(row)
    else:
        with meta_path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        if not row.get("file_name"):
            raise ValueError(f"{where} row {i + 1} has no file_name; each row needs file_name and text columns")
    root = meta_path.parent
    return [
        Record(
            path=root / str(row["file_name"]),
            caption=_caption_from_row(row),
            meta={k: v for k, v in row.items() if k not in CAPTION_COLUMNS},
        )
        for row in rows
    ]


def _folder_records(folder: Path, exclude: Path | None = None) -> list[Record]:
    """Records from images with same-named ``.txt`` captions (kohya / DreamBooth layout)."""
    records = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_EXTS:
            continue
        if exclude is not None and exclude in path.parents:
            continue
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8-sig", errors="replace") if txt.is_file() else None
        records.append(Record(path=path, caption=caption, meta={"file_name": str(rel)}))
    return records


def find_records(folder: str | os.PathLike, exclude: Path | None = None) -> list[Record]:
    """Every image in ``folder`` with its caption, from metadata files if present."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"foundry-shards folder: {root} is not a directory; {NO_IMAGES_HINT}")
    for name in ("metadata.jsonl", "metadata.csv"):
        if (root / name).is_file():
            records = _metadata_records(root / name)
            break
    else:
        records = _folder_records(root, exclude)
    if not records:
        raise ValueError(f"foundry-shards folder: {root} has no images (jpg/png/webp/bmp); {NO_IMAGES_HINT}")
    return records


def write_folder_shards(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    maxcount: int = 1000,
    prefix: str = "shard",
    overwrite: bool = False,
    caption: str | None = None,
) -> WriteSummary:
    """Convert an image folder into ``{prefix}-000000.tar``... in ``out_dir``.

    Shards are written to a temp dir first and moved in only when complete, so
    an interrupted run leaves no partial shard for a training glob to pick up.
    ``caption`` gives every image the same caption (DreamBooth instance/class images).
    """
    import webdataset as wds

    if maxcount <= 0:
        raise ValueError(f"foundry-shards folder: --maxcount must be positive, got {maxcount}")
    if not prefix or any(c in prefix for c in "/.{}*?"):
        raise ValueError(f"foundry-shards folder: --prefix {prefix!r} may not contain / . {{ }} * ?; use e.g. 'shard'")
    out = Path(out_dir).expanduser().resolve()
    records = find_records(folder, exclude=out)
    if caption is not None:
        records = [Record(r.path, caption, r.meta) for r in records]
    existing = sorted(out.glob(f"{prefix}-*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise ValueError(
            f"foundry-shards folder: {out} already has {len(existing)} {prefix}-*.tar shard(s); "
            "pass --overwrite, another --prefix, or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    summary = WriteSummary(skipped={"read": 0, "decode": 0})
    tmp = Path(tempfile.mkdtemp(prefix=".foundry-shards-", dir=out))
    try:
        written_tmp: list[str] = []
        with wds.ShardWriter(
            str(tmp / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0, encoder=False, mtime=0,
            post=written_tmp.append,
        ) as sink:
            for record in records:
                sample = _encode_record(record, summary)
                if sample is not None:
                    sample["__key__"] = f"{summary.written:08d}"
                    sink.write(sample)
                    summary.written += 1
        if summary.written == 0:
            raise ValueError(
                f"foundry-shards folder: no readable image in {folder} "
                f"(skipped {summary.skipped}); check the files open in an image viewer"
            )
        for old in existing:
            old.unlink()
        for shard in written_tmp:
            dest = out / Path(shard).name
            os.replace(shard, dest)
            summary.shards.append(str(dest))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _encode_record(record: Record, summary: WriteSummary) -> dict[str, Any] | None:
    """The shard members for one record, or None (counted) if the image is unusable."""
    try:
        data = record.path.read_bytes()
    except OSError:
        summary.skipped["read"] += 1
        return None
    try:
        load_image(data)
    except BadSample:
        summary.skipped["decode"] += 1
        return None
    if record.caption is None:
        summary.missing_captions.append(str(record.path))
    ext_key = IMAGE_EXTS.get(record.path.suffix.lower(), "jpg")
    meta = dict(record.meta)
    meta.setdefault("file_name", record.path.name)
    return {
        ext_key: data,
        "txt": (record.caption or "").strip().encode("utf-8"),
        "json": json.dumps(meta, default=str).encode("utf-8"),
    }
