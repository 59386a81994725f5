"""Test-only callbacks, loaded by the real CLI through Hydra overrides (`+callbacks.x._target_=tests.helpers.X`)."""
import json
import socket

import lightning as L


def free_port() -> int:
    """A free TCP port on loopback (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RecordKeys(L.Callback):
    """Appends, per training batch, the step, epoch, batch index and sample keys to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                                "keys": batch["keys"]}) + "\n")
