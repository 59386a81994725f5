"""Streaming batches from WebDataset shards, reproducibly and without crashing.

Three properties matter more than speed here:
- *Equal length under DDP.* With ``resampled=True`` shards are drawn with
  replacement and ``with_epoch`` cuts every rank to exactly
  ``steps_per_epoch`` batches, so no rank waits forever in a collective.
- *Reproducible streams.* Every random choice (shard draws, shuffle buffer,
  crops, flips, caption dropout) comes from an RNG seeded by
  (seed, epoch, rank, worker); webdataset's default seeds mix in the pid and
  the clock, so they are never used.
- *Bad data never kills a run.* Tar read errors, undecodable images and bad
  captions are counted by reason (``data.batch.SKIP_REASONS``), warned about
  once per reason per worker, and shipped to the trainer inside the batches.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch import SkipCounter, collate
from data.buckets import BucketAssigner, BucketSpec, bucket_batches
from data.couplings import collate_couplings, decode_coupling
from data.latent_cache import MEMBER as LATENT_MEMBER
from data.latent_cache import decode_cached
from data.preference import TIES, collate_pairs, decode_pair
from data.shard_io import BUILD_HINT, cache_remote_shards, expand_urls, local_shard_path, tar_samples  # noqa: F401
from data.transforms import BadSample, ImageTransform, decode_caption, drop_caption, load_image

log = logging.getLogger(__name__)

IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else torch.distributed, else env RANK/WORLD_SIZE."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from parts (str seeding hashes with sha512, unlike ``hash()``)."""
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def batches_for_worker(steps: int, worker: int, num_workers: int) -> int:
    """This worker's share of ``steps``; the first ``steps % num_workers`` workers take one more."""
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


