"""The batch contract shared by every data source, method and callback.

A batch is a plain dict so that Lightning can move it between devices and so
that methods can add keys (DreamBooth prior images, DPO losers) without a new
class. Skip counts ride inside batches because DataLoader workers are separate
processes: the LightningModule sums ``batch["skipped"]`` and logs
``data/skipped`` and ``data/skipped/<reason>``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from data.transforms import BadSample
from models.tokens import row_keys, tokenize

log = logging.getLogger(__name__)

# Why a sample was dropped. Order is the order of the pipeline stages.
SKIP_REASONS: tuple[str, ...] = ("read", "decode", "no_image", "no_caption", "bad_caption", "too_small", "bad_label",
                                 "tie", "no_tensor", "bad_tensor", "bad_aspect")

BATCH_KEYS: tuple[str, ...] = ("pixels", "pixel_keys", "input_ids", "id_keys", "captions", "keys", "meta", "skipped")

# After this many bad samples in a row the data, not a sample, is broken: fail loudly instead of spinning.
MAX_CONSECUTIVE_SKIPS = 1000


def empty_skips() -> dict[str, int]:
    """A zeroed skip counter with every reason present, so sums never miss a key."""
    return {reason: 0 for reason in SKIP_REASONS}


def collate(
    samples: Sequence[Mapping[str, Any]],
    skipped: Mapping[str, int] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Stack decoded samples into the batch contract.

    Each sample holds ``pixels`` ([3,H,W] float in [-1,1]), ``caption`` (after
    dropout), ``key`` and ``meta``. Captions are tokenized per batch (one fast
    tokenizer call instead of B) when ``tokenizer`` is given; otherwise every
    sample must already carry ``input_ids``.
    """
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    captions = [str(s["caption"]) for s in samples]
    if tokenizer is not None:
        input_ids = tokenize(tokenizer, captions)
    elif all("input_ids" in s for s in samples):
        input_ids = torch.stack([torch.as_tensor(s["input_ids"], dtype=torch.int64) for s in samples])
    else:
        raise ValueError("collate: pass a tokenizer or give every sample 'input_ids'")
    counts = empty_skips()
    for reason, n in (skipped or {}).items():
        counts[reason] = counts.get(reason, 0) + int(n)
    batch = {
        "input_ids": input_ids,
        "id_keys": row_keys(input_ids),  # the text cache's keys, read here on the host (train/text_cache.py)
        "captions": captions,
        "keys": [str(s["key"]) for s in samples],
        "meta": [dict(s.get("meta") or {}) for s in samples],
        "skipped": counts,
    }
    if "time_ids" in samples[0]:  # aspect-ratio buckets: SDXL's (original h, w, crop top, left, target h, w)
        batch["time_ids"] = torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32)
    if "source" in samples[0]:  # a mixture: which dataset each sample came from (counted per dataset in training)
        batch["sources"] = [str(s["source"]) for s in samples]
    if "tensors" in samples[0]:  # cached latents (data/latent_cache.py): the model skips its encoders
        return {**_cached_tensors(samples), **batch}
    pixels = torch.stack([s["pixels"] for s in samples]).to(torch.float32)
    return {"pixels": pixels, "pixel_keys": pixel_keys(pixels), **batch}


def pixel_keys(pixels: torch.Tensor) -> list[bytes]:
    """One content key per image ([B, C, H, W], after the transforms): the latent cache's keys (train/row_cache.py),
    made here on the host so that the training step never reads pixels back from a device."""
    return [hashlib.blake2b(str(tuple(p.shape)).encode() + p.numpy().tobytes(), digest_size=16).digest()
            for p in pixels.detach().cpu()]


def _cached_tensors(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """`latent_mean`/`latent_std` (float32) and, when every sample has it, the cached text `context` with the mask of
    rows whose caption was dropped (`context_dropped`: the module puts the empty prompt's context there)."""
    if not all("tensors" in s for s in samples):
        raise ValueError("collate: a batch mixes cached-latent and image samples; keep them in separate shards")
    out = {key: torch.stack([s["tensors"][key] for s in samples]).to(torch.float32)
           for key in ("latent_mean", "latent_std")}
    if all("context" in s["tensors"] for s in samples):
        out["context"] = torch.stack([s["tensors"]["context"] for s in samples]).to(torch.float32)
        out["context_dropped"] = torch.tensor([bool(s["dropped"]) for s in samples])
    return out


def total_skipped(batch: Mapping[str, Any]) -> int:
    """Number of samples the producing worker dropped since its previous batch."""
    return int(sum((batch.get("skipped") or {}).values()))


class SkipCounter:
    """Counts skipped samples by reason, warns once per reason, and stops a stream that is all bad.

    One lives in each worker's copy of the stream; ``take()`` empties it into the next batch.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.counts = empty_skips()
        self.warned: set[str] = set()
        self.consecutive = 0

    def add(self, reason: str, exn: BaseException | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.consecutive += 1
        if reason not in self.warned:
            self.warned.add(reason)
            detail = f"{type(exn).__name__}: {exn}" if exn is not None else ""
            log.warning("data: skipping sample (%s) in %s: %s [warned once per reason]", reason, self.where, detail)
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(
                f"data: {self.consecutive} bad samples in a row in {self.where} ({self.counts}); "
                "the shards look unreadable: check data.urls and the shard files"
            )

    def ok(self) -> None:
        self.consecutive = 0

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, empty_skips()
        return counts

    def read_handler(self, exn: Exception) -> bool:
        """webdataset handler (exception -> keep going?) for tar/url errors."""
        self.add("read", exn)
        return True

    def sample_handler(self, exn: Exception) -> bool:
        """webdataset handler for per-sample decode errors; unexpected errors count as decode."""
        self.add(exn.reason if isinstance(exn, BadSample) else "decode", exn)
        return True
