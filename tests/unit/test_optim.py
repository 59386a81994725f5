"""Optimizers by config (train/optim.py): Lion against a hand-computed step, Muon + AdamW stepped as one and resumed,
the one-line refusals, and a few real training steps through the module for each CPU optimizer."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from train.build import build_module
from train.optim import Chained, build_optimizer
from train.ops.validate import ConfigError, validate


def test_lion_update_matches_a_hand_computed_step():
    """Lion: c = b1 m + (1-b1) g; p <- p (1 - lr wd) - lr sign(c); m <- b2 m + (1-b2) g."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    opt = build_optimizer({"name": "lion", "lr": 0.1, "betas": [0.9, 0.99], "weight_decay": 0.5}, [p])
    g1, g2 = torch.tensor([0.3, -0.1, 0.0, 2.0]), torch.tensor([-1.0, -0.2, 0.4, -0.001])
    p.grad = g1.clone()
    opt.step()
    expect = torch.tensor([1.0, -2.0, 0.5, 3.0]) * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.1 * g1)
    assert torch.allclose(p.detach(), expect)
    m1 = 0.01 * g1
    p.grad = g2.clone()
    opt.step()
    c2 = 0.9 * m1 + 0.1 * g2  # = [-0.0973, -0.0209, 0.04, 0.0179]: the momentum flips the sign of the last entry
    expect = expect * (1 - 0.05) - 0.1 * torch.sign(c2)
    assert torch.allclose(p.detach(), expect)
    assert torch.sign(c2)[3] == 1 and torch.sign(g2)[3] == -1


def test_muon_takes_hidden_matrices_and_adamw_the_rest_stepped_and_resumed_as_one():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                              torch.nn.Linear(8, 4))
    params = list(net.parameters())
    cfg = {"name": "muon", "lr": 1e-3, "muon_lr": 0.02, "weight_decay": 0.0}
    opt = build_optimizer(cfg, params, modules=[net])
    assert isinstance(opt, Chained)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(net[1].weight), id(net[3].weight)}
    assert len([p for g in adamw.param_groups for p in g["params"]]) == len(params) - 2  # embedding, biases, norm
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # a schedule reaches both children
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01) and adamw.param_groups[0]["lr"] == pytest.approx(5e-4)

    def step():
        opt.zero_grad()
        net(torch.tensor([[1, 2, 3]])).square().mean().backward()
        opt.step()
        sched.step()

    before = [p.detach().clone() for p in params]
    step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    state = opt.state_dict()
    twin = build_optimizer(cfg, params, modules=[net])
    twin.load_state_dict(state)
    assert torch.equal(twin.optimizers[0].state[net[1].weight]["momentum_buffer"],
                       muon.state[net[1].weight]["momentum_buffer"])
    with pytest.raises(ValueError, match="written by another optimizer.name"):
        twin.load_state_dict(torch.optim.AdamW(params).state_dict())


@pytest.mark.parametrize("name", ["adamw", "lion", "muon", "prodigy", "adamw_schedulefree"])
def test_each_cpu_optimizer_trains_the_module(tiny_cfg, name):
    lr = {"adamw": 1e-3, "lion": 1e-4, "muon": 1e-3, "prodigy": 1.0, "adamw_schedulefree": 1e-3}[name]
    sched = ["lr_scheduler.name=constant"] if name == "adamw_schedulefree" else []
    module = build_module(tiny_cfg(f"optimizer.name={name}", f"optimizer.lr={lr}", *sched))
    if name == "adamw_schedulefree":
        module.train()
    module.trainer = L.Trainer(max_steps=5, logger=False, accelerator="cpu")
    opt = module.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in module.trainable_parameters())
    x = torch.randn(2, 3, 16, 16)
    ids = module.components.tokenizer(["a handwritten digit one"] * 2, padding="max_length", max_length=12,
                                      return_tensors="pt").input_ids
    before = [p.detach().clone() for p in module.trainable_parameters()]
    loss = module.unet(x, torch.tensor([10, 500]), encoder_hidden_states=module.encode_text(ids)).sample.square().mean()
    loss.backward()
    from train.optim import schedule_free_mode

    schedule_free_mode(opt, True)  # what the module does before each step
    opt.step()
    moved = sum(not torch.equal(a, b) for a, b in zip(before, module.trainable_parameters()))
    assert moved > 0.9 * len(before)


