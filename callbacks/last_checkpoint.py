"""`last.ckpt` always holds the newest state: written at the end of training (whatever the checkpoint
interval), and on preemption, at the next batch boundary, where the state is consistent and resumes exactly.

Signals: SIGTERM (Lightning turns it into a `SIGTERMException` after the current batch, on every rank at once),
SIGUSR1 (what `--signal=SIGUSR1@90` sends before a SLURM time limit) and, under submitit, its preemption signal
(SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise) all take the same path: save `last.ckpt`, then requeue.

Requeue: under submitit its own handler (saved when ours was installed) requeues the job after the save; under plain
SLURM rank 0 runs `scontrol requeue $SLURM_JOB_ID`. Lightning's own SLURM handler is switched off in `build_trainer`
(`SLURMEnvironment(auto_requeue=False)`): it saves a separate `hpc_ckpt_N.ckpt` from inside the signal handler,
mid-step, which a run resuming from `last.ckpt` would never read.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


def preemption_signals() -> list[signal.Signals]:
    """SIGUSR1 always; submitit's preemption signal when running under submitit."""
    sigs = [signal.SIGUSR1]
    if "SUBMITIT_FOLDER" in os.environ or "SUBMITIT_EXECUTOR" in os.environ:
        name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
        sig = getattr(signal, f"SIG{name}", None) or getattr(signal, name, None)
        if sig is not None and sig not in sigs:
            sigs.append(sig)
    return sigs


def requeue_slurm_job() -> bool:
    """`scontrol requeue` for this SLURM job (array task aware); False when not under SLURM or it failed."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue SLURM job %s: %s; resubmit it with the same --job-name to resume", job, e)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%s); resubmit it with the same --job-name to resume", job,
                  result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s; it resumes from last.ckpt", job)
    return True


class LastCheckpoint(L.Callback):
    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue
        self.saved_path: Path | None = None
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._saved_step = -1

    def on_fit_start(self, trainer, module) -> None:
        connector = trainer._signal_connector

        def _preempted(signum, frame):
            log.info("received %s: checkpointing at the end of this batch", signal.Signals(signum).name)
            self._received = signum
            connector.received_sigterm = True  # Lightning's graceful-stop flag, checked after each batch

        for sig in preemption_signals():
            try:
                self._previous[sig] = signal.signal(sig, _preempted)
            except ValueError:  # not the main thread (e.g. an interactive tool): leave signals alone
                return

    def _save(self, trainer) -> Path:
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        periodic = trainer.checkpoint_callback
        if periodic is None or getattr(periodic, "_last_global_step_saved", -1) != trainer.global_step:
            trainer.save_checkpoint(path)
        self.saved_path, self._saved_step = path, trainer.global_step
        return path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        """The final checkpoint is taken after the last batch, not at train end: by then Lightning has closed the
        epoch, and a run resumed from that state numbers its batches wrongly (a stopped-at-epoch-end run would
        replay part of an epoch)."""
        if not (0 < trainer.max_steps <= trainer.global_step):
            return
        periodic = trainer.checkpoint_callback
        every = getattr(periodic, "_every_n_train_steps", 0) or 0
        if periodic is not None and every and trainer.global_step % every == 0:
            self.saved_path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"  # it saves this step
            self._saved_step = trainer.global_step
            return
        self._save(trainer)

    def on_train_end(self, trainer, module) -> None:
        if self.saved_path is None or self._saved_step != trainer.global_step:
            self._save(trainer)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = self._save(trainer)
            log.warning("preempted at step %d: saved %s; relaunch with the same run_name to resume",
                        trainer.global_step, path)
            if self.requeue and self._received is not None:
                self._requeue(trainer)

    def _requeue(self, trainer) -> None:
        previous = self._previous.get(self._received)
        if callable(previous):  # submitit's handler: requeues (rank 0) and exits
            self.teardown(trainer, None, "fit")
            previous(self._received, None)
        elif trainer.is_global_zero and SLURMEnvironment.detect():
            requeue_slurm_job()

    def teardown(self, trainer, module, stage: str) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous = {}
