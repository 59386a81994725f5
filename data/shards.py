"""Shard writers and the ``foundry-shards`` console script.

Training always reads WebDataset shards, so every source (the built-in digits,
a DreamBooth/kohya folder, a diffusers ImageFolder) is converted once by a
writer here. Image bytes are stored as they are (no re-encode, no quality
loss); each image is decoded once while writing so that unreadable files are
reported now, by the writer, rather than later as skip counts in training.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry-shards", description="Write WebDataset shards for training.")
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="the built-in scikit-learn digits with captions")
    digits.add_argument("--out", default=None, help="output dir (default: the digits cache, see FOUNDRY_CACHE)")
    digits.add_argument("--resolution", type=int, default=16, help="image size, 16 (default) or 32")
    digits.add_argument("--maxcount", type=int, default=256, help="samples per shard")
    digits.add_argument("--digits", default=None, help="only these digits, e.g. 0-8 or 1,3,5 (default: all ten)")
    pairs = sub.add_parser("pairs", help="preference pairs from a .jsonl/.csv/.parquet table "
                           "(caption, image_0, image_1, label_0: 1 = image 0 preferred, 0 = image 1, 0.5 = tie)")
    pairs.add_argument("table", help="the table; image paths are relative to its folder")
    pairs.add_argument("--out", required=True, help="output dir for the pair shards")
    pairs.add_argument("--maxcount", type=int, default=1000, help="pairs per shard")
    coup = sub.add_parser("couplings", help="(noise, teacher output, caption) from a teacher's ODE, for reflow/DMD")
    coup.add_argument("--teacher", required=True, help="a run directory, .ckpt or diffusers folder")
    coup.add_argument("--out", required=True)
    coup.add_argument("--n", type=int, default=2048, help="how many couplings in all (every rank's share together)")
    coup.add_argument("--prompts", default="digits", help="'digits' or a text file with one prompt per line")
    coup.add_argument("--steps", type=int, default=25)
    coup.add_argument("--guidance", type=float, default=3.0)
    coup.add_argument("--maxcount", type=int, default=256)
    coup.add_argument("--seed", type=int, default=0)
    coup.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    coup.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    enc = sub.add_parser("encode", help="cache VAE latents and text embeddings of image shards (training then "
                         "skips the encoders); resumable, shards shared between processes")
    enc.add_argument("urls", nargs="+", help="image shards: files, a directory, a glob or a brace pattern")
    enc.add_argument("--out", required=True, help="output dir for the cached shards (and cache.json)")
    enc.add_argument("--model", required=True, help="the model whose VAE/text encoder to use: a diffusers folder, "
                     "a run directory or a .ckpt (the run must use the same model)")
    enc.add_argument("--dtype", default="fp16", help="storage dtype: fp16 (default), bf16 or fp32")
    enc.add_argument("--vae-dtype", default="fp32", help="VAE compute dtype: fp32 (default) or bf16; never fp16")
    enc.add_argument("--no-text", action="store_true", help="cache latents only (the text encoder runs in training)")
    enc.add_argument("--batch-size", type=int, default=64)
    enc.add_argument("--procs", type=int, default=1, help="processes on this machine, each taking a share of shards")
    enc.add_argument("--part", default="0/1", help="K/N: this machine's share when several machines encode")
    enc.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    folder = sub.add_parser("folder", help="a folder of images with .txt captions, or metadata.jsonl/csv")
    folder.add_argument("path", help="the image folder")
    folder.add_argument("--out", required=True, help="output dir for the shards")
    folder.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    folder.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar")
    folder.add_argument("--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``foundry-shards``; bad input exits with one line naming the fix."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "digits":
            from data.digits import NUM_DIGITS, default_digits_dir, write_digits_shards

            if args.resolution < 8 or args.maxcount <= 0:
                raise ValueError("foundry-shards digits: --resolution must be >= 8 and --maxcount positive")
            from data.digits import parse_digits

            subset = parse_digits(args.digits) if args.digits else None
            if subset is not None and not args.out:
                raise ValueError("foundry-shards digits: --digits needs --out (the default cache holds all ten)")
            out = Path(args.out).expanduser() if args.out else default_digits_dir(args.resolution)
            shards = write_digits_shards(out, resolution=args.resolution, maxcount=args.maxcount, digits=subset)
            summary = WriteSummary(shards=shards, written=count_samples(shards) if subset else NUM_DIGITS, skipped={})
            print(summary.line("digits", out))
        elif args.command == "couplings":
            from data.couplings import write_couplings

            if not 0 <= args.rank < args.world:
                raise ValueError(f"foundry-shards couplings: --rank {args.rank} is not in 0..{args.world - 1}")
            res = write_couplings(args.teacher, args.out, args.n, args.prompts, args.steps, args.guidance,
                                  args.maxcount, args.seed, args.rank, args.world)
            print(f"foundry-shards couplings: rank {args.rank}/{args.world} wrote {len(res['written'])} shard(s), "
                  f"{len(res['already_present'])} already present (resumed) in {args.out}")
        elif args.command == "encode":
            from data.latent_cache import encode_parallel
            from data.webdataset import expand_urls

            try:
                k, n = (int(v) for v in args.part.split("/"))
            except ValueError:
                raise ValueError(f"foundry-shards encode: --part '{args.part}' is not K/N (e.g. 0/4)") from None
            urls = expand_urls(args.urls)
            parts = [(k * args.procs + j, n * args.procs) for j in range(args.procs)]
            res = encode_parallel(urls, args.out, args.model, args.procs, parts=parts, dtype=args.dtype,
                                  text=not args.no_text, batch_size=args.batch_size, device=args.device,
                                  vae_dtype=args.vae_dtype)
            reasons = ", ".join(f"{r}={c}" for r, c in sorted(res["skipped"].items()) if c) or "none"
            print(f"foundry-shards encode: wrote {len(res['written'])} shard(s) ({res['samples']} samples), "
                  f"{len(res['already_present'])} already present (resumed), skipped {sum(res['skipped'].values())} "
                  f"({reasons}) in {res['seconds']} s -> {res['out']}")
        elif args.command == "pairs":
            from data.preference import write_pair_shards

            result = write_pair_shards(args.table, args.out, args.maxcount)
            reasons = ", ".join(f"{k}={v}" for k, v in result["skipped"].items() if v) or "none"
            print(f"foundry-shards pairs: wrote {result['written']} pairs in {len(result['shards'])} shard(s) "
                  f"in {args.out}; skipped {sum(result['skipped'].values())} ({reasons})")
        else:
            summary = write_folder_shards(args.path, args.out, args.maxcount, args.prefix, args.overwrite)
            for path in summary.missing_captions[:3]:
                print(f"foundry-shards folder: warning: no caption for {path}", file=sys.stderr)
            print(summary.line("folder", Path(args.out)))
    except (ValueError, FileNotFoundError) as exn:
        raise SystemExit(str(exn)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
