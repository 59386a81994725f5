"""Few-step students leave the platform as diffusers pipelines with LCMScheduler: the exported LCM student and the
LCM-LoRA (on the teacher pipeline) sample the same images as our in-memory sampler for the same seed."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler

from models.components import build_components
from models.export import export_pipeline
from tests.conftest import cli, small
from train.build import load_pipeline

pytestmark = pytest.mark.integration


def sample(pipe, steps=4, guidance=3.0):
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(["a handwritten digit five"] * 2, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                output_type="np").images


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return export_pipeline(build_components(preset="micro", resolution=16), tmp_path_factory.mktemp("t") / "teacher")


@pytest.mark.parametrize("experiment, extra", [("lcm", ["model.guidance_embedding=32"]),
                                               ("lcm_lora", ["adapter.rank=2"])])
def test_students_sample_through_diffusers_with_lcm_scheduler(teacher, tmp_path, experiment, extra):
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=s", f"experiment={experiment}",
                                    f"method.teacher={teacher}", "trainer.max_steps=2", "optimizer.lr=1e-2",
                                    "callbacks.digits_eval.enabled=false", *extra)),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = sample(load_pipeline(tmp_path / "s" / "checkpoints" / "last.ckpt", sampler="lcm"))
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "train.ops.export", str(tmp_path / "s"), str(out), "--sampler", "lcm"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    if experiment == "lcm":
        pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        assert isinstance(pipe.scheduler, LCMScheduler)
    else:  # the LoRA goes onto the teacher's own pipeline, switched to LCMScheduler
        pipe = DiffusionPipeline.from_pretrained(teacher, trust_remote_code=True)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
        pipe.load_lora_weights(out)
    pipe.set_progress_bar_config(disable=True)
    theirs = sample(pipe)
    assert np.abs(theirs - ours).max() < 2e-3
