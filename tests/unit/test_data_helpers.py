"""Helpers shared by the data tests (no tests here): a real tiny tokenizer and shard writers.

tests/reliability/test_bad_data.py loads this file by path, so keep it free of
imports from other test modules.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

MAX_LEN = 16


def make_tokenizer() -> Any:
    """A word-level tokenizer over the digits caption words, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data.digits import CAPTION_TEMPLATES, DIGIT_WORDS

    words = {w.strip(",") for t in CAPTION_TEMPLATES for w in t.format(word="").split()} | set(DIGIT_WORDS)
    vocab = {"[PAD]": 0, "[UNK]": 1, ",": 2}
    for w in sorted(words - {""}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LEN, pad_token="[PAD]", unk_token="[UNK]")


def image_bytes(size: tuple[int, int] = (20, 12), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    """Encoded random image bytes of a given PIL mode and format."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, Any]]) -> str:
    """Write raw members (bytes/str values; dict -> json) into one tar shard; returns its path."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            out = {}
            for k, v in sample.items():
                if isinstance(v, dict):
                    v = json.dumps(v).encode()
                elif isinstance(v, str) and not k.startswith("__"):
                    v = v.encode()
                out[k] = v
            sink.write(out)
    return str(path)


def good_sample(key: str, caption: str = "a handwritten digit one", seed: int = 0) -> dict[str, Any]:
    return {"__key__": key, "png": image_bytes(seed=seed), "txt": caption, "json": {"label": 1}}


def all_batches(stream: Any) -> list[dict[str, Any]]:
    return list(iter(stream))


def sum_skips(batches: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for batch in batches:
        for reason, n in batch["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    return total
