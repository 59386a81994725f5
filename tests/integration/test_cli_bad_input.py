"""Bad input through the real CLI: one clear line naming the input and the fix, or skip-and-count."""
import io
import json
import os
import subprocess

import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import cli, small

pytestmark = pytest.mark.integration


def run_cli(*args):
    return subprocess.run(cli(*small(*args)), capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_nonexistent_shard_path_fails_early_with_one_line(tmp_path):
    res = run_cli(f"paths.output_dir={tmp_path}", "data.urls='/no/such/shards-{000..003}.tar'")
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert "data.urls: no shard at '/no/such/shards-000.tar'" in out and "foundry-shards" in out
    assert "Traceback" not in out


def test_model_folder_without_subfolders_fails_early(tmp_path):
    (tmp_path / "model" / "unet").mkdir(parents=True)
    res = run_cli(f"paths.output_dir={tmp_path}", f"model.pretrained={tmp_path / 'model'}")
    assert res.returncode == 2
    assert "lacks subfolder(s) text_encoder, tokenizer, scheduler" in res.stdout + res.stderr


def test_unknown_config_key_is_rejected_by_name(tmp_path):
    res = run_cli(f"paths.output_dir={tmp_path}", "trainer.max_stepz=3")
    assert res.returncode != 0
    assert "max_stepz" in res.stderr and "not in struct" in res.stderr
    assert not any(tmp_path.iterdir()), "a rejected config must not start any work"


def test_corrupt_png_in_shard_is_skipped_and_counted(tmp_path):
    shard = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(40):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 6, 0, 0)).save(buf, format="PNG")
            png = buf.getvalue() if i % 10 else b"\x89PNG\r\n\x1a\nthis is not a png"
            sink.write({"__key__": f"s{i:03d}", "png": png, "txt": f"a handwritten digit {i % 10}",
                        "json": json.dumps({"label": i % 10}).encode()})
    res = run_cli(f"paths.output_dir={tmp_path}", "run_name=corrupt", f"data.urls={shard}", "callbacks=none",
                  "trainer.max_steps=6")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "corrupt" / "summary.json").read_text())
    assert summary["data/skipped"] >= 1
