"""What must hold on a CUDA device (run by `make gpu-check`, or `pytest -m gpu`): bf16 autocast losses finite and
close to fp32 on a fixed batch, the non-finite guard on fused AdamW, an FSDP checkpoint round trip on one rank, a
bitsandbytes 8-bit AdamW step. Deselected by default (`-m 'not slow and not gpu'`) and skipped without CUDA."""
import subprocess

import pytest
import torch

from tests.conftest import cli, small
from train.build import build_module, load_module
from train.optim import build_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def fixed_loss(module, dtype=None) -> torch.Tensor:
    from models.components import tokenize

    g = torch.Generator().manual_seed(0)
    batch = {"pixels": (torch.rand(8, 3, 16, 16, generator=g) * 2 - 1).cuda(),
             "input_ids": tokenize(module.components.tokenizer, ["a handwritten digit two"] * 8).cuda()}
    module.noise_generator.manual_seed(0)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        return module.method.loss(batch, module)["loss"].mean()


def test_bf16_autocast_loss_is_finite_and_close_to_fp32(tiny_cfg):
    module = build_module(tiny_cfg()).cuda().train()
    fp32, bf16 = fixed_loss(module), fixed_loss(module, torch.bfloat16)
    assert torch.isfinite(bf16)
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.02)
    bf16.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.trainable_parameters() if p.grad is not None)


def test_fused_adamw_step_with_a_nan_gradient_is_dropped(tiny_cfg):
    import lightning as L

    module = build_module(tiny_cfg("trainer.max_steps=2"))
    before = [p.detach().clone() for p in module.trainable_parameters()]
    data = torch.utils.data.DataLoader([{"pixels": torch.zeros(4, 3, 16, 16), "input_ids": torch.zeros(
        4, module.components.tokenizer.model_max_length, dtype=torch.long)}] * 2, batch_size=None)
    module.method.loss = (lambda loss: lambda b, m: {**loss(b, m), "loss": loss(b, m)["loss"] * float("nan")})(
        module.method.loss)
    trainer = L.Trainer(max_steps=1, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data)
    assert module.nonfinite_total == 1
    assert all(torch.equal(a, b.detach().cpu()) for a, b in zip(before, module.trainable_parameters()))


def test_fsdp_checkpoint_round_trip_on_one_rank(tmp_path):
    run = tmp_path / "fsdp"
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=fsdp", "strategy=fsdp",
                                    "trainer.precision=bf16-mixed", "trainer.max_steps=2")),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    module = load_module(ckpt, use_ema=False)
    res = subprocess.run(cli(*small(f"paths.output_dir={tmp_path}", "run_name=fsdp", "strategy=fsdp",
                                    "trainer.precision=bf16-mixed", "trainer.max_steps=4")),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "Restored all states" in res.stdout + res.stderr, res.stderr[-3000:]
    assert sum(p.numel() for p in module.trainable_parameters()) > 0


def test_8bit_adamw_steps_and_keeps_uint8_state():
    torch.manual_seed(0)
    net = torch.nn.Linear(256, 256).cuda()
    before = net.weight.detach().clone()
    opt = build_optimizer({"name": "adamw8bit", "lr": 1e-3}, list(net.parameters()))
    net(torch.randn(8, 256, device="cuda")).square().mean().backward()
    opt.step()
    assert not torch.equal(before, net.weight) and torch.isfinite(net.weight).all()
    assert any(t.dtype == torch.uint8 for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
