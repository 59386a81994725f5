"""Loader speed switches: JPEG draft decoding, pinned memory, prefetch, by config."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from data.datamodule import ShardDataModule
from data.transforms import ImageTransform, load_image


def _jpeg(w: int, h: int) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_jpeg_draft_decodes_smaller_and_gives_nearly_the_same_training_image():
    data = _jpeg(800, 600)
    full, draft = load_image(data), load_image(data, draft=64)
    assert full.size == (800, 600)
    assert draft.size == (100, 75)  # 1/8 scale: the smallest DCT scale with both sides >= 64
    t = ImageTransform(64)
    assert (t(full) - t(draft)).abs().mean() < 0.02  # in [-1, 1] units
    assert load_image(data, draft=700).size == (800, 600)  # never below the requested size
    png = io.BytesIO()
    Image.new("RGB", (300, 200)).save(png, "PNG")
    assert load_image(png.getvalue(), draft=16).size == (300, 200)  # only JPEGs have a draft mode


def test_loader_switches_reach_the_dataloader(tmp_path):
    dm = ShardDataModule(urls=None, steps_per_epoch=10, num_workers=2, pin_memory=True, prefetch_factor=4, jpeg_draft=True)
    loader = dm._loader(torch.utils.data.TensorDataset(torch.zeros(2)), 2)
    assert loader.pin_memory and loader.prefetch_factor == 4
    assert dm._loader(torch.utils.data.TensorDataset(torch.zeros(2)), 0).prefetch_factor is None
    with pytest.raises(ValueError, match="data.prefetch_factor=0"):
        ShardDataModule(prefetch_factor=0, steps_per_epoch=10)


def test_remote_shards_are_cached_locally_once_and_reread(tmp_path):
    import shutil

    from data.digits import ensure_digits_shards
    from data.webdataset import build_stream, expand_urls, local_shard_path
    from models.tiny import build_tokenizer, default_caption_corpus

    src = tmp_path / "remote.tar"
    shutil.copy(expand_urls(ensure_digits_shards(16))[0], src)
    url = f"pipe:cat {src}"
    tok = build_tokenizer(default_caption_corpus(), 300, 12)

    def keys():
        stream = build_stream([url], tokenizer=tok, resolution=16, batch_size=64, resampled=False, shuffle_buffer=0,
                              shard_cache_dir=str(tmp_path / "cache"))
        return [k.rsplit("/", 1)[1] for b in stream for k in b["keys"]]

    first = keys()
    local = local_shard_path(url, tmp_path / "cache")
    assert local.is_file() and local.read_bytes() == src.read_bytes()
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    src.unlink()  # the "remote" is gone: the local copy serves the next epoch
    assert keys() == first and len(first) == 256