def _parse_meta(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        meta = json.loads(value)
    except (ValueError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class MixSource:
    """One dataset of a mixture (`data.mixture`): its shards, its share of samples, caption template and dropout."""

    name: str
    urls: tuple[str, ...]
    weight: float
    caption_template: str | None = None  # e.g. "{caption}, in the style of sks"
    caption_dropout: float | None = None  # None: data.caption_dropout


@dataclass(frozen=True)
class StreamSpec:
    """What a stream reads and how: every data setting a stream uses, declared (with its default and its check)
    here and nowhere else; conf/data/*.yaml says which ones users set. The urls, the tokenizer and the rank placement
    come beside it."""

    resolution: int = 16
    batch_size: int = 64
    caption_dropout: float = 0.1
    center_crop: bool = True
    random_flip: bool = False
    shuffle_buffer: int = 1000
    resampled: bool = True
    steps_per_epoch: int | None = None
    seed: int = 0
    image_keys: tuple[str, ...] = IMAGE_KEYS
    caption_key: str = "txt"
    min_size: int = 0
    allow_missing_caption: bool = False
    kind: str = "image"        # image | pair: preference pairs (data/preference.py) | coupling (data/couplings.py)
    ties: str = "drop"         # pairs only: drop | split
    cache: dict[str, Any] | None = None  # cached-latent shards: the shapes/dtype every sample must have
    jpeg_draft: bool = False   # decode JPEGs at the smallest DCT scale that still covers the resolution
    mixture: tuple[MixSource, ...] | None = None  # several datasets by weight (then `urls` is unused)
    buckets: BucketSpec | None = None  # aspect-ratio buckets (data/buckets.py); None: square crops
    shard_cache_dir: str | None = None  # local copies of remote (pipe:, s3://, http) shards

    def __post_init__(self) -> None:
        coerce = {"resolution": int, "batch_size": int, "caption_dropout": float, "shuffle_buffer": int, "seed": int,
                  "min_size": int, "image_keys": tuple, "center_crop": bool, "random_flip": bool, "resampled": bool,
                  "jpeg_draft": bool, "allow_missing_caption": bool, "kind": str, "ties": str}
        for name, kind in coerce.items():
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.steps_per_epoch is not None:
            object.__setattr__(self, "steps_per_epoch", int(self.steps_per_epoch))
        if self.mixture:
            object.__setattr__(self, "mixture", tuple(self.mixture))
        if self.shard_cache_dir is not None:
            object.__setattr__(self, "shard_cache_dir", str(self.shard_cache_dir))
        self.check()

    def check(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"build_stream: batch_size must be positive, got {self.batch_size}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"build_stream: caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.resampled and self.steps_per_epoch is None:
            raise ValueError("build_stream: resampled=True is an endless stream; set steps_per_epoch")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ValueError(f"build_stream: steps_per_epoch must be positive, got {self.steps_per_epoch}")
        if self.kind not in ("image", "pair", "coupling"):
            raise ValueError(f"data.kind: '{self.kind}' is not one of image, pair, coupling")
        if self.ties not in TIES:
            raise ValueError(f"data.ties: '{self.ties}' is not one of {', '.join(TIES)}")
        if self.buckets is not None and (self.kind != "image" or not self.resampled):
            raise ValueError("data.buckets: needs data.kind=image and data.resampled=true (every rank then gets "
                             "exactly steps_per_epoch batches, whatever the buckets)")
        if self.mixture and not self.resampled:
            raise ValueError("data.mixture needs data.resampled=true: each dataset is drawn by weight from an "
                             "endless stream; set steps_per_epoch for the epoch length")


class ShardStream(IterableDataset):
    """Yields collated batches; batching happens here, so the DataLoader uses ``batch_size=None``.

    The webdataset pipeline is rebuilt on every ``__iter__`` with seeds from
    (seed, epoch, rank, worker). The epoch advances by one per ``__iter__`` in
    whichever process copy runs it, and :class:`StreamLoader` advances the main
    copy when workers are re-created each epoch, so epoch e is the same stream
    with persistent workers, fresh workers or no workers.
    """

    def __init__(self, urls: list[str], spec: StreamSpec, tokenizer: Any, rank: int, world_size: int,
                 epoch: int = 0) -> None:
        super().__init__()
        self.urls, self.spec, self.tokenizer = list(urls), spec, tokenizer
        self.rank, self.world_size = rank, world_size
        self.transform = ImageTransform(spec.resolution, spec.center_crop, spec.random_flip, spec.min_size)
        self.assigner = BucketAssigner(spec.buckets) if spec.buckets else None
        self.next_epoch = int(epoch)
        self.resume_epoch: int | None = None
        self.resume_batches = 0
        self._counter: SkipCounter | None = None

    def resume_at(self, epoch: int, batches: int) -> None:
        """Continue epoch `epoch` after the `batches` this rank already consumed (exact mid-epoch resume)."""
        self.next_epoch, self.resume_epoch, self.resume_batches = int(epoch), int(epoch), int(batches)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` produce epoch ``epoch`` (e.g. after a resume)."""
        self.next_epoch = int(epoch)

    def __len__(self) -> int:
        if self.spec.steps_per_epoch is None:
            raise TypeError("ShardStream has no length without steps_per_epoch")
        return int(self.spec.steps_per_epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        if self._counter is None:  # one per process copy: leftover counts flow into the next epoch's first batch
            self._counter = SkipCounter(f"rank {self.rank} worker {worker}")
        counter = self._counter
        counter.consecutive = 0
        # Resuming mid-epoch: the DataLoader takes batches round-robin from workers 0, 1, ..., so batch i of an
        # epoch comes from worker i % W. After `skip` batches, physical worker p plays logical worker
        # (p + skip) % W, regenerates that worker's stream and drops the batches it had already served.
        skip = self.resume_batches if epoch == self.resume_epoch else 0
        logical = (worker + skip) % num_workers
        done = batches_for_worker(skip, logical, num_workers)
        n_batches = None
        if self.spec.steps_per_epoch is not None:
            n_batches = batches_for_worker(int(self.spec.steps_per_epoch), logical, num_workers)
            if n_batches - done <= 0:  # with_epoch(0) would mean "no limit" in webdataset
                return iter(())
        pipeline = self._pipeline(epoch, logical, num_workers, counter)
        if n_batches is not None:
            pipeline = pipeline.with_epoch(nbatches=n_batches)
        if done:
            log.info("data: resuming epoch %d of rank %d worker %d after %d batch(es)", epoch, self.rank, logical, done)
            return itertools.islice(iter(pipeline), done, None)
        return iter(pipeline)

    def _pipeline(self, epoch: int, worker: int, num_workers: int, counter: SkipCounter) -> wds.DataPipeline:
        spec, where = self.spec, (self.spec.seed, epoch, self.rank, worker)
        if spec.mixture:
            stages: list[Any] = [self._mixed(where, num_workers, counter)]
        else:
            stages = self._sample_stages(self.urls, where, num_workers, counter)
        collate_kind = {"pair": collate_pairs, "coupling": collate_couplings}.get(spec.kind, collate)
        collate_fn = lambda samples: collate_kind(samples, counter.take(), tokenizer=self.tokenizer)  # noqa: E731
        if self.assigner is not None:  # each batch from one bucket (a buffer per bucket)
            stages.append(bucket_batches(spec.batch_size, collate_fn))
        else:  # partial batches only in single passes (validation); training batches keep one shape
            stages.append(wds.batched(spec.batch_size, collation_fn=collate_fn, partial=spec.steps_per_epoch is None))
        return wds.DataPipeline(*stages)

    def _mixed(self, where: tuple, num_workers: int, counter: SkipCounter):
        """Samples drawn from the mixture's sources by weight (every source resampled, so endless), each tagged with
        its source's name; the draw is seeded like everything else, so resume stays exact."""
        sources = self.spec.mixture
        weights = [src.weight for src in sources]

        def mixed() -> Iterator[dict[str, Any]]:
            rng = random.Random(derive_seed(*where, "mix"))
            streams = [iter(wds.DataPipeline(*self._sample_stages(list(src.urls), (*where, src.name), num_workers,
                                                                   counter, src))) for src in sources]
            while True:
                i = rng.choices(range(len(streams)), weights)[0]
                sample = next(streams[i], None)
                if sample is None:  # a source with no readable sample left: the data, not a sample, is broken
                    raise RuntimeError(f"data.mixture: source '{sources[i].name}' yielded no samples; check its urls")
                yield {**sample, "source": sources[i].name}
        return mixed

    def _sample_stages(self, urls: list[str], where: tuple, num_workers: int, counter: SkipCounter,
                       source: MixSource | None = None) -> list[Any]:
        """Shards -> decoded samples of one source (the whole stream, or one dataset of a mixture)."""
        spec, worker = self.spec, where[3]
        if spec.resampled:
            # deterministic=True and a constant worker_seed: the seed we pass is the whole seed.
            seed = derive_seed(*where, "shards")
            shards: list[Any] = [wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0, deterministic=True)]
        else:
            urls = list(urls)
            if spec.shuffle_buffer > 1:  # same order on every rank (seed, epoch) so the split stays disjoint
                random.Random(derive_seed(spec.seed, where[1], "shard-order")).shuffle(urls)
            if len(urls) < self.world_size * num_workers and self.rank == 0 and worker == 0:
                log.warning(
                    "data: %d shard(s) for %d rank(s) x %d worker(s): some ranks/workers get no data "
                    "(use resampled=true or write more shards)", len(urls), self.world_size, num_workers,
                )
            split = partial(_split_by_rank, rank=self.rank, world=self.world_size)
            by_worker = partial(_split_by_rank, rank=worker, world=num_workers)  # the logical worker, see __iter__
            shards = [wds.SimpleShardList(urls), split, by_worker]
        if spec.shard_cache_dir:  # remote shards copied to local disk once, then read from there
            shards.append(partial(cache_remote_shards, cache_dir=spec.shard_cache_dir, handler=counter.read_handler))
        stages = [*shards, partial(tar_samples, handler=counter.read_handler)]
        if spec.shuffle_buffer > 1:
            rng = random.Random(derive_seed(*where, "shuffle"))
            stages.append(wds.shuffle(spec.shuffle_buffer, initial=min(100, spec.shuffle_buffer), rng=rng))
        aug_rng = random.Random(derive_seed(*where, "augment"))
        drop_rng = random.Random(derive_seed(*where, "dropout"))
        if spec.kind == "pair":
            decode = partial(decode_pair, transform=self.transform, aug_rng=aug_rng, drop_rng=drop_rng,
                             caption_dropout=spec.caption_dropout, ties=spec.ties)
        elif spec.kind == "coupling":
            decode = decode_coupling
        else:
            decode = partial(self._decode, aug_rng=aug_rng, drop_rng=drop_rng, source=source)
        stages.append(wds.map(_counted(decode, counter), handler=counter.sample_handler))
        return stages

    def _decode(
        self, sample: dict[str, Any], *, aug_rng: random.Random, drop_rng: random.Random,
        source: MixSource | None = None,
    ) -> dict[str, Any]:
        """Raw tar members -> one decoded sample; raises BadSample (counted by the map handler). A mixture's source
        applies its caption template and its own caption dropout."""
        image_key = next((k for k in self.spec.image_keys if k in sample), None)
        if image_key is None and LATENT_MEMBER not in sample:
            raise BadSample("no_image", f"members {sorted(k for k in sample if not k.startswith('__'))}")
        caption = decode_caption(sample.get(self.spec.caption_key), allow_missing=self.spec.allow_missing_caption)
        dropout = self.spec.caption_dropout
        if source is not None:
            caption = source.caption_template.format(caption=caption) if source.caption_template else caption
            dropout = dropout if source.caption_dropout is None else source.caption_dropout
        if LATENT_MEMBER in sample:  # a cached-latent shard (data/latent_cache.py): no image decode, no VAE
            kept = drop_caption(caption, dropout, drop_rng)
            return {"tensors": decode_cached(sample[LATENT_MEMBER], self.spec.cache), "caption": kept,
                    "dropped": kept != caption or not caption,
                    "key": f"{sample.get('__url__', '')}/{sample['__key__']}", "meta": _parse_meta(sample.get("json"))}
        out: dict[str, Any] = {}
        if self.assigner is not None:
            img = load_image(sample[image_key])
            (bw, bh), (w, h) = self.assigner(*img.size), img.size
            pixels, (top, left) = self.transform.fit(img, bw, bh, aug_rng, self.spec.buckets.max_upscale)
            out = {"bucket": (bw, bh), "time_ids": (h, w, top, left, bh, bw)}
        else:
            pixels = self.transform(load_image(sample[image_key],
                                               self.spec.resolution if self.spec.jpeg_draft else None), aug_rng)
        return {
            **out,
            "pixels": pixels,
            "caption": drop_caption(caption, dropout, drop_rng),
            "key": f"{sample.get('__url__', '')}/{sample['__key__']}",
            "meta": _parse_meta(sample.get("json")),
        }


def _counted(decode, counter: SkipCounter):
    """A decoder that resets the bad-in-a-row counter on success."""
    def run(sample: dict[str, Any]) -> dict[str, Any]:
        out = decode(sample)
        counter.ok()
        return out
    return run


def _split_by_rank(src: Iterator[Any], rank: int, world: int) -> Iterator[Any]:
    """Like wds.split_by_node, but with the rank resolved in the main process (workers may not see it)."""
    for i, item in enumerate(src):
        if i % world == rank:
            yield item


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1: schedulers (SLURM, timeout, Kubernetes) signal the whole process
    group, and a worker killed by it would crash the main process before it saves its checkpoint at the batch
    boundary. The main process decides; workers exit when it shuts them down (or when it dies)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class StreamLoader(DataLoader):
    """A DataLoader that advances the stream's epoch when workers are re-created each epoch.

    With fresh workers every epoch, each gets a copy of the main-process stream,
    whose epoch never advances on its own; persistent workers and
    ``num_workers=0`` advance their own copies.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("worker_init_fn", ignore_stop_signals)
        super().__init__(*args, **kwargs)

    def __iter__(self):  # type: ignore[override]
        iterator = super().__iter__()
        if self.num_workers > 0 and not self.persistent_workers and hasattr(self.dataset, "next_epoch"):
            self.dataset.next_epoch += 1
        return iterator


def build_stream(urls: str | Sequence[str], *, tokenizer: Any, spec: StreamSpec | None = None, epoch: int = 0,
                 rank: int | None = None, world_size: int | None = None, **settings: Any) -> ShardStream:
    """A stream of collated batches from shards (see the module docstring): `spec`, or its fields as keywords.

    ``urls`` is what the user configured; URLs are never taken from the data.
    Rank and world size are resolved here, in the main process, because
    DataLoader workers may not see the process group.
    """
    if tokenizer is None:
        raise ValueError("build_stream: tokenizer is None; the tokenizer comes from the model")
    if spec is None:
        unknown = sorted(set(settings) - set(StreamSpec.__dataclass_fields__))
        if unknown:
            raise TypeError(f"build_stream: unknown setting(s) {unknown}; the settings are StreamSpec's fields")
        spec = StreamSpec(**settings)
    elif settings:
        spec = replace(spec, **settings)
    return ShardStream([] if spec.mixture else expand_urls(urls), spec, tokenizer, *rank_and_world(rank, world_size),
                       epoch=epoch)
