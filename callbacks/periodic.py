"""Work that runs every N optimizer steps and once more when training ends, never twice for one step."""
from __future__ import annotations

from typing import Any

import lightning as L


class EveryNSteps(L.Callback):
    """Subclasses set `every` (0: only at the end) and implement `run(trainer, module)`, which records `_last`."""

    every: int = 0
    _last: int = -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and step != self._last:
            self.run(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step != self._last:
            self.run(trainer, module)

    def run(self, trainer, module) -> Any:
        raise NotImplementedError
