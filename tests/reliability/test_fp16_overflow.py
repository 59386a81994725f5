"""fp16 mixed precision: a loss-scale overflow is skipped by the grad scaler (weights untouched, scale lowered),
not counted as a NaN step, and training goes on. Lightning refuses 16-mixed on CPU, so the test hands the Trainer the
same MixedPrecision plugin a GPU run gets, with the CPU grad scaler."""
import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from train.build import build_module
from train.methods.base import Method


class Spiky(Method):
    """An ordinary denoising-shaped loss, times 1e34 on chosen calls: finite in fp32, inf once the scaler scales it."""

    name = "spiky"

    def __init__(self, spikes):
        self.spikes, self.calls = set(spikes), 0

    def loss(self, batch, module):
        self.calls += 1
        x = batch["pixels"]
        pred = module.unet(x, torch.full((x.shape[0],), 500), encoder_hidden_states=module.encode_text(batch["input_ids"])).sample
        loss = module.core.per_sample_error(pred, torch.zeros_like(pred))
        return {"loss": loss * (1e34 if self.calls in self.spikes else 1.0)}


def fit_fp16(tiny_cfg, method) -> tuple:
    """Three steps of 16-mixed with the CPU grad scaler; (weights, scale) after each, and the module."""
    module = build_module(tiny_cfg("lr_scheduler.name=constant"))
    module.method = method
    ids = module.components.tokenizer(["a digit"] * 2, padding="max_length", max_length=12, return_tensors="pt").input_ids
    data = [{"pixels": torch.randn(2, 3, 16, 16), "input_ids": ids} for _ in range(3)]
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(([p.detach().clone() for p in pl_module.trainable_parameters()],
                              trainer.precision_plugin.scaler.get_scale()))

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", plugins=[plugin], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Snap()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return snapshots, module


def test_fp16_overflow_is_skipped_by_the_scaler_and_training_continues(tiny_cfg):
    snapshots, module = fit_fp16(tiny_cfg, Spiky(spikes={2}))
    (w1, s1), (w2, s2), (w3, s3) = snapshots
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)), "the overflowing step must not change the weights"
    assert s2 < s1, "the scaler lowers the scale after an overflow"
    assert any(not torch.equal(a, b) for a, b in zip(w2, w3)), "the next good step trains"
    assert module.nonfinite_total == 0  # handled by the scaler, not by the NaN guard


class NaNAt(Spiky):
    """NaN added to the loss on chosen calls: the guard's zero loss gives finite (zero) gradients, so the scaler would
    step; the guard must drop that step, and the scaler must still see its unscaled gradients."""

    name = "nan_at"

    def loss(self, batch, module):
        out = super().loss(batch, module)
        return {"loss": out["loss"] + (float("nan") if self.calls in self.spikes else 0.0)}


def test_fp16_nonfinite_loss_is_skipped_by_the_guard(tiny_cfg):
    snapshots, module = fit_fp16(tiny_cfg, NaNAt(spikes={2}))
    weights = [w for w, _ in snapshots]
    w1, w2, w3 = weights
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)), "the NaN step must not change the weights"
    assert any(not torch.equal(a, b) for a, b in zip(w2, w3)), "the next good step trains"
    assert module.nonfinite_total == 1
