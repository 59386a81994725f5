"""DreamBooth data: a handful of subject images mixed, batch by batch, with class images for prior preservation.

"Here are 5 photos of my dog, teach the model `sks dog`": the instance folder (any sizes and formats, EXIF
orientation respected) is written to shards with the instance prompt; class images ("a photo of a dog") come
from `class_dir`, and the base model generates the missing ones before training (cached there, so the next run
reuses them). Both sources stream through the same shard code as every run. A batch is the instance images then
as many class images, with `batch["is_prior"]` marking the class half; the DreamBooth method weights that half.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset

from data.datamodule import ShardDataModule
from data.shards import IMAGE_EXTS, write_folder_shards
from data.webdataset import ShardStream, derive_seed
from models.export import make_pipeline

log = logging.getLogger(__name__)


def class_prompt_list(class_prompt: str | list[str] | None) -> list[str]:
    """`data.class_prompt` as a list: one prompt, or several (class images are generated round-robin over them)."""
    if class_prompt is None:
        return []
    prompts = [class_prompt] if isinstance(class_prompt, str) else [str(p) for p in class_prompt]
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("data.class_prompt: empty prompt; give e.g. 'a photo of a dog' (or a list of prompts)")
    return prompts


def check_prompts(instance_prompt: str, class_prompt: str | list[str] | None, identifier: str | None) -> None:
    """The instance prompt must name the subject with a token the class prompt(s) lack (the identifier)."""
    if not instance_prompt or not str(instance_prompt).strip():
        raise ValueError("data.instance_prompt is empty; give e.g. 'a photo of sks dog'")
    words = str(instance_prompt).lower().split()
    if identifier and identifier.lower() not in words:
        raise ValueError(f"data.instance_prompt '{instance_prompt}' does not contain data.identifier '{identifier}'; "
                         f"put the identifier in the prompt, e.g. 'a photo of {identifier} dog'")
    for prompt in class_prompt_list(class_prompt):
        if not set(words) - set(prompt.lower().split()):
            raise ValueError(f"data.instance_prompt '{instance_prompt}' has no identifier beyond data.class_prompt "
                             f"'{prompt}'; add a rare token, e.g. 'a photo of sks dog'")


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) directly in `folder` (hidden files ignored)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTS and p.suffix.lower() != ".txt"]
    return images, others


@torch.no_grad()
def generate_class_images(components, prompts: str | list[str], count: int, out: Path, start: int = 0,
                          steps: int = 25, guidance_scale: float = 3.0, batch_size: int = 50, seed: int = 0) -> None:
    """`count` images from the base model into `out` (PNG + same-named .txt caption), image i of prompt
    i mod len(prompts), with a progress bar."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    from tqdm.auto import tqdm


    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = make_pipeline(components).to(device)
    with tqdm(total=count, desc="class images", unit="img") as bar:
        for first in range(start, start + count, batch_size):
            n = min(batch_size, start + count - first)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + first + i) for i in range(n)]
            chunk = [prompts[(first + i) % len(prompts)] for i in range(n)]
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens).images
            for i, img in enumerate(images):
                stem = out / f"class-{first + i:06d}"
                img.save(stem.with_suffix(".png"))
                stem.with_suffix(".txt").write_text(chunk[i])
            bar.update(n)
    pipe.to("cpu")