def test_bad_optimizer_settings_are_one_line(tiny_cfg):
    with pytest.raises(ConfigError, match="optimizer.name") as err:
        validate(tiny_cfg("optimizer.name=sgdx"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="optimizer.name=prodigy with a sharded strategy"):
        validate(tiny_cfg("optimizer.name=prodigy", "strategy=deepspeed_stage2"))
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="optimizer.name=adamw8bit: bitsandbytes' 8-bit optimizers need CUDA"):
        build_optimizer({"name": "adamw8bit", "lr": 1e-3}, p)
    with pytest.raises(ValueError, match=r"optimizer: unknown key\(s\) \['momentum'\]"):
        build_optimizer({"name": "lion", "lr": 1e-3, "momentum": 0.9}, p)
    with pytest.raises(ValueError, match="no trainable 2-D linear weights"):
        build_optimizer({"name": "muon", "lr": 1e-3}, p, modules=[])


def test_chained_muon_trains_checkpoints_and_resumes_through_lightning(tiny_cfg, tmp_path):
    def data(module, n):
        ids = module.components.tokenizer(["a handwritten digit two"] * 2, padding="max_length", max_length=12,
                                          return_tensors="pt").input_ids
        return torch.utils.data.DataLoader([{"pixels": torch.rand(2, 3, 16, 16) * 2 - 1, "input_ids": ids}] * n,
                                           batch_size=None)

    def trainer(steps):
        return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")

    cfg = tiny_cfg("optimizer.name=muon", "lr_scheduler.warmup_steps=1")
    module, t = build_module(cfg), trainer(2)
    t.fit(module, train_dataloaders=data(module, 2))
    t.save_checkpoint(tmp_path / "muon.ckpt", weights_only=False)
    saved = torch.load(tmp_path / "muon.ckpt", map_location="cpu", weights_only=True)["optimizer_states"][0]
    assert len(saved["chained"]) == 2 and saved["chained"][0]["state"], "Muon's momentum was not checkpointed"
    resumed, t2 = build_module(cfg), trainer(4)
    t2.fit(resumed, train_dataloaders=data(resumed, 4), ckpt_path=tmp_path / "muon.ckpt")
    assert t2.global_step == 4
    muon, adamw = t2.optimizers[0].optimizers
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in muon.state.values())
    assert {int(s["step"]) for s in adamw.state.values()} == {4}, "AdamW's state restarted instead of resuming"


def test_schedule_free_trains_on_one_sequence_and_checkpoints_the_average(tiny_cfg, tmp_path):
    from train.optim import schedule_free_mode

    def data(module, n):
        ids = module.components.tokenizer(["a handwritten digit two"] * 2, padding="max_length", max_length=12,
                                          return_tensors="pt").input_ids
        px = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return torch.utils.data.DataLoader([{"pixels": px, "input_ids": ids}] * n, batch_size=None)

    def trainer(steps):
        return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")

    cfg = tiny_cfg("optimizer.name=adamw_schedulefree", "optimizer.lr=1e-2", "lr_scheduler.name=constant",
                   "lr_scheduler.warmup_steps=2")
    straight, t = build_module(cfg), trainer(4)
    t.fit(straight, train_dataloaders=data(straight, 4))
    opt = t.optimizers[0]
    assert opt.param_groups[0]["train_mode"] is False and opt.param_groups[0]["warmup_steps"] == 2
    x = [p.detach().clone() for p in straight.trainable_parameters()]  # what EMA, samples and checkpoints read
    schedule_free_mode(opt, True)
    y = [p.detach().clone() for p in straight.trainable_parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(x, y)), "train and averaged sequences should differ"
    schedule_free_mode(opt, False)
    assert all(torch.allclose(a, p) for a, p in zip(x, straight.trainable_parameters()))

    # a checkpoint holds the averaged weights plus z; loading it and switching to training mode gives back exactly
    # the training sequence the run would have continued from
    t.save_checkpoint(tmp_path / "sf.ckpt", weights_only=False)
    ckpt = torch.load(tmp_path / "sf.ckpt", map_location="cpu", weights_only=True)
    resumed = build_module(cfg)
    resumed.load_state_dict(ckpt["state_dict"], strict=False)
    resumed.trainer = L.Trainer(max_steps=8, logger=False, accelerator="cpu")
    opt2 = resumed.configure_optimizers()["optimizer"]
    opt2.load_state_dict(ckpt["optimizer_states"][0])
    assert all(torch.allclose(a, p) for a, p in zip(x, resumed.trainable_parameters()))
    schedule_free_mode(opt2, True)
    assert all(torch.allclose(a, p, atol=1e-6) for a, p in zip(y, resumed.trainable_parameters()))


def test_schedule_free_refuses_a_decaying_schedule(tiny_cfg):
    module = build_module(tiny_cfg("optimizer.name=adamw_schedulefree", "lr_scheduler.name=cosine"))
    module.trainer = L.Trainer(max_steps=5, logger=False, accelerator="cpu")
    with pytest.raises(ValueError, match="lr_scheduler.name=cosine: optimizer.name=adamw_schedulefree needs no schedule"):
        module.configure_optimizers()
