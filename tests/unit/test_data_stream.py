"""Streaming: the batch contract, reproducible seeding, rank splits, DataLoader workers, the datamodule."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_data_helpers import MAX_LEN, make_tokenizer

from data.batch import SKIP_REASONS, collate
from data.datamodule import ShardDataModule
from data.digits import DIGIT_WORDS, write_digits_shards
from data.transforms import BadSample, ImageTransform
from data.webdataset import StreamLoader, batches_for_worker, build_stream


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "digits-16"
    write_digits_shards(out, maxcount=256)  # 8 shards
    return str(out)


def stream(digits, tokenizer, **kw):
    args = dict(tokenizer=tokenizer, resolution=16, batch_size=16, steps_per_epoch=4, shuffle_buffer=200)
    args.update(kw)
    return build_stream(digits, **args)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_batch_contract(digits, tokenizer):
    batches = list(stream(digits, tokenizer, caption_dropout=0.0))
    assert len(batches) == 4
    b = batches[0]
    assert b["pixels"].shape == (16, 3, 16, 16) and b["pixels"].dtype == torch.float32
    assert -1.0 <= b["pixels"].min() < 0 < b["pixels"].max() <= 1.0
    assert b["input_ids"].shape == (16, MAX_LEN) and b["input_ids"].dtype == torch.int64
    expected = tokenizer(b["captions"], padding="max_length", max_length=MAX_LEN, truncation=True,
                         return_tensors="pt").input_ids
    assert torch.equal(b["input_ids"], expected)
    assert all(isinstance(c, str) and c for c in b["captions"])
    for caption, meta in zip(b["captions"], b["meta"], strict=True):
        assert DIGIT_WORDS[meta["label"]] in caption
    assert len(set(keys_of(batches))) == len(keys_of(batches)) == 64
    assert b["keys"][0].startswith(digits) and ".tar/" in b["keys"][0]
    assert b["skipped"] == {r: 0 for r in SKIP_REASONS}


def test_caption_dropout_rate(digits, tokenizer):
    batches = list(stream(digits, tokenizer, caption_dropout=0.3, batch_size=64, steps_per_epoch=10))
    captions = [c for b in batches for c in b["captions"]]
    rate = captions.count("") / len(captions)
    assert 0.25 < rate < 0.35, rate  # 640 draws: sd ~0.018
    dropped = [i for i, c in enumerate(batches[0]["captions"]) if c == ""]
    assert (batches[0]["input_ids"][dropped] == tokenizer.pad_token_id).all()


def test_resampled_stream_reproducible_and_distinct_per_rank(digits, tokenizer):
    def run(rank, seed=0, epoch=0):
        s = stream(digits, tokenizer, rank=rank, world_size=2, seed=seed, epoch=epoch, random_flip=True,
                   center_crop=False)
        return list(s)

    a, b = run(0), run(0)
    assert keys_of(a) == keys_of(b)
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(a, b, strict=True))
    assert [x["captions"] for x in a] == [y["captions"] for y in b]
    assert keys_of(run(1)) != keys_of(a)
    assert keys_of(run(0, seed=1)) != keys_of(a)
    assert keys_of(run(0, epoch=1)) != keys_of(a)


CROSS_RUN = """
import hashlib, sys
from test_data_helpers import make_tokenizer
from data.webdataset import StreamLoader, build_stream
s = build_stream(sys.argv[1], tokenizer=make_tokenizer(), resolution=16, batch_size=8, steps_per_epoch=4,
                 random_flip=True, center_crop=False, caption_dropout=0.5, seed=7)
h = hashlib.sha1()
for b in StreamLoader(s, batch_size=None, num_workers=2):
    h.update(repr((b["keys"], b["captions"])).encode() + b["pixels"].numpy().tobytes())
