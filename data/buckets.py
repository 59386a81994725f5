"""Aspect-ratio buckets (SDXL / kohya style) on streams.

`data.buckets.enabled=true` trains on images at their own shape instead of a square crop:

- **Buckets**: every (width, height) in multiples of `step` whose area is at most resolution², that fills the area
  as far as the step allows, with aspect ratio within `max_aspect` (both orientations).
- **Assignment**: an image goes to the bucket nearest its aspect ratio (in log ratio), so it loses the least to the
  crop; it is resized to cover the bucket and cropped (center or random), and flipped as configured.
- **Rules for bad input** (each counted by reason): an image whose aspect ratio is beyond `max_aspect` by more than
  `aspect_tolerance` is skipped as `bad_aspect`; an image that would need enlarging by more than `max_upscale`
  (default 1.0: never upscale) to cover its bucket is skipped as `too_small`.
- **Batches**: a bucketing buffer (one pending list per bucket) emits a batch as soon as one bucket holds
  `batch_size` images, so every batch has one shape and the stream needs no index. With `data.resampled=true`
  each rank's epoch is cut to exactly `steps_per_epoch` batches whatever the shards or buckets, so no rank waits at
  epoch end. At most `buckets x (batch_size - 1)` images wait in the buffer.
- **SDXL micro-conditioning**: each sample's original size, crop top-left and bucket size travel as `time_ids`
  (SDXL's order: original h, w, crop top, left, target h, w); an SDXL UNet (models/sdxl.py) uses them in training.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from data.transforms import BadSample


@dataclass(frozen=True)
class BucketSpec:
    resolution: int
    step: int = 64
    max_aspect: float = 4.0
    aspect_tolerance: float = 0.25   # images up to max_aspect x (1 + tolerance) go to the extreme bucket
    max_upscale: float = 1.0

    def __post_init__(self) -> None:
        if self.step <= 0 or self.resolution < self.step:
            raise ValueError(f"data.buckets.step={self.step}: give a positive step <= the resolution "
                             f"({self.resolution})")
        if self.max_aspect < 1:
            raise ValueError(f"data.buckets.max_aspect={self.max_aspect}: give a ratio >= 1 (e.g. 2.0 or 4.0)")
        if self.max_upscale < 1:
            raise ValueError(f"data.buckets.max_upscale={self.max_upscale}: give a factor >= 1 (1.0: never upscale)")


def make_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sorted by aspect ratio (narrow to wide)."""
    area, step = spec.resolution ** 2, spec.step
    buckets = set()
    w = step
    while w <= area // step:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= spec.max_aspect + 1e-9:
            buckets.add((w, h))
        w += step
    # the square bucket is always there when the step divides the resolution
    return sorted(buckets, key=lambda b: b[0] / b[1])


class BucketAssigner:
    def __init__(self, spec: BucketSpec) -> None:
        self.spec = spec
        self.buckets = make_buckets(spec)
        if not self.buckets:
            raise ValueError(f"data.buckets: no bucket fits resolution {spec.resolution} with step {spec.step} "
                             f"and max_aspect {spec.max_aspect}")
        self._logs = [math.log(w / h) for w, h in self.buckets]
        self._limit = math.log(spec.max_aspect * (1 + spec.aspect_tolerance))

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        """The bucket for an image of this size; BadSample('bad_aspect') beyond the stated limit."""
        a = math.log(width / height)
        if abs(a) > self._limit + 1e-9:
            raise BadSample("bad_aspect", f"{width}x{height} (ratio {max(width / height, height / width):.2f}) is "
                                          f"beyond data.buckets.max_aspect={self.spec.max_aspect} "
                                          f"(+{self.spec.aspect_tolerance:.0%})")
        i = min(range(len(self._logs)), key=lambda k: abs(self._logs[k] - a))
        return self.buckets[i]


def bucket_batches(batch_size: int, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]):
    """A webdataset stage: samples carrying `bucket` -> collated batches, each from one bucket."""
    def stage(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for sample in samples:
            group = pending.setdefault(sample["bucket"], [])
            group.append(sample)
            if len(group) == batch_size:
                del pending[sample["bucket"]]
                yield collate(group)
    return stage
