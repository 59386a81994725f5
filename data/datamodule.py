"""The LightningDataModule every text-to-image run uses.

Its constructor takes plain values because Hydra builds it straight from
``conf/data/*.yaml``; the tokenizer belongs to the model, so it arrives later
through :meth:`ShardDataModule.set_tokenizer`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data.buckets import BucketSpec
from data.digits import ensure_digits_shards
from data.latent_cache import check_cache, expected_shapes, manifest_path, read_manifest
from data.shards import count_samples
from data.webdataset import MixSource, ShardStream, StreamLoader, StreamSpec, build_stream, expand_urls

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards; with ``urls=None`` it trains on the built-in digits world."""
    def __init__(
        self,
        urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        global_batch_size: int | None = None,
        mixture: list[dict[str, Any]] | None = None,
        buckets: dict[str, Any] | None = None,
        **stream: Any,
    ) -> None:
        """Where the data is and how it is loaded; `stream` holds the stream settings, declared once in
        `data.webdataset.StreamSpec` (resolution, batch_size, caption_dropout, ... as conf/data/*.yaml sets them)
        and readable as attributes (`datamodule.batch_size`)."""
        super().__init__()
        self.save_hyperparameters()  # logged with the run and stored in checkpoints
        unknown = sorted(set(stream) - set(StreamSpec.__dataclass_fields__) - {"cache"})
        if unknown:
            raise ValueError(f"data: unknown setting(s) {unknown}; the stream settings are "
                             f"{sorted(StreamSpec.__dataclass_fields__)}")
        self.urls = _plain(urls)
        self.val_urls = _plain(val_urls)
        self.global_batch_size = global_batch_size  # informational: train/ops/launch.py derived batch_size from it
        self.num_workers = int(num_workers)
        self.persistent_workers = bool(persistent_workers)
        self.pin_memory = bool(pin_memory)  # page-locked batches: faster host-to-GPU copies
        if prefetch_factor is not None and int(prefetch_factor) < 1:
            raise ValueError(f"data.prefetch_factor={prefetch_factor}: give batches per worker >= 1, or null")
        self.prefetch_factor = None if prefetch_factor is None else int(prefetch_factor)
        self.mixture_cfg = [dict(m) for m in mixture] if mixture else None
        if self.mixture_cfg and self.urls is not None:
            raise ValueError("data.mixture and data.urls are both set: list every dataset in data.mixture (each with "
                             "its urls) and set data.urls=null")
        self.mixture: list[Any] | None = None
        buckets = dict(buckets or {})
        spec_buckets = None
        if buckets.pop("enabled", False):
            spec_buckets = BucketSpec(resolution=int(stream["resolution"]), **buckets)
        # placeholders until setup(): a mixture is resolved from its urls then; its checks need a resampled stream
        self.spec = StreamSpec(**stream, buckets=spec_buckets)
        self.tokenizer: Any = None
        self.train_urls: list[str] | None = None
        self.val_url_list: list[str] | None = None
        self._epoch = 0
        self._resume: tuple[int, int] | None = None

    def __getattr__(self, name: str) -> Any:
        """The stream settings read as attributes: `datamodule.resolution`, `.batch_size`, `.seed`, ..."""
        spec = self.__dict__.get("spec")
        if spec is not None and name in StreamSpec.__dataclass_fields__:
            return getattr(spec, name)
        raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Give the data the model's tokenizer (must happen before ``setup``)."""
        self.tokenizer = tokenizer

    def set_epoch(self, epoch: int) -> None:
        """Epoch used when no trainer is attached; with a trainer, ``trainer.current_epoch`` wins."""
        self._epoch = int(epoch)

    def prepare_data(self) -> None:
        """Build the digits cache once per node before every rank's ``setup`` (a race is safe anyway)."""
        if self.urls is None:
            ensure_digits_shards(self.resolution)

    def setup(self, stage: str | None = None) -> None:
        """Resolve URLs first, so a wrong path fails in one line before any heavy work."""
        if self.mixture_cfg and self.mixture is None:
            self.mixture = build_mixture(self.mixture_cfg)
            self.train_urls = [u for src in self.mixture for u in src.urls]
            for src in self.mixture:
                log.info("data.mixture: '%s' %d shard(s), %.1f%% of samples", src.name, len(src.urls),
                         100 * src.weight / sum(m.weight for m in self.mixture))
        if self.train_urls is None:
            self.train_urls = expand_urls(self.urls if self.urls is not None else ensure_digits_shards(self.resolution))
        if self.val_urls is not None and self.val_url_list is None:
            self.val_url_list = expand_urls(self.val_urls)
        self.cache_manifest = self._manifest(self.mixture[0].urls if self.mixture else self.train_urls)
        if self.mixture and any(self._manifest(list(m.urls)) != self.cache_manifest for m in self.mixture):
            raise ValueError("data.mixture: mix image shards with image shards and cached latents with latents of "
                             "the same model; the datasets differ")
        if self.mixture and self.cache_manifest and self.cache_manifest.get("context_shape") and \
                any(m.caption_template for m in self.mixture):
            raise ValueError("data.mixture: caption_template on cached text embeddings (encoded from the raw "
                             "captions); encode with --no-text or drop the template")
        if self.tokenizer is None:
            raise RuntimeError(
                "ShardDataModule: no tokenizer; call datamodule.set_tokenizer(model tokenizer) before setup()"
            )

    @staticmethod
    def _manifest(urls: list[str]) -> dict[str, Any] | None:
        path = manifest_path(urls)
        return read_manifest(path) if path is not None else None

    def check_model(self, components: Any, text_trains: bool = False) -> None:
        """Before training: cached-latent shards must come from this run's VAE and text encoder (one-line error)."""
        if self.train_urls is None:
            self.setup("fit")
        if self.cache_manifest is None:
            return
        if self.random_flip:
            raise ValueError("data.random_flip=true: cached latents were encoded unflipped; set data.random_flip=false "
                             "or train on the image shards")
        if self.kind != "image":
            raise ValueError(f"data.kind={self.kind}: cached latents hold single images; use data.kind=image")
        check_cache(self.cache_manifest, components, str(self.train_urls[0]), text_trains)

    @property
    def cache_expect(self) -> dict[str, Any] | None:
        manifest = getattr(self, "cache_manifest", None)
        return expected_shapes(manifest) if manifest else None

    def _current_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else self._epoch

    def _loader(self, stream: Any, num_workers: int) -> DataLoader:
        return StreamLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=self.persistent_workers and num_workers > 0,
            pin_memory=self.pin_memory,
            **({"prefetch_factor": self.prefetch_factor} if self.prefetch_factor and num_workers > 0 else {}),
        )

    def build_train_stream(self, urls: list[str], seed: int | None = None,
                           caption_dropout: float | None = None) -> ShardStream:
        """A training stream over `urls` with this module's settings (subclasses mix several of these)."""
        spec = replace(self.spec, cache=self.cache_expect, mixture=tuple(self.mixture) if self.mixture else None,
                       seed=self.seed if seed is None else seed,
                       caption_dropout=self.caption_dropout if caption_dropout is None else caption_dropout)
        return build_stream(urls, tokenizer=self.tokenizer, spec=spec, epoch=self._current_epoch())

    def train_dataloader(self) -> DataLoader:
        if self.train_urls is None:
            self.setup("fit")
        assert self.train_urls is not None
        stream = self.build_train_stream(self.train_urls)
        if self._resume is not None:  # the first epoch after a checkpoint restore continues mid-epoch
            stream.resume_at(*self._resume)
            self._resume = None
        return self._loader(stream, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """One deterministic pass over ``val_urls`` (no dropout, no flip); none without them."""
        if self.val_urls is None:
            return []
        if self.val_url_list is None:
            self.setup("validate")
        assert self.val_url_list is not None
        spec = replace(self.spec, caption_dropout=0.0, center_crop=True, random_flip=False, shuffle_buffer=0,
                       resampled=False, steps_per_epoch=None, cache=None, jpeg_draft=False, mixture=None, buckets=None,
                       shard_cache_dir=None)
        stream = build_stream(self.val_url_list, tokenizer=self.tokenizer, spec=spec)
        return self._loader(stream, min(self.num_workers, len(self.val_url_list)))  # a worker per shard at most

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: its seed, epoch and the batches this rank consumed in that epoch.

        Streams are deterministic per (seed, epoch, rank, worker), so these numbers are enough to resume
        exactly: a resumed run sees the same samples in the same order as an uninterrupted one.
        """
        trainer = getattr(self, "trainer", None)
        batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed) if trainer is not None else 0
        return {"seed": self.seed, "epoch": self._current_epoch(), "batches_in_epoch": batches,
                "steps_per_epoch": self.steps_per_epoch, "num_workers": self.num_workers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = int(state_dict.get("epoch", self._epoch))
        if int(state_dict.get("seed", self.seed)) != self.seed:
            log.warning("data: resuming with seed %s, checkpoint used %s", self.seed, state_dict["seed"])
        batches = int(state_dict.get("batches_in_epoch", 0))
        same_layout = (state_dict.get("steps_per_epoch") == self.steps_per_epoch
                       and state_dict.get("num_workers", self.num_workers) == self.num_workers)
        if batches and not same_layout:
            log.warning("data: steps_per_epoch or num_workers changed since the checkpoint; the stream restarts "
                        "epoch %d from its beginning instead of resuming it exactly", self._epoch)
        elif batches and self.steps_per_epoch and batches < self.steps_per_epoch:
            self._resume = (self._epoch, batches)
        elif batches and self.steps_per_epoch:
            # saved on the epoch's last batch: the loader is built while the trainer still says this epoch, but
            # the next batch is the first of the next epoch
            self._resume = (self._epoch + 1, 0)


def build_mixture(entries: list[dict[str, Any]]) -> list[Any]:
    """`data.mixture` entries -> MixSource list. Each entry: `urls` and either `weight` (a share of samples) or
    `repeats` (kohya style: each image `repeats` times per pass, so the share is repeats x dataset size); optional
    `name`, `caption_template` ("{caption}" is the sample's caption) and `caption_dropout`."""
    known = {"name", "urls", "weight", "repeats", "caption_template", "caption_dropout"}
    sources, names = [], set()
    for i, entry in enumerate(entries):
        where = f"data.mixture[{i}]"
        if set(entry) - known:
            raise ValueError(f"{where}: unknown key(s) {sorted(set(entry) - known)}; use {sorted(known)}")
        if not entry.get("urls"):
            raise ValueError(f"{where}: no urls; give the dataset's shards (a folder, glob or list)")
        name = str(entry.get("name") or f"dataset{i}")
        if name in names:
            raise ValueError(f"{where}: name '{name}' is used twice; give each dataset its own name")
        names.add(name)
        urls = expand_urls(_plain(entry["urls"]))
        if entry.get("weight") is not None and entry.get("repeats") is not None:
            raise ValueError(f"{where}: give weight or repeats, not both")
        if entry.get("weight") is not None:
            weight = float(entry["weight"])
        else:
            if any(u.startswith("pipe:") for u in urls):
                raise ValueError(f"{where}: repeats needs local shards to count samples; give a weight instead")
            weight = float(entry.get("repeats", 1)) * count_samples(urls)
        if not weight > 0:
            raise ValueError(f"{where}: weight must be > 0, got {weight}")
        dropout = entry.get("caption_dropout")
        if dropout is not None and not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"{where}: caption_dropout must be in [0, 1], got {dropout}")
        template = entry.get("caption_template")
        if template is not None:
            try:
                str(template).format(caption="x")
            except (KeyError, IndexError, ValueError) as exn:
                raise ValueError(f"{where}: caption_template '{template}' has a field other than {{caption}} "
                                 f"({exn})") from None
        sources.append(MixSource(name, tuple(urls), weight, None if template is None else str(template),
                                 None if dropout is None else float(dropout)))
    return sources


def _plain(urls: Any) -> str | list[str] | None:
    """Hydra hands ListConfig; keep only plain str/list so pickling to workers stays cheap."""
    if urls is None or isinstance(urls, str):
        return urls
    return [str(u) for u in urls]
