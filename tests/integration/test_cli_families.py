"""Model families through the real CLI: a tiny folder saved in the family's own layout trains with a LoRA, resumes,
and exports adapter files that the family's diffusers pipeline loads (and that change its output, as our merged
model does). Flux.1 runs in the default suite; the other families are `slow` (about a minute each)."""
import subprocess

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from models.components import build_components
from tests.conftest import cli, small

pytestmark = pytest.mark.integration

PRESETS = {"flux": "flux_micro", "sd3": "sd35_micro", "zimage": "zimage_micro", "qwen_image": "qwen_image_micro",
           "flux2": "flux2_klein_micro"}
UNGUIDED = {"zimage": {"guidance_scale": 0.0}, "sd3": {"guidance_scale": 1.0}, "flux2": {"guidance_scale": 1.0},
            "qwen_image": {"true_cfg_scale": 1.0}, "flux": {}}  # each plain pipeline's own way to say "no CFG"


def run(*args):
    return subprocess.run(cli(*small(*args)), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family", [
    "flux", *(pytest.param(f, marks=pytest.mark.slow) for f in ("sd3", "zimage", "qwen_image", "flux2"))])
def test_family_folder_lora_trains_resumes_and_exports(tmp_path, family):
    base = tmp_path / f"{family}-base"
    comps = build_components(preset=PRESETS[family])
    comps.save_pretrained(base)
    common = ["model=pretrained", f"model.pretrained={base}", "model.resolution=16", "adapter=lora", "adapter.rank=4",
              "optimizer.lr=0.05", f"paths.output_dir={tmp_path}", "run_name=lora", "model.preset=null"]
    res = run(*common, "trainer.max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(*common, "trainer.max_steps=4")
    assert res.returncode == 0 and "at step 2" in res.stdout + res.stderr, res.stderr[-3000:]
    out = tmp_path / "export"
    res = subprocess.run([*cli()[:-1], "train.ops.export", str(tmp_path / "lora"), str(out), "--no-ema"],
                         capture_output=True, text=True, timeout=300)  # the raw weights: 4 steps of EMA barely move
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    assert not (out / "base").exists()  # the base is the folder the run trained on

    pipe = DiffusionPipeline.from_pretrained(base)  # diffusers picks the family's pipeline from model_index.json
    kw = dict(prompt="a handwritten digit one", height=16, width=16, num_inference_steps=2, output_type="np",
              **comps.spec.pipeline_kwargs(comps), **UNGUIDED[family])
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out)
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(after - before).max() > 5e-4, "the trained LoRA does not change the output"  # noise: ~1e-5
    from train.build import load_pipeline

    ours = load_pipeline(tmp_path / "lora", use_ema=False, sampler="euler")
    mine = ours("a handwritten digit one", generator=torch.Generator().manual_seed(0), guidance_scale=1.0,
                num_inference_steps=2, output_type="np").images
    assert np.abs(mine - after).max() < 1e-4  # merged weights vs a separate LoRA path: float32 rounding only


def test_lora_over_a_quantized_swapped_base_resumes_and_exports_a_plain_adapter(tmp_path):
    """QLoRA-style (model.quantize=int8) with block swap: trains, resumes, and exports an unquantized adapter."""
    from safetensors.torch import load_file

    base = tmp_path / "flux-base"
    build_components(preset=PRESETS["flux"]).save_pretrained(base)
    common = ["model=pretrained", f"model.pretrained={base}", "model.resolution=16", "adapter=lora", "adapter.rank=4",
              "optimizer.lr=0.05", f"paths.output_dir={tmp_path}", "run_name=qlora", "model.preset=null",
              "model.quantize=int8", "model.block_swap=1"]
    assert (res := run(*common, "trainer.max_steps=2")).returncode == 0, res.stderr[-3000:]
    assert "quantized" in res.stdout + res.stderr and "block swap: 1 of 2 blocks" in res.stdout + res.stderr
    res = run(*common, "trainer.max_steps=4")
    assert res.returncode == 0 and "at step 2" in res.stdout + res.stderr, res.stderr[-3000:]
    out = tmp_path / "export"
    res = subprocess.run([*cli()[:-1], "train.ops.export", str(tmp_path / "qlora"), str(out), "--no-ema"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(t.dtype == torch.float32 for t in lora.values())
    res = run(*common, "adapter=none", "trainer.max_steps=1", "run_name=full")  # refused before anything is built
    assert res.returncode == 2 and "model.block_swap=1: block swap moves frozen weights" in res.stdout + res.stderr
    res = run(*common, "adapter=none", "model.block_swap=0", "trainer.max_steps=1", "run_name=full")
    assert res.returncode == 2 and "model.quantize=int8: a quantized base is frozen" in res.stdout + res.stderr


def test_bf16_mixed_full_training_samples_with_frozen_weights_in_bf16(tmp_path):
    """Under mixed precision the frozen encoders are held in bf16 (train/precision.py); sampling callbacks run under
    the same autocast, so a full fine-tune (fp32 denoiser, bf16 text encoders) samples and evaluates."""
    res = run("experiment=flux", "model.preset=flux_micro", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
              f"paths.output_dir={tmp_path}", "run_name=bf16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "bf16" / "samples" / "step_000002.png").is_file()
