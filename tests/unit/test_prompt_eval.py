"""foundry-eval beyond the digits world: prompt files, rewards, FID/KID on a local feature network, the held-out
denoising loss at fixed draws, the run's eval/ file for foundry-report, and one-line errors."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from data.digits import digit_images, ensure_digits_shards
from tests.conftest import cli, small
from train.build import build_module
from models.components import build_components
from models.export import export_pipeline
from train.ops.report import main as report
from train.ops.evaluate import main as foundry_eval
from train.prompt_eval import ImageFeatures, fid_kid, heldout_loss, read_prompts


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("clipfeat")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=16),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=4),
                         projection_dim=8)).save_pretrained(root)
    return root


def test_prompt_files_in_every_format_and_named_sets(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\na cat\n\n  a dog  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"caption": "a dog"}\n')
    (tmp_path / "p.json").write_text('["a cat", "a dog"]')
    for name in ("p.txt", "p.jsonl", "p.json"):
        assert read_prompts(str(tmp_path / name)) == ["a cat", "a dog"]
    assert len(read_prompts("digits")) == 10
    with pytest.raises(FileNotFoundError, match="--prompts: 'nope.txt' is neither a file nor a named set"):
        read_prompts("nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))


def test_fid_and_kid_rank_a_near_copy_above_noise(clip_folder):
    feats = ImageFeatures(f"clip:{clip_folder}")
    images, _ = digit_images(16)
    real = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype="float32"))
                        .permute(2, 0, 1) / 127.5 - 1 for im in images[:96]])
    g = torch.Generator().manual_seed(0)
    near = (real.roll(1, dims=-1) + 0.05 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    noise = torch.rand(real.shape, generator=g) * 2 - 1
    same, close, far = fid_kid(real, real, feats), fid_kid(real, near, feats), fid_kid(real, noise, feats)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3
    assert far["fid"] > close["fid"] > same["fid"] and far["kid"] > close["kid"]
    with pytest.raises(ValueError, match="should be clip:FOLDER"):
        ImageFeatures("vgg:/x")


def test_heldout_loss_uses_the_same_draws_every_call(tiny_cfg):
    module = build_module(tiny_cfg()).eval()
    urls = ensure_digits_shards(16)
    a = heldout_loss(module, urls, 16, [100, 900], batches=2, batch_size=8)
    b = heldout_loss(module, urls, 16, [100, 900], batches=2, batch_size=8)
    assert a == b and set(a) == {"heldout_loss_t100", "heldout_loss_t900", "heldout_loss"}
    assert a["heldout_loss_t100"] != a["heldout_loss_t900"]
    with torch.no_grad():  # another model gets another loss on the same draws
        next(module.unet.parameters()).add_(0.5)
    assert heldout_loss(module, urls, 16, [100, 900], batches=2, batch_size=8) != a


def test_foundry_eval_on_prompts_writes_metrics_and_fails_in_one_line(tmp_path, clip_folder, capsys):

    export = export_pipeline(build_components(preset="micro", resolution=16), tmp_path / "export")
    (tmp_path / "prompts.txt").write_text("a handwritten digit three\na handwritten digit seven\n")
    real = tmp_path / "real"
    real.mkdir()
    for i, im in enumerate(digit_images(16)[0][:8]):
        im.save(real / f"{i}.png")
    out = tmp_path / "m.json"
    rc = foundry_eval([str(export), "--prompts", str(tmp_path / "prompts.txt"), "--per-prompt", "2", "--steps", "2",
                       "--guidance", "1", "--reward", "jpeg_compressibility", "--real", str(real),
                       "--features", f"clip:{clip_folder}", "--out", str(out), "--images", str(tmp_path / "imgs")])
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert {"eval/jpeg_compressibility_g1", "eval/fid_g1", "eval/kid_g1"} <= set(m) and m["eval/images_per_scale"] == 4
    assert len(list((tmp_path / "imgs" / "g1").glob("*.png"))) == 4
    for argv, msg in ((["--reward", "pickscore"], "--reward: 'pickscore' needs its weights"),
                      (["--reward", "nosuch"], "--reward: 'nosuch' is not one of"),
                      (["--heldout", "x.tar"], "--heldout: needs a checkpoint or a run"),
                      (["--real", str(real)], "--real and --features go together")):
        assert foundry_eval([str(export), "--prompts", "digits", "--steps", "1", "--per-prompt", "1", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the loaders' progress bars)
        assert err.startswith("foundry-eval: ") and msg in err


def test_prompt_eval_callback_logs_rewards_and_heldout_loss_and_report_shows_them(tmp_path):

    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=pe", "trainer.max_steps=2",
                                    "callbacks.digits_eval.enabled=false", "callbacks.prompt_eval.enabled=true",
                                    "callbacks.prompt_eval.per_prompt=1", "callbacks.prompt_eval.num_inference_steps=2",
                                    "callbacks.prompt_eval.guidance_scales=[2.0]",
                                    "callbacks.prompt_eval.rewards=[{_target_:train.rewards.JpegSize}]",
                                    f"callbacks.prompt_eval.heldout={ensure_digits_shards(16)}",
                                    "callbacks.prompt_eval.timesteps=[500]", "callbacks.prompt_eval.heldout_batches=1")),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "pe" / "eval" / "prompts_step_000002.json").read_text())
    assert m["eval/jpeg_compressibility_g2"] < 0 and m["eval/heldout_loss_t500"] > 0 and m["trainer/global_step"] == 2
    assert report([str(tmp_path / "pe"), "--out", str(tmp_path / "r.png")]) == 0
