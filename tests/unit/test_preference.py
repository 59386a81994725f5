"""Preference data and the DPO loss: pair shards round-trip with one augmentation for both images, bad pairs are
skipped by reason, and the loss matches a hand computation (log 2 and zero margin when policy = reference)."""
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data.preference import write_pair_shards
from train.ops.shards import main as shards_main
from data.webdataset import build_stream
from models.tiny import build_preset
from train.diffusion import preference_loss


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_dpo_loss_hand_computed_and_equal_policy_gives_log2():
    e_w, e_l = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.1])
    r_w, r_l = torch.tensor([0.3, 0.5]), torch.tensor([0.3, 0.2])
    out = preference_loss(e_w, e_l, r_w, r_l, beta=10.0)
    # pair 0: -5 * ((0.2-0.3) - (0.4-0.3)) = 1.0 ; pair 1: -5 * ((0.5-0.5) - (0.1-0.2)) = -0.5
    assert torch.allclose(out["reward_margin"], torch.tensor([1.0, -0.5]))
    assert torch.allclose(out["loss"], torch.tensor([math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]))
    assert out["implicit_acc"].tolist() == [1.0, 0.0]
    same = preference_loss(e_w, e_l, e_w, e_l, beta=5000.0)
    assert torch.allclose(same["loss"], torch.full((2,), math.log(2.0))) and same["reward_margin"].abs().max() == 0
    tie = preference_loss(e_w, e_l, r_w, r_l, beta=10.0, tie=torch.tensor([True, False]))
    assert tie["loss"][0] == pytest.approx(0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))))
    sft = preference_loss(e_w, e_l, r_w, r_l, beta=10.0, sft_weight=2.0)  # + 2 x the winner's own error
    assert torch.allclose(sft["loss"], out["loss"] + 2.0 * e_w)
    assert torch.equal(sft["reward_margin"], out["reward_margin"])


def test_dpo_method_with_policy_equal_to_reference_gives_log2(tiny_cfg):
    from train.build import build_module

    module = build_module(tiny_cfg("method=dpo", "adapter=lora"))  # fresh LoRA: policy == base exactly
    ids = module.components.tokenizer(["a handwritten digit one"] * 3, padding="max_length", max_length=12,
                                      return_tensors="pt").input_ids
    batch = {"pixels": torch.rand(3, 3, 16, 16) * 2 - 1, "pixels_lose": torch.rand(3, 3, 16, 16) * 2 - 1,
             "input_ids": ids}
    module.noise_generator.manual_seed(0)
    out = module.method.loss(batch, module)
    assert torch.allclose(out["loss"], torch.full((3,), math.log(2.0)), atol=1e-6)
    assert out["reward_margin"].abs().max() < 1e-6


def pair_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_pair_stream_same_augmentation_winner_first_and_bad_pairs_counted(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(128, 256, (24, 20, 3), dtype=np.uint8)  # bright: the preferred image
    b = 255 - a  # the loser is the negative of the winner: identical crops/flips keep that exact relation
    good = [(f"{i:03d}", {"txt": b"a digit", "png_0": png(b), "png_1": png(a), "json": b'{"label_0": 0}'})
            for i in range(6)]
    bad = [("b1", {"txt": b"a digit", "png_0": png(a), "json": b'{"label_0": 1}'}),            # missing image 1
           ("b2", {"txt": b"a digit", "png_0": png(a), "png_1": png(b), "json": b'{"label_0": 7}'}),  # bad label
           ("b3", {"txt": b"\xff\xfe\x00bad", "png_0": png(a), "png_1": png(b), "json": b'{"label_0": 1}'}),
           ("b4", {"txt": b"a digit", "png_0": png(a), "png_1": png(b), "json": b'{"label_0": 0.5}'})]  # tie, dropped
    pair_tar(tmp_path / "pairs-000000.tar", good[:3] + bad + good[3:])
    stream = build_stream(str(tmp_path / "pairs-000000.tar"), tokenizer=build_preset("micro", 16)[2], resolution=16,
                          batch_size=6, caption_dropout=0.0, center_crop=False, random_flip=True, shuffle_buffer=0,
                          resampled=False, kind="pair", rank=0, world_size=1)
    batch = next(iter(stream))
    assert batch["pixels"].shape == batch["pixels_lose"].shape == (6, 3, 16, 16)
    assert torch.allclose(batch["pixels"], -batch["pixels_lose"], atol=1e-5), "one crop/flip for both images"
    assert (batch["pixels"].flatten(1).mean(1) > 0).all(), "label_0 = 0: image 1 (the bright one) is the winner"
    assert batch["skipped"]["no_image"] == 1 and batch["skipped"]["bad_label"] == 1
    assert batch["skipped"]["bad_caption"] == 1 and batch["skipped"]["tie"] == 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_foundry_shards_pairs_from_a_table(tmp_path, fmt, capsys):
    img = np.full((16, 16, 3), 40, np.uint8)
    for name in ("a.png", "b.png"):
        Image.fromarray(img).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"caption": "a digit", "image_0": "a.png", "image_1": "b.png", "label_0": 1},
            {"caption": "a digit", "image_0": "a.png", "image_1": "missing.png", "label_0": 0},
            {"caption": "a digit", "image_0": "a.png", "image_1": "broken.png", "label_0": 0},
            {"caption": "a digit", "image_0": "a.png", "image_1": "b.png", "label_0": "best"}]
    table = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        table.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        table.write_text("caption,image_0,image_1,label_0\n" + "\n".join(
            f"{r['caption']},{r['image_0']},{r['image_1']},{r['label_0']}" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{**r, "label_0": str(r["label_0"])} for r in rows]), table)
    assert shards_main(["pairs", str(table), "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out
    assert "wrote 1 pairs" in line and "no_image=1" in line and "decode=1" in line and "bad_label=1" in line
    result = write_pair_shards(table, tmp_path / "out2")
    assert result["written"] == 1 and len(result["shards"]) == 1
