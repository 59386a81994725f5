"""Distillation pieces: consistency boundary conditions, the DDIM solver step, the guidance embedding, and the
LCM / guidance-distillation losses on the micro model."""
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from models.components import build_components, with_guidance_embedding
from models.pipeline import guidance_embedding
from train.build import build_module
from train.diffusion import DiffusionCore
from train.methods.lcm import boundary_scalings, ddim_grid


def test_boundary_conditions_are_the_identity_at_t0():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert (c_skip[1:] < 1).all() and (c_out[1:] > 0).all()
    assert ddim_grid(1000, 50)[:3].tolist() == [19, 39, 59] and ddim_grid(1000, 50)[-1] == 999


def test_ddim_solver_step_hand_computed():
    comps = build_components(preset="micro", resolution=16)
    core = DiffusionCore(comps.scheduler)
    x0, eps = torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), -1.0)
    a = comps.scheduler.alphas_cumprod[379].item()
    expected = a**0.5 * 0.5 + (1 - a) ** 0.5 * -1.0
    assert torch.allclose(core.ddim_jump(x0, eps, torch.tensor([379])), torch.full_like(x0, expected), atol=1e-6)
    assert torch.equal(core.ddim_jump(x0, eps, torch.tensor([-1])), x0)  # before the first step: x0 itself


def test_guidance_embedding_matches_diffusers_lcm_pipeline():
    w = torch.tensor([0.0, 1.5, 4.0])
    ours = guidance_embedding(w, 256)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert ours.shape == (3, 256) and torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(ours[0, :128], torch.zeros(128)) and torch.equal(ours[0, 128:], torch.ones(128))


def test_student_with_guidance_input_starts_as_its_teacher():
    comps = build_components(preset="micro", resolution=16)
    student = with_guidance_embedding(comps.unet, 32)
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([10, 700]), torch.randn(2, 12, 16)
    with torch.no_grad():
        a = comps.unet(x, t, encoder_hidden_states=ctx).sample
        b = student(x, t, encoder_hidden_states=ctx, timestep_cond=guidance_embedding(torch.tensor([2.0, 3.0]), 32)).sample
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("experiment, extra", [
    ("lcm", ["model.guidance_embedding=32"]),
    ("lcm_lora", ["adapter.rank=2"]),
    ("guidance_distill", ["model.guidance_embedding=32"]),
    ("guidance_distill", ["model.guidance_embedding=32", "adapter=lora", "adapter.rank=2"]),
])
def test_distillation_losses_run_and_train_the_right_parameters(tiny_cfg, tmp_path, experiment, extra):
    from models.export import export_pipeline

    teacher = export_pipeline(build_components(preset="micro", resolution=16), tmp_path / "teacher")
    module = build_module(tiny_cfg(f"experiment={experiment}", f"method.teacher={teacher}", *extra))
    ids = module.components.tokenizer(["a handwritten digit four"] * 2, padding="max_length", max_length=12,
                                      return_tensors="pt").input_ids
    module.noise_generator.manual_seed(0)
    out = module.method.loss({"pixels": torch.rand(2, 3, 16, 16) * 2 - 1, "input_ids": ids}, module)
    assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all()
    out["loss"].mean().backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads
    if "adapter=lora" in extra or experiment == "lcm_lora":
        assert all("lora_" in n or "cond_proj" in n for n in grads)
    if experiment == "guidance_distill" and "adapter=lora" in extra:
        assert any("cond_proj" in n for n in grads), "the guidance input must train with the adapter"
