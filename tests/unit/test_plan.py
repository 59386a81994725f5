"""The memory planner (train/plan.py): the fake-tensor trace counts what a real step allocates, full-size models plan
on the meta device, suggestions make a run fit, and `model.gradient_checkpointing=auto` follows the plan."""
import copy

import pytest
import torch

from models.adapters import AdapterSpec, apply_adapter
from models.components import Components, build_components
from models.real_sizes import REAL_SIZES, clip_l, t5_xxl
from tests.conftest import compose
from train.build import build_model
from train.ops.plan import main as plan_main
from train.plan import (ACTIVATIONS, LiveBytes, Settings, parts_for_components, parts_for_real_size, plan_memory,
                        prepare_denoiser, trace_step_bytes)


@pytest.fixture(scope="module")
def flux():
    return build_components(preset="flux_micro")


@pytest.mark.parametrize("lora", [False, True])
def test_fake_trace_counts_what_the_real_step_allocates(flux, lora):
    parts = parts_for_components(flux)
    s = Settings(batch=3, resolution=16, precision="32-true", device="cpu",
                 adapter=AdapterSpec(kind="lora", rank=4) if lora else AdapterSpec())
    fake = trace_step_bytes(prepare_denoiser(parts, s, torch.float32), lambda: parts.inputs(3, 16), None)
    real = copy.deepcopy(flux.unet)
    if lora:
        apply_adapter(Components(real, torch.nn.Identity(), None, None, family="flux"), AdapterSpec(kind="lora", rank=4))
    inputs = {k: torch.randn(v.shape) for k, v in parts.inputs(3, 16).items()}
    inputs["timestep"] = torch.rand(3) * 1000
    tracker = LiveBytes([*real.parameters(), *real.buffers(), *inputs.values()])
    with tracker:
        real(**inputs, return_dict=False)[0].pow(2).mean().backward()
    assert tracker.peak > 0 and fake == pytest.approx(tracker.peak, rel=0.02)


def test_full_size_models_plan_without_weights():
    counts = {name: sum(p.numel() for p in REAL_SIZES[name].denoiser().parameters()) / 1e9
              for name in ("sd15", "sdxl", "flux1_dev")}
    assert counts["sd15"] == pytest.approx(0.86, abs=0.01) and counts["sdxl"] == pytest.approx(2.57, abs=0.01)
    assert counts["flux1_dev"] == pytest.approx(11.9, abs=0.05)
    with torch.device("meta"):
        assert sum(p.numel() for p in t5_xxl().parameters()) / 1e9 == pytest.approx(4.76, abs=0.01)
        assert sum(p.numel() for p in clip_l().parameters()) / 1e6 == pytest.approx(123, abs=1)
    parts = parts_for_real_size("sd15")
    plan = plan_memory(parts, Settings(batch=1, resolution=512, precision="bf16-mixed",
                                       adapter=AdapterSpec(kind="lora", rank=16)), gpu_memory_gb=24)
    assert plan.fits and plan.rows["frozen weights (bfloat16)"] == pytest.approx(2 * 0.86e9, rel=0.01)
    assert 0 < plan.rows[ACTIVATIONS] < 8 * 2**30 and "peak" in plan.table()
    tight = plan_memory(parts, Settings(batch=4, resolution=512, precision="bf16-mixed",
                                        adapter=AdapterSpec(kind="lora", rank=16)), gpu_memory_gb=4)
    assert not tight.fits and tight.suggestions and tight.suggestions[-1][1] <= 4 * 2**30
    assert tight.suggestions[0][0] == "model.gradient_checkpointing=true"  # the cheapest setting comes first
    int8 = plan_memory(parts, Settings(batch=1, resolution=512, precision="bf16-mixed", quantize="int8",
                                       adapter=AdapterSpec(kind="lora", rank=16)), gpu_memory_gb=24)
    assert int8.rows["frozen weights (int8)"] < 0.55 * plan.rows["frozen weights (bfloat16)"]


def test_gradient_checkpointing_auto_follows_the_plan():
    roomy = build_model(compose(["model.gradient_checkpointing=auto", "trainer.accelerator=cpu"]))
    tight = build_model(compose(["model.gradient_checkpointing=auto", "trainer.accelerator=cpu",
                                 "launcher.gpu_memory_gb=0.001"]))
    assert not roomy.unet.is_gradient_checkpointing and tight.unet.is_gradient_checkpointing


def test_foundry_plan_prints_the_verdict_and_exits_by_it(capsys):
    with pytest.raises(SystemExit) as fits:
        plan_main(["model.preset=micro", "trainer.accelerator=cpu"])
    assert fits.value.code == 0 and "fits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as tight:
        plan_main(["model.preset=micro", "trainer.accelerator=cpu", "launcher.gpu_memory_gb=0.001", "--json"])
    assert tight.value.code == 1 and '"fits": false' in capsys.readouterr().out
