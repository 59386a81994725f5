"""Aspect-ratio buckets on streams: the bucket set, one bucket per image, one shape per batch, the same number of
batches on every rank whatever the shards, the stated rules for too-small and extreme images, SDXL time_ids."""
import math
import os
import random
import subprocess

import pytest
import torch
from PIL import Image

from data.buckets import BucketAssigner, BucketSpec, make_buckets
from data.shards import write_folder_shards
from data.transforms import BadSample
from data.webdataset import build_stream
from models.tiny import build_tokenizer, default_caption_corpus
from tests.conftest import cli, small

SIZES = [(64, 64), (96, 48), (48, 96), (128, 40), (40, 100), (80, 64), (64, 80), (100, 70)]


def _folder(root, name: str, n: int, seed: int, sizes=SIZES):
    rng = random.Random(seed)
    d = root / name
    d.mkdir(parents=True)
    for i in range(n):
        w, h = rng.choice(sizes)
        Image.new("RGB", (w, h), (rng.randrange(256), 0, 0)).save(d / f"{name}{i:03d}.png")
        (d / f"{name}{i:03d}.txt").write_text("a red picture")
    return d


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Three shards of very different sizes (5, 23 and 60 images) of mixed aspect ratios."""
    root = tmp_path_factory.mktemp("buckets")
    urls = []
    for k, n in enumerate([5, 23, 60]):
        res = write_folder_shards(_folder(root, f"set{k}", n, seed=k), root / "shards", maxcount=100,
                                  prefix=f"part{k}")
        urls += res.shards
    return urls


def test_bucket_set_fills_the_area_within_the_aspect_limit():
    spec = BucketSpec(resolution=512, step=64, max_aspect=4.0)
    buckets = make_buckets(spec)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.75 * 512 ** 2 <= w * h <= 512 ** 2
        assert max(w / h, h / w) <= 4.0
    assert len(buckets) == len(set(buckets))


def test_every_image_goes_to_the_one_bucket_nearest_its_aspect_and_rules_hold():
    spec = BucketSpec(resolution=64, step=16, max_aspect=4.0, aspect_tolerance=0.25)
    assign = BucketAssigner(spec)
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(20, 400), rng.randint(20, 400)
        if max(w / h, h / w) > 5.0:
            continue
        bw, bh = assign(w, h)
        best = min(math.fabs(math.log(b[0] / b[1]) - math.log(w / h)) for b in assign.buckets)
        assert math.fabs(math.log(bw / bh) - math.log(w / h)) == best
    with pytest.raises(BadSample) as e:
        assign(600, 100)  # ratio 6 > 4 x 1.25
    assert e.value.reason == "bad_aspect"
    assert assign(480, 100) == assign.buckets[-1]  # ratio 4.8: within the tolerance, the widest bucket
    with pytest.raises(ValueError, match="max_upscale"):
        BucketSpec(resolution=64, max_upscale=0.5)


def test_two_ranks_with_uneven_shards_see_equal_batches_of_one_shape(uneven_shards, tmp_path):
    tok = build_tokenizer(default_caption_corpus(), 300, 12)
    spec = BucketSpec(resolution=64, step=16, max_aspect=4.0, max_upscale=2.0)
    assign = BucketAssigner(spec)
    per_rank = []
    for rank in (0, 1):
        stream = build_stream(uneven_shards, tokenizer=tok, resolution=64, batch_size=4, steps_per_epoch=12,
                              shuffle_buffer=10, rank=rank, world_size=2, buckets=spec)
        batches = list(stream)
        per_rank.append(len(batches))
        for b in batches:
            n, _, h, w = b["pixels"].shape
            assert n == 4
            for t in b["time_ids"].tolist():  # (orig h, orig w, top, left, target h, w)
                assert assign(int(t[1]), int(t[0])) == (w, h) == (int(t[5]), int(t[4]))
    assert per_rank == [12, 12]


def test_too_small_and_extreme_images_are_skipped_and_counted(tmp_path):
    d = _folder(tmp_path, "ok", 8, seed=1, sizes=[(64, 64)])
    Image.new("RGB", (20, 20)).save(d / "tiny.png")     # x3.2 to cover 64x64 > max_upscale 2
    (d / "tiny.txt").write_text("a red picture")
    Image.new("RGB", (400, 40)).save(d / "strip.png")   # ratio 10
    (d / "strip.txt").write_text("a red picture")
    urls = write_folder_shards(d, tmp_path / "s", maxcount=100).shards
    tok = build_tokenizer(default_caption_corpus(), 300, 12)
    stream = build_stream(urls, tokenizer=tok, resolution=64, batch_size=2, steps_per_epoch=20, shuffle_buffer=0,
                          buckets=BucketSpec(resolution=64, step=16, max_upscale=2.0))
    skipped = {}
    for b in stream:
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped["too_small"] > 0 and skipped["bad_aspect"] > 0
    with pytest.raises(ValueError, match="resampled=true"):
        build_stream(urls, tokenizer=tok, resolution=64, batch_size=2, resampled=False,
                     buckets=BucketSpec(resolution=64, step=16))


def test_sdxl_unet_takes_the_batch_time_ids():
    from models.sdxl import FoundrySDXLUNet

    torch.manual_seed(0)
    unet = FoundrySDXLUNet(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                           attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
                           addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 24)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    plain = unet(x, 10, ctx).sample
    unet.micro_conditioning = torch.tensor([[300.0, 500, 12, 0, 64, 64]] * 2)
    cond = unet(x, 10, ctx).sample
    assert not torch.allclose(plain, cond)
    unet.micro_conditioning = None
    torch.testing.assert_close(unet(x, 10, ctx).sample, plain)


@pytest.mark.integration
@pytest.mark.distributed
def test_two_ddp_ranks_train_on_uneven_bucketed_shards_without_hanging(uneven_shards, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    env.pop("FOUNDRY_RUN_NAME", None)
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=b", "trainer.accelerator=cpu",
                                    "trainer.devices=2", "strategy=ddp", "logger=csv", "callbacks=none",
                                    f"data.urls=[{','.join(uneven_shards)}]", "model.resolution=64",
                                    "data.buckets.enabled=true", "data.buckets.step=16",
                                    "data.buckets.max_upscale=2.0", "data.batch_size=4", "data.steps_per_epoch=3",
                                    "trainer.max_steps=6")),
                         capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    assert json.loads((tmp_path / "b" / "summary.json").read_text())["global_step"] == 6  # two epochs, both ranks
