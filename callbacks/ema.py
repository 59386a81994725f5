"""Exponential moving average of the trained weights (diffusers' EMAModel), saved in every checkpoint.

Sampling, evaluation and export look the callback up with `ema_weights(trainer, module)` and swap the
averaged weights in for the duration of a `with` block.

Under ZeRO-3 and FSDP a rank holds only a slice of each parameter; the EMA is of the whole (gathered) weights, the
same on every rank, so rank 0's copy in the checkpoint is complete. That costs one extra gather per optimizer step
and a full fp32 copy per rank; `every_n_steps` > 1 amortises the gather (the decay is applied per update).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import lightning as L
from diffusers.training_utils import EMAModel

from train.strategies import full_parameters, shards_parameters


class EMA(L.Callback):
    def __init__(self, decay: float = 0.999, update_after_step: int = 0, use_ema_warmup: bool = False,
                 every_n_steps: int = 1):
        self.decay = decay
        self.every_n_steps = max(1, int(every_n_steps))
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.ema: EMAModel | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step = -1

    def _init(self, module) -> None:
        if self.ema is None:
            params = module.trainable_parameters()
            with full_parameters(module, params):
                self.ema = EMAModel(params, decay=self.decay, foreach=True,
                                    update_after_step=self.update_after_step, use_ema_warmup=self.use_ema_warmup)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None
        self.ema.to(module.device)

    def on_fit_start(self, trainer, module) -> None:
        self._init(module)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._last_step:  # an optimizer step happened (accumulation-aware)
            self._last_step = trainer.global_step
            if trainer.global_step % self.every_n_steps == 0:
                params = module.trainable_parameters()
                with full_parameters(module, params):
                    self.ema.step(params)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else (self._pending or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state_dict)
        else:
            self._pending = state_dict

    @contextlib.contextmanager
    def averaged(self, module) -> Iterator[None]:
        """The EMA weights in place of the live ones for the block (a collective under ZeRO-3/FSDP: all ranks enter)."""
        params = module.trainable_parameters()
        with full_parameters(module, params, writeback=True):
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            yield
        finally:
            with full_parameters(module, params, writeback=True):
                self.ema.restore(params)


def ema_weights(trainer, module) -> contextlib.AbstractContextManager:
    """The EMA weights for a `with` block when an EMA callback is active; the live weights otherwise."""
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, EMA) and cb.ema is not None:
            return cb.averaged(module)
    return contextlib.nullcontext()


def samples_here(trainer) -> bool:
    """Whether this rank runs the sampler: rank 0, or every rank when parameters are sharded (ZeRO-3, FSDP), since a
    sharded forward is a collective; only rank 0 then writes and logs what they made."""
    return trainer.is_global_zero or shards_parameters(trainer.strategy)


@contextlib.contextmanager
def inference_weights(trainer, module, use_ema: bool = True) -> Iterator[None]:
    """Eval mode and, when asked and present, the EMA weights, for a sampling or evaluation block; under mixed
    precision also the training step's autocast (frozen weights are held in its dtype: train/precision.py)."""
    was_training = module.training
    module.eval()
    plugin = getattr(trainer, "precision_plugin", None)
    try:
        with ema_weights(trainer, module) if use_ema else contextlib.nullcontext(), \
                (plugin.forward_context() if plugin is not None else contextlib.nullcontext()):
            yield
    finally:
        module.train(was_training)
