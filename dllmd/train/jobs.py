"""Durable job state of a coordinator: ``<home>/jobs.sqlite``.

SQLite gives atomic, crash-safe updates for free (WAL journal): a job's state, the events of its
life (nodes lost, shards moved, checkpoints), and one metrics row per node and step. A daemon that
restarts finds jobs it was running marked ``interrupted``; ``jobs resume`` continues them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from dllmd.observe.metrics import NodeMetrics

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,            -- queued, running, stopping, stopped, interrupted, failed, done
    spec TEXT NOT NULL,             -- the job definition (JSON)
    created REAL NOT NULL,
    updated REAL NOT NULL,
    step INTEGER NOT NULL DEFAULT 0, -- steps completed
    total_steps INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL REFERENCES jobs(id),
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    job TEXT NOT NULL REFERENCES jobs(id),
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    data TEXT NOT NULL,             -- {"loss", "lr", "grad_norm", "tokens_per_s", "step_s", "nodes": {...}}
    PRIMARY KEY (job, step)
);
"""

FINISHED = ("stopped", "interrupted", "failed", "done")


class JobError(ValueError):
    """A request about a job that cannot be honoured; the message says why."""


class JobFailed(RuntimeError):
    """A running job cannot go on: it is marked failed."""


class JobInterrupted(RuntimeError):
    """A running job lost part of itself it cannot do without (a pipeline stage with no replica left):
    it is marked interrupted, and ``jobs resume`` continues it from its last complete checkpoint."""


class JobStore:
    """``metrics``: the node's counters, told of every step and event recorded here (the one place the
    training figures of ``node.stats`` and the Prometheus endpoint come from)."""

    def __init__(self, path: Path, metrics: NodeMetrics | None = None):
        self.path = path
        self.observer = metrics
        self._lock = threading.Lock()  # one connection, used from the loop and from worker threads
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def create(self, job: str, spec: dict, total_steps: int) -> None:
        now = time.time()
        self._run("INSERT INTO jobs (id, state, spec, created, updated, total_steps) VALUES (?, 'queued', ?, ?, ?, ?)",
                  (job, json.dumps(spec), now, now, total_steps))
        self.event(job, "submitted", f"{total_steps} steps on {len(spec['nodes'])} node(s)")

    def get(self, job: str) -> dict:
        rows = self._run("SELECT id, state, spec, created, updated, step, total_steps, error FROM jobs WHERE id = ?",
                         (job,))
        if not rows:
            raise JobError(f"no job {job!r} on this coordinator; see 'dllmctl jobs list'")
        return _job(rows[0])

    def list(self) -> list[dict]:
        rows = self._run("SELECT id, state, spec, created, updated, step, total_steps, error FROM jobs "
                         "ORDER BY created")
        return [_job(r) for r in rows]

    def update_spec(self, job: str, spec: dict) -> None:
        """The job's spec as it now runs (a resume moved stages to other nodes)."""
        self._run("UPDATE jobs SET spec = ?, updated = ? WHERE id = ?", (json.dumps(spec), time.time(), job))

    def set_state(self, job: str, state: str, error: str | None = None) -> None:
        self._run("UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?", (state, error, time.time(), job))

    def record_step(self, job: str, step: int, metrics: dict) -> None:
        """Step ``step`` (0-based) completed: its metrics and the progress, in one transaction."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("INSERT OR REPLACE INTO metrics (job, step, time, data) VALUES (?, ?, ?, ?)",
                             (job, step, now, json.dumps(metrics)))
            self._db.execute("UPDATE jobs SET step = ?, updated = ? WHERE id = ?", (step + 1, now, job))
            self._db.execute("COMMIT")
        if self.observer is not None:
            self.observer.training_step(job, step, metrics)

    def rewind(self, job: str, step: int) -> None:
        """Back to ``step`` completed steps (resuming from a checkpoint): later metrics are dropped."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM metrics WHERE job = ? AND step >= ?", (job, step))
            self._db.execute("UPDATE jobs SET step = ?, updated = ? WHERE id = ?", (step, time.time(), job))
            self._db.execute("COMMIT")

    def metrics(self, job: str, after_step: int = -1, limit: int = 1000) -> list[dict]:
        rows = self._run("SELECT step, time, data FROM metrics WHERE job = ? AND step > ? ORDER BY step LIMIT ?",
                         (job, after_step, limit))
        return [{"step": step, "time": t, **json.loads(data)} for step, t, data in rows]

    def last_with(self, job: str, key: str) -> dict | None:
        """The latest metrics row that has ``key`` (a held-out evaluation is not in every step's row)."""
        rows = self._run("SELECT step, time, data FROM metrics WHERE job = ? AND data LIKE ? ORDER BY step DESC "
                         "LIMIT 1", (job, f'%"{key}"%'))
        return {"step": rows[0][0], "time": rows[0][1], **json.loads(rows[0][2])} if rows else None

    def event(self, job: str, kind: str, message: str) -> None:
        self._run("INSERT INTO events (job, time, kind, message) VALUES (?, ?, ?, ?)", (job, time.time(), kind, message))
        if self.observer is not None:
            self.observer.job_event(job, kind)

    def events(self, job: str) -> list[dict]:
        rows = self._run("SELECT time, kind, message FROM events WHERE job = ? ORDER BY seq", (job,))
        return [{"time": t, "kind": kind, "message": message} for t, kind, message in rows]

    def mark_interrupted(self) -> list[str]:
        """At daemon start: jobs that were running when it stopped can only be resumed now."""
        rows = self._run("SELECT id FROM jobs WHERE state IN ('queued', 'running', 'stopping')")
        for (job,) in rows:
            self.set_state(job, "interrupted", "the coordinator daemon stopped while the job ran; "
                                               "'dllmctl jobs resume' continues from the last checkpoint")
            self.event(job, "interrupted", "coordinator restarted")
        return [job for (job,) in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _job(row: tuple) -> dict:
    job, state, spec, created, updated, step, total, error = row
    return {"job": job, "state": state, "spec": json.loads(spec), "created": created, "updated": updated,
            "step": step, "total_steps": total, "error": error}
