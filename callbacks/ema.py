"""Exponential moving average of the trained weights (diffusers' EMAModel), saved in every checkpoint.

Sampling, evaluation and export look the callback up with `ema_weights(trainer, module)` and swap the
averaged weights in for the duration of a `with` block.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import lightning as L
from diffusers.training_utils import EMAModel


class EMA(L.Callback):
    def __init__(self, decay: float = 0.999, update_after_step: int = 0, use_ema_warmup: bool = False):
        self.decay = decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.ema: EMAModel | None = None
        self._pending: dict[str, Any] | None = None
        self._last_step = -1

    def _init(self, module) -> None:
        if self.ema is None:
            self.ema = EMAModel(module.trainable_parameters(), decay=self.decay, foreach=True,
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
            self.ema.step(module.trainable_parameters())

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else (self._pending or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state_dict)
        else:
            self._pending = state_dict

    @contextlib.contextmanager
    def averaged(self, module) -> Iterator[None]:
        params = module.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)


def ema_weights(trainer, module) -> contextlib.AbstractContextManager:
    """The EMA weights for a `with` block when an EMA callback is active; the live weights otherwise."""
    for cb in trainer.callbacks if trainer is not None else []:
        if isinstance(cb, EMA) and cb.ema is not None:
            return cb.averaged(module)
    return contextlib.nullcontext()