print(h.hexdigest())
"""


def test_stream_reproducible_across_processes(digits):
    """Same seed, fresh interpreters with different hash seeds: the same bytes (webdataset's own
    default seeding mixes in pid and time, and Python's str hash is salted per process)."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[1]), str(here)])}
    runs = [
        subprocess.Popen([sys.executable, "-c", CROSS_RUN, digits], env={**env, "PYTHONHASHSEED": str(i)},
                         stdout=subprocess.PIPE, text=True)
        for i in (1, 2)
    ]
    digests = [r.communicate(timeout=120)[0].strip() for r in runs]
    assert all(r.returncode == 0 for r in runs) and len(digests[0]) == 40
    assert digests[0] == digests[1]


def test_env_rank_is_used(digits, tokenizer, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = keys_of(stream(digits, tokenizer))
    assert from_env == keys_of(stream(digits, tokenizer, rank=1, world_size=2))
    assert from_env != keys_of(stream(digits, tokenizer, rank=0, world_size=2))


def test_epochs_advance_and_set_epoch_replays(digits, tokenizer):
    s = stream(digits, tokenizer)
    e0, e1 = keys_of(iter(s)), keys_of(iter(s))
    assert e0 != e1
    s.set_epoch(1)
    assert keys_of(iter(s)) == e1


def test_split_by_node_gives_disjoint_shards(digits, tokenizer):
    def rank_keys(rank):
        s = stream(digits, tokenizer, resampled=False, steps_per_epoch=None, rank=rank, world_size=2,
                   batch_size=50, caption_dropout=0.0)
        return keys_of(s)

    k0, k1 = rank_keys(0), rank_keys(1)
    assert set(k0).isdisjoint(k1)
    assert len(set(k0) | set(k1)) == 1797
    shards0 = {k.rsplit("/", 1)[0] for k in k0}
    shards1 = {k.rsplit("/", 1)[0] for k in k1}
    assert len(shards0) == len(shards1) == 4 and shards0.isdisjoint(shards1)


def test_too_few_shards_warns_once(digits, tokenizer, caplog):
    two = [str(Path(digits) / f"digits-00000{i}.tar") for i in range(2)]
    s = build_stream(two, tokenizer=tokenizer, resolution=16, batch_size=64, resampled=False, rank=0, world_size=4)
    with caplog.at_level(logging.WARNING, logger="data"):
        batches = list(s)
    assert len({k.rsplit("/", 1)[0] for k in keys_of(batches)}) == 1  # rank 0 of 4 reads one shard
    warnings = [r for r in caplog.records if "some ranks/workers get no data" in r.getMessage()]
    assert len(warnings) == 1


def test_batches_for_worker_splits_remainder():
    assert [batches_for_worker(10, w, 3) for w in range(3)] == [4, 3, 3]
    assert sum(batches_for_worker(7, w, 4) for w in range(4)) == 7


def test_build_stream_validates(digits, tokenizer):
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_stream(digits, tokenizer=tokenizer, resolution=16, batch_size=4)
    with pytest.raises(ValueError, match="tokenizer"):
        build_stream(digits, tokenizer=None, resolution=16, batch_size=4, steps_per_epoch=1)


def test_dataloader_workers_yield_exact_epochs(digits, tokenizer):
    """Two workers split 5 steps as 3+2, draw different streams, and epochs match across worker modes."""
    def epochs(persistent: bool) -> list[Counter]:
        loader = StreamLoader(stream(digits, tokenizer, steps_per_epoch=5), batch_size=None, num_workers=2,
                              persistent_workers=persistent)
        return [Counter(keys_of(list(loader))) for _ in range(2)]

    persistent, fresh = epochs(True), epochs(False)
    assert sum(persistent[0].values()) == 5 * 16
    assert max(persistent[0].values()) <= 2  # workers draw different streams (a repeat is resampling luck)
    assert persistent == fresh  # epoch e is the same stream whether workers persist or not
    assert persistent[0] != persistent[1]


def test_image_transform_resize_crop_flip():
    from PIL import Image

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    t = ImageTransform(8, center_crop=False, random_flip=True)
    import random

    outs = [t(img, random.Random(i)) for i in range(20)]
    assert all(o.shape == (3, 8, 8) for o in outs)
    assert len({tuple(o[0, 0].tolist()) for o in outs}) > 1  # random crops differ
    assert torch.equal(t(img, random.Random(3)), t(img, random.Random(3)))
    center = ImageTransform(8)(img)
    assert center[2, 0, 0] == 1.0 and center[0, 0, -1] == 1.0  # blue left, red right
    with pytest.raises(BadSample) as err:
        ImageTransform(8, min_size=32)(img)
    assert err.value.reason == "too_small"


def test_collate_needs_tokenizer_or_ids():
    sample = {"pixels": torch.zeros(3, 2, 2), "caption": "x", "key": "k", "meta": {}}
    with pytest.raises(ValueError):
        collate([sample], {})
    batch = collate([{**sample, "input_ids": [1, 2]}], {"decode": 2})
    assert batch["input_ids"].dtype == torch.int64 and batch["skipped"]["decode"] == 2


# --- datamodule ---------------------------------------------------------------------------------------


def test_datamodule_checks_paths_then_tokenizer(tmp_path, digits, tokenizer):
    dm = ShardDataModule(urls=str(tmp_path / "missing-*.tar"), steps_per_epoch=10)
    with pytest.raises(FileNotFoundError, match="no shard at"):
        dm.setup("fit")  # a wrong path fails first, with or without a tokenizer
    dm = ShardDataModule(urls=digits, steps_per_epoch=10)
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.setup("fit")
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert len(dm.train_urls) == 8


def test_datamodule_defaults_to_digits(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path))
    dm = ShardDataModule(batch_size=8, num_workers=0, steps_per_epoch=3, shuffle_buffer=50)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert len(dm.train_urls) == 8 and (tmp_path / "digits-16").is_dir()
    loader = dm.train_dataloader()
    assert loader.batch_size is None and len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3 and batches[0]["pixels"].shape == (8, 3, 16, 16)
    assert dm.val_dataloader() == []
    dm.set_epoch(2)
    assert keys_of(dm.train_dataloader()) != keys_of(batches)
    assert dm.state_dict()["epoch"] == 2


def test_datamodule_val_is_one_deterministic_pass(digits, tokenizer):
    from omegaconf import OmegaConf

    val = OmegaConf.create({"u": [str(Path(digits) / "digits-000000.tar")]}).u  # Hydra hands a ListConfig
    dm = ShardDataModule(urls=digits, val_urls=val, batch_size=100, num_workers=0, caption_dropout=1.0, steps_per_epoch=10)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert [len(b["keys"]) for b in first] == [100, 100, 56]
    assert keys_of(first) == keys_of(second) == sorted(keys_of(first))
    assert all(c for b in first for c in b["captions"])  # no dropout in validation