def concat_batches(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Instance batch + class batch -> one batch with `is_prior` marking the second part."""
    out = {"pixels": torch.cat([first["pixels"], second["pixels"]]),
           "input_ids": torch.cat([first["input_ids"], second["input_ids"]])}
    for key in ("captions", "keys", "meta"):
        out[key] = list(first[key]) + list(second[key])
    out["skipped"] = {k: first["skipped"].get(k, 0) + second["skipped"].get(k, 0)
                      for k in {**first["skipped"], **second["skipped"]}}
    out["is_prior"] = torch.cat([torch.zeros(len(first["keys"]), dtype=torch.bool),
                                 torch.ones(len(second["keys"]), dtype=torch.bool)])
    return out


class PairedStream(IterableDataset):
    """Two equal-length streams in lockstep; resume and epochs apply to both, so the mix resumes exactly."""
    def __init__(self, first: ShardStream, second: ShardStream) -> None:
        super().__init__()
        self.first, self.second = first, second

    @property
    def next_epoch(self) -> int:
        return self.first.next_epoch

    @next_epoch.setter
    def next_epoch(self, value: int) -> None:
        self.first.next_epoch = self.second.next_epoch = value

    def __len__(self) -> int:
        return len(self.first)

    def resume_at(self, epoch: int, batches: int) -> None:
        self.first.resume_at(epoch, batches)
        self.second.resume_at(epoch, batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for a, b in zip(iter(self.first), iter(self.second)):
            yield concat_batches(a, b)


class DreamBoothDataModule(ShardDataModule):
    """Instance images (+ class images with prior preservation) as shards, streamed like any other run."""
    def __init__(self, instance_dir: str, instance_prompt: str, class_prompt: str | list[str] | None = None,
                 class_dir: str | None = None, num_class_images: int = 100, prior_preservation: bool = True,
                 identifier: str | None = None, shard_dir: str = "dreambooth-data",
                 class_generation: dict[str, Any] | None = None, prior_caption_dropout: float = 0.1,
                 **kwargs: Any) -> None:
        kwargs.pop("urls", None)
        super().__init__(urls=None, **kwargs)
        self.instance_dir = Path(str(instance_dir)).expanduser()
        self.instance_prompt = str(instance_prompt)
        self.class_prompts = class_prompt_list(class_prompt)
        self.class_prompt = self.class_prompts[0] if len(self.class_prompts) == 1 else (self.class_prompts or None)
        self.prior_preservation = bool(prior_preservation) and bool(self.class_prompts)
        self.class_dir = Path(str(class_dir or Path(shard_dir) / "class_images")).expanduser()
        self.num_class_images = int(num_class_images)
        self.identifier = identifier
        self.shard_dir = Path(str(shard_dir)).expanduser()
        self.class_generation = dict(class_generation or {})
        if not 0.0 <= float(prior_caption_dropout) < 1.0:
            raise ValueError(f"data.prior_caption_dropout={prior_caption_dropout}: give a share in [0, 1), e.g. 0.1")
        self.prior_caption_dropout = float(prior_caption_dropout)
        self.components = None
        self.ignored_files: list[Path] = []
        self.instance_skipped: dict[str, int] = {}

    def attach_model(self, module) -> None:
        """The base model generates missing class images in `prepare_data`."""
        self.components = module.components

    def setup(self, stage: str | None = None) -> None:
        """Cheap checks that fail in one line before any heavy work; shard paths once `prepare_data` wrote them."""
        if not self.instance_dir.is_dir():
            raise FileNotFoundError(f"data.instance_dir: '{self.instance_dir}' is not a folder; give a folder of "
                                    "3-20 images of the subject")
        images, self.ignored_files = list_images(self.instance_dir)
        if not images:
            raise ValueError(f"data.instance_dir: '{self.instance_dir}' has no images (jpg/png/webp/bmp); "
                             "put 3-20 photos of the subject there")
        if self.ignored_files:
            log.warning("dreambooth: ignoring %d non-image file(s) in %s (e.g. %s)", len(self.ignored_files),
                        self.instance_dir, self.ignored_files[0].name)
        if not 3 <= len(images) <= 20:
            log.warning("dreambooth: %d instance images; 3-20 is the range DreamBooth works best with", len(images))
        check_prompts(self.instance_prompt, self.class_prompt, self.identifier)
        if self.tokenizer is None:
            raise RuntimeError("DreamBoothDataModule: set_tokenizer() before setup()")
        if self._shards("instance"):
            self.train_urls = self._shards("instance")

    def _shards(self, name: str) -> list[str]:
        return sorted(str(p) for p in (self.shard_dir / name).glob("shard-*.tar"))

    def prepare_data(self) -> None:
        summary = write_folder_shards(self.instance_dir, self.shard_dir / "instance", caption=self.instance_prompt,
                                      overwrite=True)
        self.instance_skipped = {k: v for k, v in summary.skipped.items() if v}
        log.info("dreambooth: %d instance image(s) -> %s", summary.written, self.shard_dir / "instance")
        if self.instance_skipped:
            log.warning("dreambooth: skipped unreadable instance image(s) in %s: %s", self.instance_dir,
                        ", ".join(f"{k}={v}" for k, v in self.instance_skipped.items()))
        if not self.prior_preservation:
            return
        have = len(list_images(self.class_dir)[0]) if self.class_dir.is_dir() else 0
        if have < self.num_class_images:
            if self.components is None:
                raise RuntimeError("DreamBoothDataModule: attach_model() before prepare_data() to generate class images")
            log.info("dreambooth: generating %d class image(s) of %s into %s (have %d)",
                     self.num_class_images - have, self.class_prompts, self.class_dir, have)
            generate_class_images(self.components, self.class_prompts, self.num_class_images - have, self.class_dir,
                                  start=have, seed=self.seed, **self.class_generation)
        # one class prompt captions every class image (a user's own folder may have no .txt); several: each image's
        # own .txt, written when it was generated
        caption = self.class_prompts[0] if len(self.class_prompts) == 1 else None
        write_folder_shards(self.class_dir, self.shard_dir / "class", caption=caption, overwrite=True)

    def train_dataloader(self):
        if not self._shards("instance"):
            self.prepare_data()
        instance = self._stream(self._shards("instance"), "instance")
        stream: Any = instance
        if self.prior_preservation:
            # class images also train the empty prompt now and then: the unconditional branch that classifier-free
            # guidance steers against stays the base's, instead of drifting with the subject
            stream = PairedStream(instance, self._stream(self._shards("class"), "class", self.prior_caption_dropout))
        if self._resume is not None:
            stream.resume_at(*self._resume)
            self._resume = None
        return self._loader(stream, self.num_workers)

    def _stream(self, urls: list[str], name: str, caption_dropout: float | None = None) -> ShardStream:
        return self.build_train_stream(urls, seed=derive_seed(self.seed, name) % 2**31,  # independent draws
                                       caption_dropout=caption_dropout)
