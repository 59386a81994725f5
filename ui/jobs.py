"""foundry-ui's local job queue: jobs persist in a small SQLite database, so a restart of the app loses nothing.

A job is a list of steps, each one of the project's own CLIs (COMMANDS) with its arguments as a list: nothing goes
through a shell and no other program is ever started (the one exception is `sbatch`, only when the app was started
with `--slurm`, for a script the project's own launcher rendered). One job runs per slot (a GPU set, given as
CUDA_VISIBLE_DEVICES); the rest wait in order. A worker thread starts what can start and notices what ended.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from ui.runs import pid_alive

log = logging.getLogger("foundry.ui")

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {  # the CLI name a step names -> the module run with this interpreter
    "foundry-train": "train.ops.main",
    "foundry-shards": "train.ops.shards",
    "foundry-export": "train.ops.export",
    "foundry-sample": "train.ops.sample",
    "foundry-eval": "train.ops.evaluate",
}
SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, title TEXT NOT NULL, steps TEXT NOT NULL,
    run_dir TEXT, log TEXT NOT NULL, state TEXT NOT NULL, step_index INTEGER NOT NULL DEFAULT 0, pid INTEGER,
    slot TEXT, created REAL NOT NULL, started REAL, ended REAL, returncode INTEGER)"""
ACTIVE = ("queued", "running")


class Conflict(RuntimeError):
    """An action that the job's or run's state does not allow (cancel a finished job); the message says why."""


def argv_for(step: list[str], slurm: bool = False) -> list[str]:
    """The command line of one step; refuses anything that is not one of the project's CLIs."""
    if not step or not all(isinstance(a, str) for a in step):
        raise ValueError(f"a job step must be a list of strings, got {step!r}")
    if step[0] in COMMANDS:
        return [sys.executable, "-m", COMMANDS[step[0]], *step[1:]]
    if slurm and step[0] == "sbatch" and len(step) == 2 and step[1].endswith("launch.sbatch"):
        return ["sbatch", step[1]]
    raise ValueError(f"'{step[0]}' is not a command foundry-ui runs; it runs only {', '.join(COMMANDS)}")


class JobQueue:
    def __init__(self, db: Path, logs: Path, slots: list[str | None] | None = None, slurm: bool = False):
        self.db, self.logs, self.slurm = Path(db), Path(logs), slurm
        self.slots = [s or "" for s in (slots or [""])]  # "": every device (no CUDA_VISIBLE_DEVICES)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.db, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(SCHEMA)
        self._procs: dict[int, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- records -------------------------------------------------------------------------------------------------
    def _rows(self, sql: str, *args) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, args).fetchall()]

    def _set(self, job_id: int, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._conn.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def submit(self, kind: str, title: str, steps: list[list[str]], run_dir: Path | None = None) -> dict:
        for step in steps:
            argv_for(step, self.slurm)  # refuse before anything is stored
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO jobs (kind, title, steps, run_dir, log, state, created) VALUES (?, ?, ?, ?, '', "
                "'queued', ?)", (kind, title, json.dumps(steps), str(run_dir) if run_dir else None, time.time()))
            job_id = cur.lastrowid
            log_path = (Path(run_dir) / "launch.log") if run_dir else self.logs / f"job-{job_id}.log"
            self._set(job_id, log=str(log_path))
        return self.get(job_id)

    def get(self, job_id: int) -> dict:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", job_id)
        if not rows:
            raise LookupError(f"no job {job_id}")
        job = rows[0]
        job["steps"] = json.loads(job["steps"])
        return job

    def jobs(self, limit: int = 200) -> list[dict]:
        rows = self._rows("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", limit)
        for r in rows:
            r["steps"] = json.loads(r["steps"])
        return rows

    def active_run_dirs(self) -> dict[str, dict]:
        return {r["run_dir"]: r for r in self._rows("SELECT * FROM jobs WHERE state IN ('queued', 'running') AND "
                                                     "run_dir IS NOT NULL")}

    def cancel(self, job_id: int) -> dict:
        with self._lock:  # the worker's tick holds it too: a job cannot start between the read and the write
            job = self.get(job_id)
            if job["state"] == "queued":
                self._set(job_id, state="cancelled", ended=time.time())
            elif job["state"] == "running":
                self.signal(job, signal.SIGTERM)  # foundry-train checkpoints on SIGTERM, then exits (preempted)
            else:
                raise Conflict(f"job {job_id} is {job['state']}; only queued or running jobs can be cancelled")
            return self.get(job_id)

    def signal(self, job: dict, sig: int) -> None:
        if job.get("pid"):
            try:
                os.killpg(job["pid"], sig)  # the job's own session: every rank it started
            except (ProcessLookupError, PermissionError):
                pass

    # -- the worker ----------------------------------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: running jobs whose process is gone are marked interrupted (resumable from their last
        checkpoint); queued jobs stay queued and start as before."""
        for job in self._rows("SELECT * FROM jobs WHERE state = 'running'"):
            if not pid_alive(job["pid"]):
                self._set(job["id"], state="interrupted", ended=time.time())

    def tick(self) -> None:
        with self._lock:
            for job in self._rows("SELECT * FROM jobs WHERE state = 'running'"):
                self._poll(job)
            busy = {j["slot"] for j in self._rows("SELECT slot FROM jobs WHERE state = 'running'")}
            for job in self._rows("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id"):
                free = [s for s in self.slots if s not in busy]
                if not free:
                    break
                self._start(job, free[0], job["step_index"])
                busy.add(free[0])

    def _poll(self, job: dict) -> None:
        proc = self._procs.get(job["id"])
        if proc is None:  # started by an earlier app: no exit code to read
            if not pid_alive(job["pid"]):
                self._set(job["id"], state="interrupted", ended=time.time())
            return
        rc = proc.poll()
        if rc is None:
            return
        self._procs.pop(job["id"], None)
        steps = json.loads(job["steps"])
        if rc == 0 and job["step_index"] + 1 < len(steps):
            self._start(job, job["slot"], job["step_index"] + 1)
            return
        state = "done" if rc == 0 else "stopped" if rc in (143, -signal.SIGTERM) else "failed"
        self._set(job["id"], state=state, returncode=rc, ended=time.time())

    def _start(self, job: dict, slot: str, index: int) -> None:
        steps = json.loads(job["steps"])
        argv = argv_for(steps[index], self.slurm)
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "PYTHONUNBUFFERED": "1"}
        if slot:
            env["CUDA_VISIBLE_DEVICES"] = slot
        log_path = Path(job["log"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"$ {' '.join(steps[index])}\n")
            f.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[job["id"]] = proc
        fields = {"state": "running", "pid": proc.pid, "slot": slot, "step_index": index}
        if index == 0:
            fields["started"] = time.time()
        self._set(job["id"], **fields)
        log.info("job %s started: %s", job["id"], " ".join(steps[index]))

    def start(self, interval: float = 1.0) -> None:
        self.recover()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.tick()
                except Exception:  # the worker must outlive one bad job record
                    log.exception("job queue tick failed")

        self._thread = threading.Thread(target=loop, name="foundry-ui-queue", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            self._conn.close()

