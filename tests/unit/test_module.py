"""The one loop: non-finite losses/gradients are skipped without touching weights; K in a row stop the run."""
import lightning as L
import pytest
import torch

from train.build import build_module, resolved_config
from train.methods.base import Method
from train.nonfinite import NonFiniteError


class Scripted(Method):
    """A method whose loss is NaN on chosen calls (what a diverging objective looks like to the loop)."""

    name = "scripted"

    def __init__(self, bad_calls):
        self.bad, self.calls = set(bad_calls), 0


    def loss(self, batch, module):
        self.calls += 1
        x = module.encode_images(batch["pixels"])
        t = torch.full((x.shape[0],), 500)
        pred = module.unet(x, t, encoder_hidden_states=module.encode_text(batch["input_ids"])).sample
        loss = module.core.per_sample_error(pred, torch.zeros_like(pred))
        if self.calls in self.bad:
            loss = loss * float("nan")
            loss = loss + 0 * pred.flatten(1).sum(1) * float("inf")  # finite? no: inf*0 = nan in the loss too
        return {"loss": loss}


def batches(module, n):
    ids = module.components.tokenizer(["a digit"] * 2, padding="max_length", max_length=12, truncation=True,
                                      return_tensors="pt").input_ids
    data = [{"pixels": torch.randn(2, 3, 16, 16), "input_ids": ids, "skipped": {"decode": 1}} for _ in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=None)


def fit(tiny_cfg, method, steps, max_bad=3):
    module = build_module(tiny_cfg(f"module.max_nonfinite_steps={max_bad}"))
    module.method = method
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    before = [p.detach().clone() for p in module.trainable_parameters()]
    return module, trainer, before


def test_nan_loss_skips_step_and_keeps_weights(tiny_cfg):
    module, trainer, before = fit(tiny_cfg, Scripted(bad_calls={1, 2}), steps=2)
    trainer.fit(module, train_dataloaders=batches(module, 2))
    after = list(module.trainable_parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a NaN step changed the weights"
    assert module.nonfinite_total == 2
    assert module.skipped["decode"] == 2  # skip counts carried in batches are accumulated


def test_good_steps_after_a_bad_one_train(tiny_cfg):
    module, trainer, before = fit(tiny_cfg, Scripted(bad_calls={1}), steps=3)
    trainer.fit(module, train_dataloaders=batches(module, 3))
    assert module.nonfinite_total == 1 and module.nonfinite_streak == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.trainable_parameters()))


def test_consecutive_nonfinite_steps_stop_with_clear_message(tiny_cfg):
    module, trainer, _ = fit(tiny_cfg, Scripted(bad_calls={1, 2, 3, 4}), steps=4, max_bad=3)
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite steps \(last: loss\).*max_nonfinite_steps=3"):
        trainer.fit(module, train_dataloaders=batches(module, 4))


def test_a_nonfinite_micro_batch_skips_the_whole_accumulated_step(tiny_cfg):
    module, _, before = fit(tiny_cfg, Scripted(bad_calls={1}), steps=1)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=batches(module, 2))
    assert trainer.global_step == 1 and module.nonfinite_total == 1, "one optimizer step, counted once"
    assert all(torch.equal(a, b) for a, b in zip(before, module.trainable_parameters()))


def test_nonfinite_gradient_with_finite_loss_is_dropped(tiny_cfg):
    module, trainer, before = fit(tiny_cfg, Scripted(bad_calls=()), steps=1)
    hook = module.unet.conv_in.weight.register_hook(lambda g: g * float("nan"))
    trainer.fit(module, train_dataloaders=batches(module, 1))
    hook.remove()
    assert module.nonfinite_total == 1
    assert all(torch.equal(a, b) for a, b in zip(before, module.trainable_parameters()))


def test_optimizer_sees_only_trainable_parameters_and_config_is_scrubbed(tiny_cfg, monkeypatch):
    cfg = tiny_cfg()
    module = build_module(cfg)
    module.trainer = L.Trainer(max_steps=5, logger=False, accelerator="cpu")
    opt = module.configure_optimizers()["optimizer"]
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in module.unet.parameters())
    resolved = resolved_config(tiny_cfg("+logger.api_key=SECRET123"))
    assert "SECRET123" not in str(resolved)


def test_frozen_encoders_stay_outside_the_module_tree_but_follow_it(tiny_cfg):
    """Strategies wrap and shard only what trains; frozen encoders are held beside it and still move and cast."""
    module = build_module(tiny_cfg())
    names = {n for n, _ in module.named_parameters()}
    assert names and all(n.startswith("unet.") for n in names), "a frozen text encoder leaked into the module tree"
    assert not any(k.startswith("text_encoder.") for k in module.state_dict())
    assert set(module.frozen_models()) == {"text_encoder"} and not module.text_encoder.training
    module.to(torch.bfloat16)
    assert next(module.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(module.unet.parameters()).dtype == torch.bfloat16
    fingerprint = module._frozen_fingerprint
    with torch.no_grad():
        next(module.text_encoder.parameters()).add_(1.0)
    assert module.frozen_fingerprint() != fingerprint, "the frozen encoder is not part of the base fingerprint"


def test_a_trained_text_encoder_is_part_of_the_module(tiny_cfg):
    module = build_module(tiny_cfg("model.train_text_encoder=true"))
    assert any(n.startswith("text_encoder.") for n, _ in module.named_parameters())
    assert "text_encoder" not in module.frozen_models()
