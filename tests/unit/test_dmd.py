"""DMD2 / VSD: the distribution-matching gradient by hand on a toy score pair, the two time-scale rule (each phase
steps only its own networks, the fake score's own learning rate), exact resume in the middle of a cycle, and
one-line refusals."""
from __future__ import annotations

import subprocess

import lightning as L
import pytest
import torch

from tests.conftest import cli, small
from models.export import export_pipeline
from models.tokens import tokenize
from train.ops.validate import validate_combinations
from train.build import build_module
from train.methods.dmd import DMD2, distribution_matching


def test_distribution_matching_gradient_equals_a_hand_computation_on_two_gaussian_scores():
    # toy scores: the real distribution N(0, 1), the fake (the student's) N(mu, 1); a VP pair at alpha_bar a has
    # E[x0 | x_t] = mu + sqrt(a) (x_t - sqrt(a) mu) for x0 ~ N(mu, 1) (unit variances: the posterior gain is sqrt(a))
    a, mu = 0.5, torch.tensor([2.0, -1.0, 0.5])
    x = torch.tensor([[1.0, 0.0, -2.0]], requires_grad=True)
    x_t = a ** 0.5 * x.detach() + (1 - a) ** 0.5 * torch.tensor([[0.3, -0.2, 0.1]])
    p_real = a ** 0.5 * x_t                      # E[x0 | x_t] for x0 ~ N(0, 1)
    p_fake = mu + a ** 0.5 * (x_t - a ** 0.5 * mu)  # for x0 ~ N(mu, 1)
    distribution_matching(x, p_real, p_fake).sum().backward()
    norm = (x.detach() - p_real).abs().mean()
    hand = (p_fake - p_real) / norm / 3
    torch.testing.assert_close(x.grad, hand)
    assert (x.grad * mu).sum() > 0  # descending moves the student's samples away from mu, towards the real mean


def test_two_time_scale_phases():
    m = DMD2(fake_updates=3)
    assert [m.phase(s) for s in range(8)] == ["fake"] * 3 + ["generator"] + ["fake"] * 3 + ["generator"]


@pytest.mark.parametrize("overrides", [["method.fake_updates=2", "method.fake_lr=3e-3"],
                                       ["method.gan_weight=0.1", "method.student_steps=2"]])
