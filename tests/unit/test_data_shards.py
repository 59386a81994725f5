"""Shard writers (digits, folder layouts), the foundry-shards CLI and URL expansion."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data import digits as digits_mod
from data.digits import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    NUM_DIGITS,
    caption_for,
    default_digits_dir,
    digit_images,
    ensure_digits_shards,
    eval_prompt,
    write_digits_shards,
)
from train.ops.shards import main as shards_main
from data.shards import write_folder_shards
from data.webdataset import BUILD_HINT, expand_urls


def read_samples(urls: list[str]) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def png(size=(24, 16), color=(200, 10, 10), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


# --- digits -------------------------------------------------------------------------------------


def test_captions_and_prompts():
    assert caption_for(7) == "a handwritten digit seven" == eval_prompt(7)
    assert 3 <= len(CAPTION_TEMPLATES) <= 4
    assert all(DIGIT_WORDS[3] in caption_for(3, j) for j in range(len(CAPTION_TEMPLATES)))


def test_digit_images_resolution():
    images, labels = digit_images(32)
    assert len(images) == len(labels) == NUM_DIGITS
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    assert set(labels.tolist()) == set(range(10))


def test_digits_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "digits"
    assert shards_main(["digits", "--out", str(out), "--maxcount", "500"]) == 0
    line = capsys.readouterr().out.strip()
    assert "wrote 1797 samples in 4 shard(s)" in line and "\n" not in line
    shards = sorted(str(p) for p in out.glob("digits-*.tar"))
    assert [Path(s).name for s in shards] == [f"digits-{i:06d}.tar" for i in range(4)]
    samples = read_samples(shards)
    assert len(samples) == NUM_DIGITS
    templates = set()
    for s in samples:
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        assert caption == caption_for(meta["label"], meta["template"])
        assert DIGIT_WORDS[meta["label"]] in caption.replace(",", " ").split()
        templates.add(meta["template"])
    assert templates == set(range(len(CAPTION_TEMPLATES)))
    img = Image.open(io.BytesIO(samples[0]["png"]))
    assert img.size == (16, 16) and img.mode == "RGB"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_digits_shards_are_reproducible(tmp_path):
    a = write_digits_shards(tmp_path / "a", maxcount=1000)
    b = write_digits_shards(tmp_path / "b", maxcount=1000)
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]


def test_default_dir_and_ensure_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("FOUNDRY_CACHE", raising=False)
    assert default_digits_dir(32) == Path.home() / ".cache" / "diffusion-foundry" / "digits-32"
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path))
    assert default_digits_dir(16) == tmp_path / "digits-16"
    url = ensure_digits_shards(16)
    assert url == str(tmp_path / "digits-16" / "digits-*.tar")
    assert len(expand_urls(url)) == 8

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(digits_mod, "write_digits_shards", must_not_rebuild)
    assert ensure_digits_shards(16) == url


def test_losing_a_build_race_uses_the_winner(tmp_path):
    out = tmp_path / "digits-16"
    winner = write_digits_shards(out, maxcount=1000)
    stamp = os.stat(winner[0]).st_ino
    loser = write_digits_shards(out, maxcount=1000, overwrite=False)  # finishes second: keeps the winner's
    assert loser == winner and os.stat(winner[0]).st_ino == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-16"]


# --- folder ---------------------------------------------------------------------------------------


def test_folder_txt_layout(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png())
    (src / "a.txt").write_text("a red square\n")
    (src / "b.jpeg").write_bytes(png(fmt="JPEG"))
    (src / "b.txt").write_text("a jpeg")
    (src / "sub" / "c.webp").write_bytes(png(fmt="WEBP"))  # no caption
    (src / "d.png").write_bytes(b"not an image")
    (src / "d.txt").write_text("broken")
    (src / "notes.md").write_text("ignored")
    out = tmp_path / "out"
    assert shards_main(["folder", str(src), "--out", str(out), "--maxcount", "2", "--prefix", "sq"]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 samples in 2 shard(s)" in captured.out and "decode=1" in captured.out
    assert "no caption" in captured.err and "c.webp" in captured.err
    samples = read_samples(sorted(str(p) for p in out.glob("sq-*.tar")))
    assert [json.loads(s["json"])["file_name"] for s in samples] == ["a.png", "b.jpeg", "sub/c.webp"]
    assert samples[0]["png"] == (src / "a.png").read_bytes()  # stored as-is
    assert samples[1]["jpg"] == (src / "b.jpeg").read_bytes()  # .jpeg -> jpg key
    assert "webp" in samples[2]
    assert [s["txt"].decode() for s in samples] == ["a red square", "a jpeg", ""]
    assert len({s["__key__"] for s in samples}) == 3


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_folder_metadata_layouts(tmp_path, layout):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    (src / "imgs" / "x.png").write_bytes(png())
    (src / "y.jpg").write_bytes(png(fmt="JPEG"))
    rows = [
        {"file_name": "imgs/x.png", "text": "first, with a comma", "score": "5"},
        {"file_name": "y.jpg", "text": "second", "score": "7"},
        {"file_name": "missing.png", "text": "gone", "score": "1"},
    ]
    if layout == "jsonl":
        (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        lines = ["file_name,text,score"] + [f'{r["file_name"]},"{r["text"]}",{r["score"]}' for r in rows]
        (src / "metadata.csv").write_text("\n".join(lines) + "\n")
    summary = write_folder_shards(src, tmp_path / "out")
    assert summary.written == 2 and summary.skipped["read"] == 1
    samples = read_samples(summary.shards)
    assert [s["txt"].decode() for s in samples] == ["first, with a comma", "second"]
    assert json.loads(samples[0]["json"]) == {"file_name": "imgs/x.png", "score": "5"}
    assert "png" in samples[0] and "jpg" in samples[1]


def test_folder_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as err:
        shards_main(["folder", str(empty), "--out", str(tmp_path / "o")])
    msg = str(err.value)
    assert "has no images (jpg/png/webp/bmp)" in msg and str(empty) in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="is not a directory"):
        shards_main(["folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    (empty / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{broken\n')
    with pytest.raises(SystemExit, match=r"metadata.jsonl:2 is not valid JSON"):
        shards_main(["folder", str(empty), "--out", str(tmp_path / "o")])


def test_folder_refuses_to_mix_with_old_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    out = tmp_path / "out"
    write_folder_shards(src, out)
    with pytest.raises(ValueError, match="--overwrite"):
        write_folder_shards(src, out)
    assert len(write_folder_shards(src, out, overwrite=True).shards) == 1


# --- url expansion ----------------------------------------------------------------------------------


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        (d / f"s-{i:03d}.tar").write_bytes(b"")
    (d / "readme.txt").write_text("not a shard")
    return d


def test_expand_brace_glob_dir_list(shard_dir):
    names = [str(shard_dir / f"s-{i:03d}.tar") for i in range(3)]
    assert expand_urls(str(shard_dir / "s-{000..002}.tar")) == names
    assert expand_urls(str(shard_dir / "*.tar")) == names
    assert expand_urls(str(shard_dir)) == names
    assert expand_urls([names[2], str(shard_dir / "s-00[01].tar")]) == [names[2], *names[:2]]
    assert expand_urls(f"{names[0]}::{names[1]}") == names[:2]


def test_expand_remote_urls():
    assert expand_urls("pipe:cat /x/a.tar") == ["pipe:cat /x/a.tar"]
    assert expand_urls("s3://bucket/data/s-{0..1}.tar") == [
        "pipe:aws s3 cp s3://bucket/data/s-0.tar -",
        "pipe:aws s3 cp s3://bucket/data/s-1.tar -",
    ]
    assert expand_urls(["https://host/a.tar"]) == ["pipe:curl -s -L https://host/a.tar"]
    assert expand_urls("https://host/a.tar?x=1&y=2") == ["pipe:curl -s -L 'https://host/a.tar?x=1&y=2'"]


def test_missing_paths_fail_in_one_line(tmp_path, shard_dir):
    missing = tmp_path / "nope" / "s-000.tar"
    with pytest.raises(FileNotFoundError) as err:
        expand_urls(str(missing))
    assert str(err.value) == f"data.urls: no shard at '{missing}'. {BUILD_HINT}"
    with pytest.raises(FileNotFoundError, match="no shard at"):
        expand_urls(str(shard_dir / "s-{000..005}.tar"))  # some exist, some do not
    with pytest.raises(FileNotFoundError, match="no shard at"):
        expand_urls(str(tmp_path / "*.tar"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        expand_urls(str(empty))
    assert "no .tar shards in directory" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        expand_urls([])
