"""Model families through the real CLI: a tiny folder saved in the family's own layout trains with a LoRA, resumes,
and exports adapter files that the family's diffusers pipeline loads (and that change its output)."""
import subprocess

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from models.components import build_components
from tests.conftest import cli, small

pytestmark = pytest.mark.integration


def run(*args):
    return subprocess.run(cli(*small(*args)), capture_output=True, text=True, timeout=300)


def test_flux_folder_lora_trains_resumes_and_exports(tmp_path):
    base = tmp_path / "flux-base"
    build_components(preset="flux_micro").save_pretrained(base)
    common = ["model=pretrained", f"model.pretrained={base}", "adapter=lora", "adapter.rank=4",
              "optimizer.lr=0.02", f"paths.output_dir={tmp_path}", "run_name=flora", "model.preset=null"]
    res = run(*common, "trainer.max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run(*common, "trainer.max_steps=4")
    assert res.returncode == 0 and "at step 2" in res.stdout + res.stderr, res.stderr[-3000:]
    out = tmp_path / "export"
    res = subprocess.run([*cli()[:-1], "train.ops.export", str(tmp_path / "flora"), str(out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    assert not (out / "base").exists()  # the base is the folder the run trained on

    pipe = FluxPipeline.from_pretrained(base)
    kw = dict(height=16, width=16, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=12,
              output_type="np")
    before = pipe("a handwritten digit one", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out)
    after = pipe("a handwritten digit one", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(after - before).max() > 1e-2, "the trained LoRA does not change the output"
    from train.build import load_pipeline

    ours = load_pipeline(tmp_path / "flora", use_ema=False, sampler="euler")
    mine = ours("a handwritten digit one", generator=torch.Generator().manual_seed(0), guidance_scale=1.0,
                num_inference_steps=2, output_type="np").images
    assert np.abs(mine - after).max() < 1e-3  # merged weights vs a separate LoRA path: float32 rounding only
