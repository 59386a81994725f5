"""`last.ckpt` always holds the newest state: written at the end of training (whatever the checkpoint
interval), and on preemption: SIGTERM (and SIGUSR1 outside SLURM) saves it at the next batch boundary, then exits.

Lightning turns SIGTERM into a `SIGTERMException` after the current batch (every rank at once) and calls
`on_exception`; the state is consistent there, so the checkpoint resumes exactly. Under SLURM with
auto-requeue, Lightning's own SIGUSR1 handler saves and requeues; elsewhere SIGUSR1 would kill the process,
so it is routed to the same graceful path.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class LastCheckpoint(L.Callback):
    def __init__(self) -> None:
        self.saved_path: Path | None = None
        self._previous = None

    def on_fit_start(self, trainer, module) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return
        connector = trainer._signal_connector

        def _sigusr1(signum, frame):
            log.info("received SIGUSR1: checkpointing at the end of this batch")
            connector.received_sigterm = True

        try:
            self._previous = signal.signal(signal.SIGUSR1, _sigusr1)
        except ValueError:  # not the main thread (e.g. an interactive tool): leave signals alone
            self._previous = None

    def _save(self, trainer) -> Path:
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        periodic = trainer.checkpoint_callback
        if periodic is None or getattr(periodic, "_last_global_step_saved", -1) != trainer.global_step:
            trainer.save_checkpoint(path)
        self.saved_path = path
        return path

    def on_train_end(self, trainer, module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = self._save(trainer)
            log.warning("preempted at step %d: saved %s; relaunch with the same run_name to resume",
                        trainer.global_step, path)

    def teardown(self, trainer, module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
