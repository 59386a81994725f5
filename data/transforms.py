"""Image and caption decoding with stated conversion rules.

Web-scale shards contain every kind of image PIL can open (CMYK JPEGs, 16-bit
PNGs, palette images with transparency, EXIF-rotated phone photos). Rather
than letting each one crash a worker or silently skew colours, every input is
mapped to 8-bit RGB by the rules below, and anything that cannot be mapped
raises :class:`BadSample` with a reason the stream counts.

Rules for :func:`load_image`:
- zero-byte or undecodable data -> ``BadSample("decode")``
- EXIF orientation is applied (``ImageOps.exif_transpose``)
- alpha (RGBA, LA, PA, or P/L/RGB with a ``transparency`` entry) is
  composited on white, so transparent logos do not turn black
- 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) are rescaled to 8-bit
  by dividing by 257 (65535 -> 255); float (``F``) is clipped to 0..255
- every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, ...) -> ``convert("RGB")``
"""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["BadSample", "ImageTransform", "decode_caption", "drop_caption", "load_image"]


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``data.batch.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """Apply the conversion rules in the module docstring."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def load_image(data: bytes, draft: int | None = None) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image, or raise ``BadSample("decode")``.

    `draft`: for JPEGs, let the decoder scale by 1/2, 1/4 or 1/8 in the DCT while both sides stay >= `draft`
    (PIL's and PIL-SIMD's `Image.draft`): much less decode work for large photos trained at a small size."""
    if not data:
        raise BadSample("decode", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF / palette images; the rules handle them
            img = Image.open(io.BytesIO(data))
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
    except Exception as exn:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("decode", f"{type(exn).__name__}: {exn}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost us an otherwise good image
        pass
    try:
        return _to_rgb(img)
    except Exception as exn:
        raise BadSample("decode", f"mode {img.mode}: {exn}") from None


class ImageTransform:
    """Resize (shorter side), crop, optionally flip, and scale to [-1, 1].

    The random parts draw from an explicit ``random.Random`` so that a stream
    seeded by (seed, epoch, rank, worker) augments identically on every run.
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        min_size: int = 0,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"ImageTransform: resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.min_size = int(min_size)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.fit(img, self.resolution, self.resolution, rng)[0]

    def fit(self, img: Image.Image, width: int, height: int, rng: random.Random | None = None,
            max_upscale: float | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize to cover `width` x `height` (aspect kept), crop to it, maybe flip: ([3,H,W] in [-1, 1], the crop's
        (top, left) in the resized image, as SDXL's crop conditioning counts it). With `max_upscale`, an image that
        would need more enlargement than that is refused (`too_small`)."""
        rng = rng or random.Random(0)
        w, h = img.size
        if min(w, h) < max(self.min_size, 1):
            raise BadSample("too_small", f"{w}x{h} < min_size {self.min_size}")
        scale = max(width / w, height / h)
        if max_upscale is not None and scale > max_upscale:
            raise BadSample("too_small", f"{w}x{h} needs x{scale:.2f} to cover {width}x{height} "
                                         f"(data.buckets.max_upscale={max_upscale})")
        new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if self.center_crop:
            left, top = (new_w - width) // 2, (new_h - height) // 2
        else:
            left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
        img = img.crop((left, top, left + width, top + height))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32).reshape(height, width, 3)
        return torch.from_numpy(arr.transpose(2, 0, 1) / 127.5 - 1.0).contiguous(), (top, left)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, min_size={self.min_size})"
        )


def decode_caption(value: bytes | str | None, allow_missing: bool = False) -> str:
    """Caption text from a ``txt`` member: UTF-8 (BOM tolerated), stripped.

    A missing caption is an error by default because training a text-to-image
    model on silently empty captions looks like success; pass
    ``allow_missing=True`` for unconditional data.
    """
    if value is None:
        if allow_missing:
            return ""
        raise BadSample("no_caption")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8-sig")
        except UnicodeDecodeError as exn:
            raise BadSample("bad_caption", str(exn)) from None
    if not isinstance(value, str):
        raise BadSample("bad_caption", f"caption of type {type(value).__name__}")
    if "\x00" in value:
        raise BadSample("bad_caption", "NUL byte in caption")
    return value.strip()


def drop_caption(caption: str, p: float, rng: random.Random) -> str:
    """Replace the caption by "" with probability ``p`` (classifier-free guidance training)."""
    if p > 0 and rng.random() < p:
        return ""
    return caption