def test_each_phase_steps_only_its_own_networks(tiny_cfg, overrides):
    module = build_module(tiny_cfg("method=dmd2", "method.teacher=x", "adapter=none", *overrides))
    module.trainer = L.Trainer(max_steps=5, logger=False, accelerator="cpu")
    opt = module.configure_optimizers()["optimizer"]
    fake_params = {id(p) for n in ("fake_score", "gan_head") if hasattr(module, n)
                   for p in getattr(module, n).parameters() if p.requires_grad}
    if "method.fake_lr=3e-3" in overrides:  # its own param group at its own learning rate
        assert len(opt.param_groups) == 2 and {id(p) for p in opt.param_groups[1]["params"]} == fake_params
        assert opt.param_groups[1]["lr"] == 3e-3 and opt.param_groups[0]["lr"] != 3e-3
    else:
        assert len(opt.param_groups) == 1

    prompts = ["a handwritten digit two", "a handwritten digit three"]
    batch = {"input_ids": tokenize(module.components.tokenizer, prompts), "captions": prompts,
             "pixels": torch.rand(2, 3, 16, 16) * 2 - 1}
    for step, phase in ((0, "fake"), (module.method.k, "generator")):
        assert module.method.phase(step) == phase
        module.zero_grad(set_to_none=True)
        out = _loss_at(module, batch, step)
        out["loss"].mean().backward()
        grads = {id(p) for p in module.trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if phase == "fake":
            assert grads and grads <= fake_params and "fake_score_loss" in out
            assert ("gan_discriminator" in out) == ("method.gan_weight=0.1" in overrides)
        else:
            assert grads and not grads & fake_params and "distribution_matching" in out


def _loss_at(module, batch, step):
    method = module.method
    real_phase = method.phase
    method.phase = lambda _s: real_phase(step)  # global_step is the trainer's; here the phase is asked for directly
    try:
        return method.loss(batch, module.view)
    finally:
        del method.phase


@pytest.mark.parametrize("kw, match", [({"fake_updates": 0}, r"method.fake_updates=0: the fake score needs >= 1"),
                                       ({"fake_score": "half"}, r"method.fake_score=half"),
                                       ({"student_steps": 0}, r"method.student_steps=0")])
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        DMD2(**kw)
    assert "\n" not in str(err.value)


def _train(tmp_path, name, steps):
    args = small(f"paths.output_dir={tmp_path}", f"run_name={name}", "callbacks=none", "logger=none",
                 "method=dmd2", "method.teacher=x", "adapter=none", "method.fake_updates=2", "optimizer.lr=1e-3",
                 "lr_scheduler.name=constant", f"trainer.max_steps={steps}", "checkpoint.every_n_steps=100")
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_resume_in_the_middle_of_a_cycle_is_exact(tmp_path):
    straight = _train(tmp_path, "straight", 6)
    _train(tmp_path, "resumed", 4)  # steps 0 F, 1 F, 2 G, 3 F: stops between the two fake steps of a cycle
    resumed = _train(tmp_path, "resumed", 6)
    assert straight["global_step"] == resumed["global_step"] == 6
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    moved = [n for n, t in straight["state_dict"].items() if n.startswith("fake_score.")]
    assert moved


def test_conditioning_timestep_starts_the_student_and_its_exported_sampler_there(tiny_cfg, tmp_path):
    from diffusers import LCMScheduler


    module = build_module(tiny_cfg("method=dmd2", "method.teacher=x", "adapter=none", "method.fake_updates=1",
                                   "method.conditioning_timestep=899", "method.student_steps=2"))
    assert module.method.timesteps[0] == 899 and len(module.method.timesteps) == 2
    sched = LCMScheduler.from_pretrained(export_pipeline(module.components, tmp_path / "e", "lcm") / "scheduler")
    sched.set_timesteps(1)
    assert int(sched.timesteps[0]) == 899
    torch.testing.assert_close(sched.alphas_cumprod, module.components.scheduler.alphas_cumprod[:900])
    with pytest.raises(ValueError, match=r"method.conditioning_timestep=900: expected t < 1000 with t \+ 1 a multiple"):
        build_module(tiny_cfg("method=dmd2", "method.teacher=x", "adapter=none", "method.conditioning_timestep=900"))


@pytest.mark.parametrize("overrides, match", [
    (["model.pretrained=/models/other"], "method.teacher=/t but model.pretrained=/models/other: the student starts"),
    (["strategy=ddp"], "strategy=ddp with method=dmd2/vsd: .* strategy.find_unused_parameters=true"),
])
def test_a_student_that_is_not_its_teacher_or_ddp_without_unused_parameters_is_refused(tiny_cfg, overrides, match):

    with pytest.raises(ValueError, match=match):
        validate_combinations(tiny_cfg("experiment=dmd2", "method.teacher=/t", *overrides))


def test_a_flow_dit_student_trains_both_phases_with_the_gan_head(tiny_cfg):

    module = build_module(tiny_cfg("model=dit_tiny", "model.preset=dit_micro", "method=dmd2", "method.teacher=x",
                                   "adapter=none", "method.fake_updates=1", "method.gan_weight=0.1"))
    assert module.core.flow and module.method.timesteps == [1000.0]
    prompts = ["a handwritten digit two", "a handwritten digit three"]
    batch = {"input_ids": tokenize(module.components.tokenizer, prompts), "captions": prompts,
             "pixels": torch.rand(2, 3, 16, 16) * 2 - 1}
    for step in (0, 1):  # fake, then generator
        module.zero_grad(set_to_none=True)
        out = _loss_at(module, batch, step)
        assert torch.isfinite(out["loss"]).all()
        out["loss"].mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.trainable_parameters())
    assert "gan_generator" in out and "distribution_matching" in out
    with pytest.raises(ValueError, match="a flow student samples in one Euler step"):
        build_module(tiny_cfg("model=dit_tiny", "model.preset=dit_micro", "method=dmd2", "method.teacher=x",
                              "adapter=none", "method.student_steps=2"))
