"""The built-in digits world: real handwritten digits with text captions.

scikit-learn ships 1,797 real 8x8 handwritten digits with no download, which
makes them the one text-to-image data set every machine here can train on and
score (a classifier on the real digits checks whether "a handwritten digit
seven" produced a seven). Shards are built once per resolution into a cache
directory and reused; the build is atomic so a crash or a race between two
processes never leaves a half-written cache behind.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from models.digits_vocab import CAPTION_TEMPLATES, DIGIT_WORDS  # noqa: F401 - the digits world's words


NUM_DIGITS = 1797  # len(sklearn.datasets.load_digits().target)
SHARD_PATTERN = "digits-%06d.tar"
SHARD_GLOB = "digits-*.tar"


def caption_for(label: int, template_idx: int = 0) -> str:
    """Caption for digit ``label`` using template ``template_idx``."""
    return CAPTION_TEMPLATES[template_idx % len(CAPTION_TEMPLATES)].format(word=DIGIT_WORDS[int(label)])


def eval_prompt(label: int) -> str:
    """The prompt the evaluator uses: always template 0, so scores compare across runs."""
    return caption_for(label, 0)


def digit_images(resolution: int = 16) -> tuple[list[Image.Image], np.ndarray]:
    """The scikit-learn digits as RGB PIL images at ``resolution`` (white on black)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    images = [
        Image.fromarray(p).resize((resolution, resolution), Image.Resampling.BICUBIC).convert("RGB")
        for p in pixels
    ]
    return images, np.asarray(digits.target, dtype=np.int64)


def parse_digits(text: str) -> list[int]:
    """'0-8' or '1,3,5' -> sorted digit list; one-line error otherwise."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"digits '{text}': expected a range like 0-8 or a list like 1,3,5") from None
    if not out or min(out) < 0 or max(out) > 9:
        raise ValueError(f"digits '{text}': digits are 0..9")
    return sorted(out)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _shards_in(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob(SHARD_GLOB))


def write_digits_shards(
    out_dir: str | os.PathLike,
    resolution: int = 16,
    maxcount: int = 256,
    seed: int = 0,
    overwrite: bool = True,
    digits: list[int] | None = None,
) -> list[str]:
    """Write the digits as WebDataset shards into ``out_dir``; return the shard paths.

    ``digits`` keeps only those labels (e.g. a base model that never saw a nine, for the DreamBooth demo).

    Shards are written into a sibling temp dir and renamed into place. With
    ``overwrite=False`` an existing complete ``out_dir`` wins (the race
    ``ensure_digits_shards`` relies on); with ``overwrite=True`` it is replaced.
    """
    import webdataset as wds

    if resolution <= 0 or maxcount <= 0:
        raise ValueError(f"write_digits_shards: resolution and maxcount must be positive ({resolution}, {maxcount})")
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(resolution)
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the cache should read like any other directory
    try:
        # mtime=0 makes shard bytes reproducible; encoder=False because we hand over bytes.
        with wds.ShardWriter(str(tmp / SHARD_PATTERN), maxcount=maxcount, verbose=0, encoder=False, mtime=0) as sink:
            for i, (img, label) in enumerate(zip(images, labels, strict=True)):
                template = rng.randrange(len(CAPTION_TEMPLATES))
                if digits is not None and int(label) not in digits:
                    continue
                meta = {"label": int(label), "index": i, "template": template}
                sink.write(
                    {
                        "__key__": f"{i:06d}",
                        "png": _png_bytes(img),
                        "txt": caption_for(int(label), template).encode("utf-8"),
                        "json": json.dumps(meta).encode("utf-8"),
                    }
                )
        return _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path, overwrite: bool) -> list[str]:
    """Move a finished temp dir into place atomically (rename within one filesystem)."""
    if overwrite and out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, out)  # succeeds onto a missing or empty dir; fails onto a full one
    except OSError:
        existing = _shards_in(out)
        if not existing:
            raise
        return existing  # another process won the race; its shards are identical
    return _shards_in(out)


def default_digits_dir(resolution: int = 16) -> Path:
    """Where the digits shards live: ``$FOUNDRY_CACHE`` or ``~/.cache/diffusion-foundry``."""
    root = os.environ.get("FOUNDRY_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "diffusion-foundry"
    return base / f"digits-{int(resolution)}"


def ensure_digits_shards(resolution: int = 16) -> str:
    """A glob over the cached digits shards, building them on first use."""
    out = default_digits_dir(resolution)
    if not _shards_in(out):
        write_digits_shards(out, resolution=resolution, overwrite=False)
    return str(out / SHARD_GLOB)
