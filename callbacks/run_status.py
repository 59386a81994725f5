"""RUN/status.json: what a run is doing, for foundry-ui and any tool that watches runs without a tracker.

`{"state": "running", "pid", "host", "started_at", "updated_at", "step", "max_steps", "samples_per_sec", "loss",
"eta_seconds", ...}`, rewritten atomically (tmp + rename) every `every_seconds` by rank 0; at the end the state is
`finished`, `preempted` (SIGTERM: the checkpoint is saved, resume continues) or `failed` with the error's first line.
A run killed outright (SIGKILL, OOM killer) stays `running` with a dead pid; readers check the pid
(ui/runs.py `run_state`)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.progress_line import Progress


def write_status(path: Path, status: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1, default=str))
    os.replace(tmp, path)


class RunStatus(Progress):
    def __init__(self, run_dir: str | Path, every_seconds: float = 5.0):
        super().__init__(every_seconds)
        self.path = Path(run_dir) / "status.json"
        self.base: dict = {}

    def _write(self, trainer, state: str, **extra) -> None:
        if trainer.is_global_zero:
            write_status(self.path, {**self.base, "state": state, "updated_at": time.time(),
                                     **self.snapshot(trainer), **extra})

    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        self.base = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                     "world_size": trainer.world_size}
        self._write(trainer, "running")

    def report(self, trainer) -> None:
        self._write(trainer, "running")

    def on_train_end(self, trainer, module) -> None:
        self._write(trainer, "finished")

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            self._write(trainer, "preempted")
        else:
            first = (str(exception).strip().splitlines() or [""])[0]
            self._write(trainer, "failed", error=f"{type(exception).__name__}: {first}"[:500])
