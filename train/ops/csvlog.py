"""Lightning's CSVLogger, made safe for resumed runs.

The stock writer deletes `metrics.csv` when its folder exists, so a relaunched (resumed) run wiped the history that
`foundry-report` and scripts read, and it only flushes every 100 steps, so a killed run often left nothing. This one
appends to the existing file and flushes every few steps. Rows the killed run wrote for steps at or after the
resumed step are dropped at the first write, so the file reads as one run's history."""
from __future__ import annotations

import csv

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingWriter(ExperimentWriter):
    _trimmed = False

    def _check_log_dir_exists(self) -> None:
        fs = get_filesystem(self.log_dir)
        if fs.isfile(self.metrics_file_path):  # continue the file: its columns are ours already
            with fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def save(self) -> None:
        if not self.metrics:
            return
        if not self._trimmed and self._fs.isfile(self.metrics_file_path):
            first = min(int(m["step"]) for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
        self._trimmed = True
        super().save()


class ResumableCSVLogger(CSVLogger):
    def __init__(self, *args, flush_logs_every_n_steps: int = 10, **kwargs) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment
