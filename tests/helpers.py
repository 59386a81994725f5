"""Test-only callbacks, loaded by the real CLI through Hydra overrides (`+callbacks.x._target_=tests.helpers.X`)."""
import json

import lightning as L


class RecordKeys(L.Callback):
    """Appends, per training batch, the step, epoch, batch index and sample keys to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                                "keys": batch["keys"]}) + "\n")
