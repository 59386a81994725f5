"""The noise/loss core: target algebra, SNR weighting and per-sample shapes, checked against hand math."""
import math

import pytest
import torch

from models.components import make_scheduler
from train.diffusion import DiffusionCore


def core(pred="epsilon", gamma=None, **kw):
    return DiffusionCore(make_scheduler(pred), min_snr_gamma=gamma, **kw)


def test_v_target_is_sqrt_a_eps_minus_sqrt_one_minus_a_x0():
    c = core("v_prediction")
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = c.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(c.target(x0, eps, t), expected)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_exact_prediction_recovers_x0_and_eps(pred):
    c = core(pred)
    x0, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([5, 300, 900])
    xt = c.add_noise(x0, eps, t)
    target = c.target(x0, eps, t)
    torch.testing.assert_close(c.predict_x0(xt, target, t), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(c.predict_eps(xt, target, t), eps, atol=1e-4, rtol=1e-4)
    assert c.per_sample_loss(target, target, t).abs().max() == 0


def test_add_noise_matches_closed_form():
    c = core()
    x0, eps, t = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([0, 999])
    a = c.scheduler.alphas_cumprod[t]
    torch.testing.assert_close(c.add_noise(x0, eps, t)[:, 0, 0, 0], a.sqrt())


def test_min_snr_weights_by_hand():
    t = torch.tensor([1, 200, 600, 950])
    for pred in ("epsilon", "v_prediction"):
        c = core(pred, gamma=5.0)
        a = c.scheduler.alphas_cumprod[t].double()
        snr = a / (1 - a)
        denom = snr + 1 if pred == "v_prediction" else snr
        expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / denom
        torch.testing.assert_close(c.loss_weights(t).double(), expected, rtol=1e-4, atol=1e-6)
    # low-noise steps (high SNR) are down-weighted; high-noise ones keep weight 1 for epsilon
    w = core("epsilon", gamma=5.0).loss_weights(t)
    assert w[0] < 0.01 and math.isclose(float(w[-1]), 1.0, rel_tol=1e-5)


def test_disabled_weighting_is_one_and_losses_are_per_sample():
    c = core(gamma=None)
    t = torch.randint(0, 1000, (6,))
    assert torch.equal(c.loss_weights(t), torch.ones(6))
    pred, target = torch.zeros(6, 3, 4, 4), torch.ones(6, 3, 4, 4)
    pred[0] = 1.0
    loss = c.per_sample_loss(pred, target, t)
    assert loss.shape == (6,) and loss[0] == 0 and torch.all(loss[1:] == 1)


def test_huber_is_close_to_abs_for_large_errors_and_quadratic_near_zero():
    c = core(loss_type="huber", huber_c=0.1)
    t = torch.zeros(2, dtype=torch.long)
    big = c.per_sample_error(torch.full((2, 4), 10.0), torch.zeros(2, 4))
    assert torch.allclose(big, torch.full((2,), 10.0), atol=0.11)
    small = c.per_sample_error(torch.full((2, 4), 0.01), torch.zeros(2, 4))
    assert torch.all(small < 0.001)
    with pytest.raises(ValueError, match="loss.type"):
        core(loss_type="l3")


def test_offset_noise_shifts_per_channel_means():
    torch.manual_seed(0)
    plain = core().sample_noise(torch.zeros(256, 3, 16, 16))
    torch.manual_seed(0)
    offset = core(offset_noise=1.0).sample_noise(torch.zeros(256, 3, 16, 16))
    assert plain.mean((2, 3)).std() < 0.2 < offset.mean((2, 3)).std()


def test_masked_error_averages_over_kept_elements_only():
    """Patch masking's loss: the mean runs over the elements the mask keeps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    core = DiffusionCore(FlowMatchEulerDiscreteScheduler())
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert core.per_sample_error(pred, target, mask).item() == pytest.approx((1 + 16) / 2)
    assert core.per_sample_error(pred, target).item() == pytest.approx(30 / 4)


def test_timestep_range_restricts_vp_and_flow_draws_and_default_draws_are_unchanged():
    g = torch.Generator().manual_seed(0)
    t = core(timestep_range=(0.5, 1.0)).sample_timesteps(5000, "cpu", g)
    assert int(t.min()) >= 500 and int(t.max()) <= 999 and abs(float(t.float().mean()) - 749.5) < 10
    t = core(timestep_range=(0.0, 0.2)).sample_timesteps(5000, "cpu", g)
    assert int(t.min()) == 0 and int(t.max()) == 199
    # the full range draws exactly what the core always drew (same generator state -> same timesteps)
    a = core().sample_timesteps(64, "cpu", torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flow = DiffusionCore(make_scheduler("flow", flow_shift=3.0), timestep_range=(0.25, 0.75))
    s = flow.sample_timesteps(5000, "cpu", g) / 1000
    assert float(s.min()) >= 0.25 and float(s.max()) <= 0.75


@pytest.mark.parametrize("bad", [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.5), (0.9, 0.1)])
def test_timestep_range_refuses_an_empty_or_out_of_range_interval(bad):
    with pytest.raises(ValueError, match="loss.timestep_range"):
        core(timestep_range=bad)
