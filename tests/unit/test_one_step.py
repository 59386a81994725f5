"""One-step students: the progressive target reproduces two teacher steps, couplings round-trip bit-exactly and bad
ones are counted, straightness is zero for a straight flow, and teachers of the wrong kind are refused in one line."""
import numpy as np
import pytest
import torch

from data.couplings import npy_bytes
from data.webdataset import build_stream
from models.components import build_components, make_scheduler
from models.tiny import build_preset
from train.build import build_module
from train.diffusion import DiffusionCore
from train.methods.progressive import two_step_target
from train.sampling import straightness


def test_progressive_target_lands_one_ddim_step_on_two_teacher_steps():
    core = DiffusionCore(make_scheduler("v_prediction"))
    g = torch.Generator().manual_seed(0)
    x0, eps1, eps2 = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t, mid, end = torch.tensor([999, 749]), torch.tensor([874, 624]), torch.tensor([749, 499])
    z_t = core.add_noise(x0, eps1, t)
    # two "teacher" DDIM steps with arbitrary (x0, eps) predictions
    z_mid = core.ddim_jump(x0 * 0.9, eps1, mid)
    z_end = core.ddim_jump(x0 * 0.8 + 0.1, eps2, end)
    x_tilde = two_step_target(core, z_t, t, z_end, end)
    a = core.alphas_cumprod(t).view(-1, 1, 1, 1)
    eps_tilde = (z_t - a.sqrt() * x_tilde) / (1 - a).sqrt()
    assert torch.allclose(core.ddim_jump(x_tilde, eps_tilde, end), z_end, atol=1e-4)
    assert z_mid.shape == z_end.shape
    # the last step (end < 0) targets the teacher's clean image itself
    assert torch.allclose(two_step_target(core, z_t, t, x0, torch.tensor([-1, -1])), x0, atol=1e-5)


def test_straightness_is_zero_for_a_straight_flow_and_positive_for_a_curved_one():
    times = torch.linspace(1, 0, 9)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    line = torch.stack([b + (a - b) * (1 - t) for t in times], 1)  # from b at t=1 to a at t=0, constant speed
    assert torch.allclose(straightness(line, times), torch.zeros(2), atol=1e-10)
    bend = line.clone()
    bend[:, 4] += 1.0
    assert (straightness(bend, times) > 0.1).all()


def coupling_tar(path, samples):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_couplings_round_trip_bit_exactly_and_bad_ones_are_counted(tmp_path):
    rng = np.random.default_rng(0)
    noise = [rng.standard_normal((3, 16, 16)).astype(np.float32) for _ in range(4)]
    x0 = [rng.uniform(-1, 1, (3, 16, 16)).astype(np.float32) for _ in range(4)]
    good = [(f"{i:03d}", {"noise.npy": npy_bytes(noise[i]), "x0.npy": npy_bytes(x0[i]), "txt": b"a digit"})
            for i in range(4)]
    bad = [("b1", {"x0.npy": npy_bytes(x0[0]), "txt": b"a digit"}),                        # no noise tensor
           ("b2", {"noise.npy": npy_bytes(noise[0].astype(np.float64)), "x0.npy": npy_bytes(x0[0]), "txt": b"x"})]
    coupling_tar(tmp_path / "couplings-000000.tar", good[:2] + bad + good[2:])
    stream = build_stream(str(tmp_path / "couplings-000000.tar"), tokenizer=build_preset("micro", 16)[2],
                          resolution=16, batch_size=4, shuffle_buffer=0, resampled=False, kind="coupling",
                          caption_dropout=0.0, rank=0, world_size=1)
    batch = next(iter(stream))
    assert torch.equal(batch["noise"], torch.from_numpy(np.stack(noise)))  # bit for bit
    assert torch.equal(batch["x0"], torch.from_numpy(np.stack(x0)))
    assert batch["skipped"]["no_tensor"] == 1 and batch["skipped"]["bad_tensor"] == 1


def test_foundry_shards_couplings_resumes_without_redoing_shards(tmp_path):
    from train.couplings import write_couplings
    from models.export import export_pipeline

    teacher = export_pipeline(build_components(preset="micro", resolution=16), tmp_path / "teacher")
    first = write_couplings(str(teacher), tmp_path / "c", n=6, steps=2, maxcount=2, rank=0, world=2)
    assert first["written"] == ["couplings-000000.tar", "couplings-000002.tar"]  # rank 0 of 2: even shards
    stamp = (tmp_path / "c" / "couplings-000000.tar").stat().st_mtime_ns
    again = write_couplings(str(teacher), tmp_path / "c", n=6, steps=2, maxcount=2, rank=0, world=2)
    assert again["written"] == [] and len(again["already_present"]) == 2
    assert (tmp_path / "c" / "couplings-000000.tar").stat().st_mtime_ns == stamp


def test_progressive_refuses_an_epsilon_teacher_in_one_line(tiny_cfg, tmp_path):
    from models.export import export_pipeline

    teacher = export_pipeline(build_components(preset="micro", resolution=16), tmp_path / "eps-teacher")
    with pytest.raises(Exception, match="method=progressive works with model.prediction_type v_prediction, not epsilon; convert the teacher"):
        build_module(tiny_cfg("experiment=progressive", f"method.teacher={teacher}"))
    module = build_module(tiny_cfg("experiment=progressive", f"method.teacher={teacher}",
                                   "model.prediction_type=v_prediction"))  # converted: accepted
    ids = module.components.tokenizer(["a handwritten digit two"] * 2, padding="max_length", max_length=12,
                                      return_tensors="pt").input_ids
    module.noise_generator.manual_seed(0)
    out = module.method.loss({"pixels": torch.rand(2, 3, 16, 16) * 2 - 1, "input_ids": ids}, module)
    assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all() and out["student_steps"] == 4


def test_vsd_trains_the_student_and_the_fake_score_only(tiny_cfg, tmp_path):
    from models.export import export_pipeline

    teacher = export_pipeline(build_components(preset="micro", resolution=16), tmp_path / "teacher")
    module = build_module(tiny_cfg("experiment=vsd", f"method.teacher={teacher}", "method.fake_rank=2"))
    ids = module.components.tokenizer(["a handwritten digit two"] * 2, padding="max_length", max_length=12,
                                      return_tensors="pt").input_ids
    method = module.method
    for step, trained in ((0, {"fake_score"}), (method.k, {"unet"})):  # two time-scale rule: one network a step
        module.zero_grad(set_to_none=True)
        module.noise_generator.manual_seed(0)
        method.phase = lambda _s, step=step: type(method).phase(method, step)
        out = method.loss({"input_ids": ids}, module)
        out["loss"].mean().backward()
        grads = {n.split(".")[0] for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads == trained
    del method.phase
    assert all("lora_" in n for n, p in module.fake_score.named_parameters() if p.requires_grad)
