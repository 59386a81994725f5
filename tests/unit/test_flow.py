"""Flow matching in the core (rectified flow, SD3's timestep density), reflow on couplings, flow sampling/export."""
import pytest
import torch

from models.components import make_scheduler, with_prediction_type
from train.build import build_module
from train.diffusion import DiffusionCore


def flow_core(**kw):
    return DiffusionCore(make_scheduler("flow", flow_shift=kw.pop("shift", 1.0)), **kw)


def test_flow_path_target_and_inverses_are_exact():
    core = flow_core()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    d = core.noised(x0, t=t, noise=noise)
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(d.x_t, (1 - s) * x0 + s * noise) and torch.allclose(d.target, noise - x0)
    assert torch.allclose(core.predict_x0(d.x_t, d.target, t), x0, atol=1e-5)
    assert torch.allclose(core.predict_eps(d.x_t, d.target, t), noise, atol=1e-5)
    assert torch.allclose(core.loss_weights(t), torch.ones(4))  # min-SNR is a VP weighting; flow has none
    one_step = noise - 1.0 * d.target  # an exact velocity crosses the straight path in one Euler step
    assert torch.allclose(one_step, x0, atol=1e-6)


def test_flow_timesteps_follow_sd3_logit_normal_and_shift():
    g = torch.Generator().manual_seed(0)
    plain = flow_core(timestep_sampling="logit_normal").sample_timesteps(20000, "cpu", g) / 1000
    assert 0 < float(plain.min()) and float(plain.max()) < 1 and abs(float(plain.median()) - 0.5) < 0.02
    shifted = flow_core(timestep_sampling="logit_normal", shift=3.0).sample_timesteps(20000, "cpu", g) / 1000
    assert abs(float(shifted.median()) - 0.75) < 0.02  # shift 3 maps s = 0.5 to 3 * 0.5 / (1 + 2 * 0.5)
    uniform = flow_core().sample_timesteps(20000, "cpu", g) / 1000
    assert abs(float(uniform.mean()) - 0.5) < 0.01


def test_a_vp_model_switches_to_flow_and_back():
    vp = make_scheduler("epsilon")
    flow = with_prediction_type(vp, "flow", flow_shift=2.0)
    assert type(flow).__name__ == "FlowMatchEulerDiscreteScheduler" and flow.config.shift == 2.0
    assert with_prediction_type(flow, "v_prediction").config.prediction_type == "v_prediction"
    assert with_prediction_type(flow, None) is flow


def reflow_module(tiny_cfg, *extra):
    return build_module(tiny_cfg("experiment=reflow", "method.teacher=unused", "model.pretrained=null",
                                 "data.urls=unused", *extra))


def coupling_batch(module, n=2):
    ids = module.components.tokenizer(["a handwritten digit one"] * n, padding="max_length", max_length=12,
                                      return_tensors="pt").input_ids
    return {"x0": torch.rand(n, 3, 16, 16) * 2 - 1, "noise": torch.randn(n, 3, 16, 16), "input_ids": ids}


def test_reflow_trains_on_the_coupled_noise_and_one_step_sits_at_the_noise_end(tiny_cfg):
    module = reflow_module(tiny_cfg, "method.sigma=1.0")
    assert module.core.prediction_type == "flow"
    batch = coupling_batch(module)
    module.noise_generator.manual_seed(0)
    out = module.method.loss(batch, module)
    assert torch.equal(out["timestep"], torch.full((2,), 1000.0))
    with torch.no_grad():  # at s = 1 the input is exactly the coupled noise and the target noise - x0
        pred = module.unet(batch["noise"], torch.full((2,), 1000.0),
                           encoder_hidden_states=module.encode_text(batch["input_ids"])).sample
    expected = module.core.per_sample_loss(pred, batch["noise"] - batch["x0"], torch.full((2,), 1000.0))
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="data.kind=coupling"):
        module.method.loss({"pixels": batch["x0"], "input_ids": batch["input_ids"]}, module)


def test_methods_written_for_vp_models_refuse_flow_in_one_line(tiny_cfg):
    with pytest.raises(ValueError, match="method=progressive works with model.prediction_type"):
        build_module(tiny_cfg("method=progressive", "method.teacher=unused", "model.prediction_type=flow"))


def test_a_flow_model_samples_and_exports_with_its_euler_solver(tiny_cfg, tmp_path):
    from diffusers import DiffusionPipeline

    from models.export import export_pipeline, make_pipeline

    module = build_module(tiny_cfg("model.prediction_type=flow"))
    comps = module.components
    ours = make_pipeline(comps)("a handwritten digit one", num_inference_steps=3, guidance_scale=2.0,
                                generator=torch.Generator().manual_seed(0), output_type="np").images
    export_pipeline(comps, tmp_path / "flow")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "flow", trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    theirs = pipe("a handwritten digit one", num_inference_steps=3, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert torch.allclose(torch.as_tensor(ours), torch.as_tensor(theirs), atol=1e-5)
    from models.components import load_pretrained

    assert load_pretrained(tmp_path / "flow").scheduler.config.shift == comps.scheduler.config.shift


def test_straightness_is_logged_for_flow_models_and_zero_for_a_straight_flow(tiny_cfg):
    """An exactly straight flow (a 'UNet' predicting noise - x0 for a fixed x0) scores 0; a random one does not."""
    from types import SimpleNamespace

    from models.export import make_pipeline
    from train.digits_eval import flow_straightness

    module = build_module(tiny_cfg("model.prediction_type=flow"))
    pipe = make_pipeline(module.components)
    assert flow_straightness(pipe, n_per_digit=1, steps=4) > 1e-4
    target = torch.zeros(1, 3, 16, 16)

    class Straight(torch.nn.Module):  # v(x, s) = (x - x0) / s: the straight line from x through x0
        config = pipe.unet.config
        dtype, device = torch.float32, torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the pipeline finds its device

        def forward(self, x, t, encoder_hidden_states=None, timestep_cond=None):
            s = (t.float() / 1000).clamp_min(1e-3).view(-1, *([1] * (x.ndim - 1)))
            return SimpleNamespace(sample=(x - target) / s)

    pipe.register_modules(unet=Straight())
    assert flow_straightness(pipe, n_per_digit=1, steps=4, guidance_scale=1.0) < 1e-8
