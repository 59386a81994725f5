"""Data for diffusion-foundry: shards in, batches (see ``data.batch``) out.

Names are imported lazily so that ``import data`` (e.g. by the
``foundry-shards`` script) does not pull in Lightning or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "SKIP_REASONS": "data.batch",
    "collate": "data.batch",
    "BadSample": "data.transforms",
    "ImageTransform": "data.transforms",
    "load_image": "data.transforms",
    "ensure_digits_shards": "data.digits",
    "write_digits_shards": "data.digits",
    "write_folder_shards": "data.shards",
    "expand_urls": "data.webdataset",
    "build_stream": "data.webdataset",
    "ShardDataModule": "data.datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
