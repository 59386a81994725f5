"""The DreamBooth-LoRA command on a tiny local pretrained pipeline, end to end: class images generated, only the
adapter trained and checkpointed, exports that diffusers loads (diffusers and kohya formats) and that sample the
same images as our own sampler."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.components import build_components
from models.export import export_pipeline
from tests.conftest import cli, small

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    base = export_pipeline(build_components(preset="micro", resolution=16), root / "base-model")
    inst = root / "instance"
    inst.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(inst / f"nine{i}.png")
    return root, base, inst


def run(*args):
    return subprocess.run(cli(*small(*args)), capture_output=True, text=True, timeout=400)


def sample(pipe, prompt="a sks digit"):
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe([prompt] * 2, num_inference_steps=4, guidance_scale=2.0, generator=gens, output_type="np").images


def test_dreambooth_lora_one_command_export_and_diffusers_load(setup_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    from train.build import load_pipeline

    root, base, inst = setup_dirs
    res = run(f"paths.output_dir={tmp_path}", "run_name=db", "experiment=dreambooth_lora",
              f"data.instance_dir={inst}", "data.instance_prompt=a sks digit", "data.class_prompt=a digit",
              f"model.pretrained={base}", "data.num_class_images=4", "data.class_generation.steps=2",
              "data.batch_size=2", "trainer.max_steps=3", "optimizer.lr=1e-2", "adapter.rank=2", "adapter.alpha=4",
              "callbacks.sample_images.every_n_steps=3", "callbacks.sample_images.num_inference_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "db"
    assert len(list((run_dir / "dreambooth-data" / "class_images").glob("*.png"))) == 4
    assert list((run_dir / "samples").glob("step_*.png"))

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys), "the frozen base must not be in the checkpoint"
    adam_state = ckpt["optimizer_states"][0]["state"]
    assert sum(v["exp_avg"].numel() for v in adam_state.values()) == sum(ckpt["state_dict"][k].numel() for k in keys)

    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "train.ops.export", str(run_dir), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    assert not (out / "base").exists(), "the base is a diffusers folder already: no copy"

    ours = sample(load_pipeline(run_dir / "checkpoints" / "last.ckpt"))
    plain = DiffusionPipeline.from_pretrained(base, trust_remote_code=True)
    plain.set_progress_bar_config(disable=True)
    before = sample(plain)
    plain.load_lora_weights(out)
    theirs = sample(plain)
    assert np.abs(theirs - before).max() > 1e-3, "the LoRA must change the base pipeline's output"
    assert np.abs(theirs - ours).max() < 2e-3, "diffusers + our LoRA file must sample what our sampler samples"

    kohya_pipe = DiffusionPipeline.from_pretrained(base, trust_remote_code=True)
    kohya_pipe.set_progress_bar_config(disable=True)
    kohya_pipe.load_lora_weights(str(out), weight_name="lora_kohya.safetensors")
    assert np.abs(sample(kohya_pipe) - ours).max() < 2e-3, "the kohya file must load with its alpha"

    merged = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-m", "train.ops.export", str(run_dir), str(merged), "adapter.merge=true"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    full = DiffusionPipeline.from_pretrained(merged, trust_remote_code=True)
    full.set_progress_bar_config(disable=True)
    assert np.abs(sample(full) - ours).max() < 2e-3
    assert not any("lora" in k for k in load_file(str(merged / "unet" / "diffusion_pytorch_model.safetensors")))


def test_prompt_without_identifier_fails_before_training(setup_dirs, tmp_path):
    _, base, inst = setup_dirs
    res = run(f"paths.output_dir={tmp_path}", "experiment=dreambooth_lora", f"data.instance_dir={inst}",
              "data.instance_prompt=a digit", "data.class_prompt=a digit", f"model.pretrained={base}")
    assert res.returncode == 2
    assert "data.instance_prompt 'a digit' has no identifier" in res.stdout + res.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
