"""The training-time DDIM step is diffusers' step (same prev_sample for the same noise), its log-probability is
the Gaussian density of the transition, and a full chain reproduces the exported pipeline's samples."""
import pytest
import torch

from models.components import build_components, make_scheduler, tokenize
from models.export import make_pipeline
from train.sampling import ddim_scheduler, ddim_step, guided, sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_matches_diffusers_and_log_prob_is_gaussian(prediction_type, eta, clip):
    sched = ddim_scheduler(make_scheduler(prediction_type), steps=10, clip_sample=clip)
    g = torch.Generator().manual_seed(0)
    x, out, z = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    for t in (int(sched.timesteps[0]), int(sched.timesteps[5]), int(sched.timesteps[-1])):
        ours = ddim_step(sched, out, t, x, eta=eta, noise=z)
        ref = sched.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
        assert torch.allclose(ours.prev_sample, ref, atol=1e-5)
        if eta > 0 and float(ours.std) > 0:  # the last step into x_0 is deterministic (alpha_prev = 1)
            direct = torch.distributions.Normal(ours.mean, ours.std).log_prob(ours.prev_sample).flatten(1).mean(1)
            assert torch.allclose(ours.log_prob, direct, atol=1e-5)
            # re-scoring a stored transition gives the same number (what DDPO's update does)
            again = ddim_step(sched, out, t, x, eta=eta, prev_sample=ours.prev_sample)
            assert torch.allclose(again.log_prob, ours.log_prob)


def test_chain_reproduces_the_pipeline_and_keeps_grads_only_for_the_last_k():
    comps = build_components(preset="micro", resolution=16)
    pipe = make_pipeline(comps)
    ids = tokenize(comps.tokenizer, ["a handwritten digit three", ""] * 1)
    cond, uncond = comps.text_encoder(ids)[0].chunk(2)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = pipe(["a handwritten digit three"], num_inference_steps=5, guidance_scale=2.0, latents=x_T,
                    output_type="pt").images * 2 - 1
    sched = ddim_scheduler(comps.scheduler, 5, clip_sample=True)
    with torch.no_grad():
        traj = sample(lambda x, t: guided(comps.unet, x, t, cond, uncond, 2.0), sched, x_T, keep_states=True)
    assert traj.states.shape == (1, 6, 3, 16, 16) and traj.log_probs.shape == (1, 5)
    assert torch.allclose(traj.images.clamp(-1, 1), expected, atol=1e-4)

    calls = []

    def predict(x, t):
        calls.append(torch.is_grad_enabled())
        return guided(comps.unet, x, t, cond.detach(), uncond.detach(), 2.0)

    final = sample(predict, sched, x_T, grad_last=2).final
    assert calls == [False, False, False, True, True] and final.requires_grad
