"""Bad data never crashes a run: it is skipped or converted by stated rules and counted by reason."""

from __future__ import annotations

import importlib.util
import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import batch as batch_mod
from data.batch import SKIP_REASONS
from data.transforms import BadSample, decode_caption, load_image
from data.webdataset import StreamLoader, build_stream, expand_urls

_spec = importlib.util.spec_from_file_location(
    "test_data_helpers", Path(__file__).parents[1] / "unit" / "test_data_helpers.py"
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.fixture(scope="module")
def tokenizer():
    return helpers.make_tokenizer()


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def one_pass(urls, tokenizer, **kw):
    args = dict(tokenizer=tokenizer, resolution=8, batch_size=4, resampled=False, shuffle_buffer=0,
                caption_dropout=0.0)
    args.update(kw)
    return list(build_stream(urls, **args))


# --- conversion rules ---------------------------------------------------------------------------------


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(encode(rgba))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    la = load_image(encode(Image.new("LA", (2, 2), (0, 0))))
    assert la.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30])
    pal.info["transparency"] = 0
    assert load_image(encode(pal, transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_16bit_and_gray_become_rgb():
    cmyk = load_image(encode(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), "JPEG"))
    r, g, b = cmyk.getpixel((1, 1))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    sixteen = load_image(encode(Image.fromarray(arr)))
    assert [sixteen.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    assert load_image(encode(Image.new("L", (2, 2), 9))).getpixel((0, 0)) == (9, 9, 9)
    assert load_image(encode(Image.new("1", (2, 2), 1), "BMP")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert load_image(encode(img, "JPEG", exif=exif.tobytes())).size == (2, 4)


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n garbage", b"GIF89a", b"\x00" * 100])
def test_undecodable_bytes_raise_bad_sample(data):
    with pytest.raises(BadSample) as err:
        load_image(data)
    assert err.value.reason == "decode"


def test_caption_rules():
    assert decode_caption(b"\xef\xbb\xbf  seven \n") == "seven"
    assert decode_caption(None, allow_missing=True) == ""
    for value, reason in [(None, "no_caption"), (b"\xff\xfe\xfa", "bad_caption"), (b"a\x00b", "bad_caption")]:
        with pytest.raises(BadSample) as err:
            decode_caption(value)
        assert err.value.reason == reason


# --- the stream -----------------------------------------------------------------------------------------


def mixed_samples() -> list[dict]:
    """One shard of every kind of trouble, with the expected fate of each sample."""
    good = helpers.good_sample
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    return [
        good("00_good"),
        {"__key__": "01_corrupt", "png": b"\x89PNG\r\n\x1a\nnot really", "txt": "x"},
        {"__key__": "02_empty", "jpg": b"", "txt": "x"},
        {"__key__": "03_nocap", "png": helpers.image_bytes()},
        {"__key__": "04_badutf8", "png": helpers.image_bytes(), "txt": b"\xff\xfe caption"},
        {"__key__": "05_cmyk", "jpg": helpers.image_bytes(mode="CMYK", fmt="JPEG"), "txt": "cmyk"},
        {"__key__": "06_16bit", "png": helpers.image_bytes(mode="I;16"), "txt": "sixteen"},
        {"__key__": "07_rgba", "png": encode(rgba), "txt": "transparent"},
        {"__key__": "08_noimage", "txt": "caption only", "json": {"a": 1}},
        {"__key__": "09_tiny", "png": helpers.image_bytes(size=(3, 3)), "txt": "tiny"},
        {"__key__": "10_badjson", "png": helpers.image_bytes(), "txt": "ok", "json": b"{not json"},
        good("11_good"),
    ]


EXPECTED_SKIPS = {"decode": 2, "no_image": 1, "no_caption": 1, "bad_caption": 1, "too_small": 1}


def test_mixed_shard_is_skipped_or_converted(tmp_path, tokenizer, caplog):
    shard = helpers.write_shard(tmp_path / "mixed.tar", mixed_samples())
    with caplog.at_level(logging.WARNING, logger="data"):
        batches = one_pass(shard, tokenizer, min_size=4)
    keys = [k.rsplit("/", 1)[1] for b in batches for k in b["keys"]]
    assert keys == ["00_good", "05_cmyk", "06_16bit", "07_rgba", "10_badjson", "11_good"]
    skips = helpers.sum_skips(batches)
    assert set(skips) == set(SKIP_REASONS)  # every reason reported, so a metric never disappears mid-run
    assert {reason: n for reason, n in skips.items() if n} == EXPECTED_SKIPS
    by_key = {k.rsplit("/", 1)[1]: (b, i) for b in batches for i, k in enumerate(b["keys"])}
    batch, i = by_key["07_rgba"]
    assert (batch["pixels"][i] == 1.0).all()  # transparent -> white
    batch, i = by_key["10_badjson"]
    assert batch["meta"][i] == {}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 5 and sum("(decode)" in m for m in warned) == 1  # once per reason, not per sample


def test_truncated_member_and_missing_or_garbage_shards(tmp_path, tokenizer):
    samples = [helpers.good_sample(f"{i:03d}", seed=i) for i in range(10)]
    full = Path(helpers.write_shard(tmp_path / "full.tar", samples))
    data = full.read_bytes()
    cut = data.index(b"005.png") + 512 + 100  # inside the data of the 6th sample's png member
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:cut])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(random.Random(0).randbytes(3000))
    deleted = tmp_path / "deleted.tar"
    deleted.write_bytes(data)
    urls = [str(truncated), str(garbage), str(deleted), str(full)]
    stream = build_stream(urls, tokenizer=tokenizer, resolution=8, batch_size=3, resampled=False, shuffle_buffer=0)
    deleted.unlink()  # disappears between url expansion and reading
    batches = list(stream)
    keys = [k for b in batches for k in b["keys"]]
    assert len([k for k in keys if k.startswith(str(truncated))]) == 5
    assert len([k for k in keys if k.startswith(str(full))]) == 10
    skips = helpers.sum_skips(batches)
    assert skips["read"] >= 3 and sum(skips.values()) == skips["read"]


def test_truncated_shard_never_lends_members_to_the_next(tmp_path, tokenizer):
    """Stock webdataset would merge the half-read sample 005 with the next shard's 005."""
    first = [helpers.good_sample(f"{i:03d}", caption="a handwritten digit one", seed=i) for i in range(8)]
    data = Path(helpers.write_shard(tmp_path / "a.tar", first)).read_bytes()
    cut = data.index(b"005.txt") + 512 + 5  # json and png of 005 read, its txt truncated
    (tmp_path / "a.tar").write_bytes(data[:cut])
    second = [helpers.good_sample(f"{i:03d}", caption="a handwritten digit two", seed=100 + i) for i in range(5, 8)]
    helpers.write_shard(tmp_path / "b.tar", second)
    batches = one_pass([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], tokenizer, batch_size=1)
    got = {b["keys"][0].replace(str(tmp_path) + "/", ""): b["captions"][0] for b in batches}
    assert got == {**{f"a.tar/{i:03d}": "a handwritten digit one" for i in range(5)},
                   **{f"b.tar/{i:03d}": "a handwritten digit two" for i in range(5, 8)}}
    assert helpers.sum_skips(batches)["read"] >= 1


def test_fuzzed_shard_never_crashes(tmp_path, tokenizer):
    rng = random.Random(1234)
    members = ["png", "jpg", "webp", "txt", "json", "cls", "bmp"]
    samples = []
    for i in range(50):
        sample = {"__key__": f"fuzz{i:03d}"}
        for key in rng.sample(members, rng.randint(0, len(members))):
            sample[key] = rng.randbytes(rng.choice([0, 1, 16, 300, 2000]))
        if rng.random() < 0.3:  # some real images so batches do form
            sample = {"__key__": sample["__key__"], "png": helpers.image_bytes(seed=i), "txt": "fine"}
        if len(sample) == 1:
            sample["cls"] = b"1"
        samples.append(sample)
    shard = helpers.write_shard(tmp_path / "fuzz.tar", samples)
    raw = Path(shard).read_bytes()
    (tmp_path / "fuzz-flipped.tar").write_bytes(bytes(b ^ 0xFF if rng.random() < 0.001 else b for b in raw))
    batches = one_pass([shard, str(tmp_path / "fuzz-flipped.tar")], tokenizer)
    good = sum(len(b["keys"]) for b in batches)
    assert good > 10 and good + sum(helpers.sum_skips(batches).values()) >= 50


def test_unreadable_data_fails_loudly_instead_of_spinning(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(batch_mod, "MAX_CONSECUTIVE_SKIPS", 50)
    shard = helpers.write_shard(tmp_path / "bad.tar", [{"__key__": f"{i}", "png": b"x", "txt": "x"} for i in range(5)])
    stream = build_stream(shard, tokenizer=tokenizer, resolution=8, batch_size=2, steps_per_epoch=2)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        list(stream)


def test_urls_in_data_are_never_opened(tmp_path, tokenizer):
    marker = tmp_path / "pwned"
    evil = {"__key__": "evil", "png": helpers.image_bytes(), "txt": "x",
            "json": {"url": f"pipe:touch {marker}", "__url__": f"pipe:touch {marker}"}}
    batches = one_pass(helpers.write_shard(tmp_path / "evil.tar", [evil]), tokenizer)
    assert len(batches) == 1 and not marker.exists()


def test_shard_files_named_like_commands_stay_files(tmp_path, tokenizer, monkeypatch):
    """`pipe:` URLs come only from what the user wrote: a file named "pipe:..." that a glob or folder finds is a file."""
    marker = tmp_path / "pwned"
    helpers.write_shard(tmp_path / f"pipe:touch {marker.name};.tar", [helpers.good_sample("a", seed=0)])
    monkeypatch.chdir(tmp_path)
    for urls in ("*.tar", ".", str(tmp_path)):
        expanded = expand_urls(urls)
        assert expanded and all(not u.startswith("pipe:") for u in expanded)
        one_pass(expanded, tokenizer)
    assert not marker.exists()


def test_skip_counts_travel_through_worker_batches(tmp_path, tokenizer):
    """Two DataLoader workers, one shard each: every skip reaches the main process inside a batch."""
    urls = []
    for s in range(2):
        samples = [helpers.good_sample(f"{s}_{i:02d}a", seed=i) for i in range(4)]
        samples += [{"__key__": f"{s}_{i:02d}b", "png": b"junk", "txt": "x"} for i in range(3)]
        samples += [{"__key__": f"{s}_{i:02d}c", "png": helpers.image_bytes()} for i in range(2)]
        samples += [helpers.good_sample(f"{s}_{i:02d}d", seed=i) for i in range(4)]
        urls.append(helpers.write_shard(tmp_path / f"w{s}.tar", samples))
    stream = build_stream(urls, tokenizer=tokenizer, resolution=8, batch_size=4, resampled=False, shuffle_buffer=0)
    batches = list(StreamLoader(stream, batch_size=None, num_workers=2, persistent_workers=False))
    assert sum(len(b["keys"]) for b in batches) == 16
    skips = helpers.sum_skips(batches)
    assert skips["decode"] == 6 and skips["no_caption"] == 4 and sum(skips.values()) == 10
    assert {b["keys"][0].split("/")[-2] for b in batches} == {"w0.tar", "w1.tar"}
