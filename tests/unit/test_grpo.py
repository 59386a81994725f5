"""Flow-GRPO: the SDE step's log-probability by hand, the a=0 sampler against diffusers' flow ODE, group advantages
with NaN rewards dropped and small groups skipped, KL zero at the reference, one-line refusals, a rollout and a
training unit on a flow DiT."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from train.build import build_module
from models.tokens import tokenize
from train.methods.grpo import GRPO
from train.rewards import Reward, per_prompt_advantages
from train.sampling import flow_sde_step, sample_flow


def test_sde_step_log_prob_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x, v, prev = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    sigmas = torch.tensor([1.0, 0.6, 0.25, 0.0])
    a, i = 0.7, 1
    step = flow_sde_step(v, sigmas, i, x, a, prev_sample=prev)
    s, ds = 0.6, 0.25 - 0.6
    diff = a * math.sqrt(s / (1 - s))
    mean = x * (1 + diff**2 / (2 * s) * ds) + v * (1 + diff**2 * (1 - s) / (2 * s)) * ds
    std = diff * math.sqrt(-ds)
    hand = (-(prev - mean) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob, hand)
    torch.testing.assert_close(step.mean, mean)
    first = flow_sde_step(v, sigmas, 0, x, a)  # at s = 1 the next level stands in for 1 - s
    assert torch.isfinite(first.log_prob).all() and float(first.std) > 0


def test_zero_noise_level_is_diffusers_flow_ode():
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(3, 3, generator=g) * 0.3

    def velocity(x, t):  # any smooth field of (x, t)
        return torch.einsum("ij,bjhw->bihw", w, x) * (1 + t.view(-1, 1, 1, 1) / 1000)

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    ref = x_T.clone()
    for t in sched.timesteps:
        ref = sched.step(velocity(ref, t.expand(2)), t, ref).prev_sample
    traj = sample_flow(velocity, sched.sigmas.float(), x_T, noise_level=0.0)
    torch.testing.assert_close(traj.images, ref, rtol=1e-5, atol=1e-5)
    assert (traj.log_probs == 0).all()


def test_group_advantages_drop_nan_rewards_and_skip_small_groups():
    r = torch.tensor([1.0, 3.0, float("nan"), 10.0, 14.0, 7.0, float("nan")])
    p = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    adv = per_prompt_advantages(r, p, min_group=2)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)


class ByDigit(Reward):
    """A reward that prefers bright images, NaN for prompts of the digit one (a broken scorer on some samples)."""

    def __call__(self, images, prompts):
        r = images.float().mean((1, 2, 3))
        return torch.where(torch.tensor(["one" in p for p in prompts]), torch.full_like(r, float("nan")), r)


def grpo_module(tiny_cfg, **kw):
    module = build_module(tiny_cfg("model=dit_tiny", "model.preset=dit_micro", "adapter=lora"))
    method = GRPO(ByDigit(), sample_steps=3, **{"group_size": 2, "minibatch": 4, **kw})
    module.method = method
    method.setup(module.view)
    return module, method


def test_rollout_and_a_training_unit_with_kl_zero_at_the_reference(tiny_cfg):
    module, method = grpo_module(tiny_cfg)

    prompts = ["a handwritten digit two", "a handwritten digit one"]
    batch = {"captions": prompts, "input_ids": tokenize(module.components.tokenizer, prompts)}
    out = method.loss(batch, module.view)
    assert method.buffer["nonfinite"] == 2  # both samples of "one": dropped and counted
    assert (method.buffer["adv"][2:] == 0).all() and method.buffer["adv"][:2].abs().sum() > 0
    assert torch.isfinite(out["loss"]).all()
    torch.testing.assert_close(out["kl"], torch.zeros_like(out["kl"]))  # a fresh LoRA is the base: KL 0
    out["loss"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.trainable_parameters())
    assert len(method.units) == method.steps_per_rollout(2) * 3 - 1  # every trained step of every minibatch


def test_groups_that_do_not_fill_the_minibatches_evenly_train_every_trajectory(tiny_cfg):

    module, method = grpo_module(tiny_cfg, group_size=3, minibatch=4)  # 2 prompts x 3 = 6 trajectories: 4 + 2
    prompts = ["a handwritten digit two", "a handwritten digit three"]
    out = method.loss({"captions": prompts, "input_ids": tokenize(module.components.tokenizer, prompts)}, module.view)
    assert torch.isfinite(out["loss"]).all() and method.steps_per_rollout(2) == 2
    seen = {int(i) for idx, _ in method.units for i in idx}
    assert seen == set(range(6)) and method.buffer["adv"].abs().sum() > 0


def test_shared_noise_gives_a_group_one_start(tiny_cfg):
    module, method = grpo_module(tiny_cfg, shared_noise=True)
    x = method._initial_noise(module.view, 4)
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(x[0], x[2])


@pytest.mark.parametrize("kw,match", [
    ({"noise_level": 0.0}, r"method.noise_level=0.0: GRPO needs a stochastic sampler"),
    ({"group_size": 1}, r"method.group_size=1: group-normalised advantages need >= 2"),
    ({"sde_window": [2, 9]}, r"method.sde_window=\[2, 9\]: expected \[lo, hi\)"),
    ({"kl_beta": -1}, r"method.kl_beta=-1: expected >= 0"),
])
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GRPO(ByDigit(), sample_steps=4, **kw)


def test_a_unet_of_another_objective_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="method=grpo"):
        build_module(tiny_cfg("method=grpo", "reward=digits"))


def test_shuffled_prompts_control_scores_against_other_prompts():
    from train.rewards import ShuffledPrompts

    class Echo(Reward):
        def __call__(self, images, prompts):
            return torch.tensor([float(p.split()[-1]) for p in prompts])

    prompts = [f"digit {i}" for i in range(8)]
    out = ShuffledPrompts(Echo(), seed=0)(torch.zeros(8, 3, 4, 4), prompts)
    assert sorted(out.tolist()) == list(range(8)) and out.tolist() != list(range(8))
