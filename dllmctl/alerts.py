"""Alerts on the client's side (:mod:`dllmd.alerts` defines them).

* **Serving**: when inference failover drops a stage's node from a generation, the client that ran the
  generation (``dllmctl infer``, ``serve``, the MCP server) records a ``node_lost`` alert in its own
  log, ``<data dir>/alerts.jsonl`` (one JSON alert a line; the newest :data:`KEPT` are read back).
  Serving has no coordinator: the failure is only ever seen by the client that generated, so that is
  where it is kept. ``dllmctl alerts`` and the MCP resource ``llm://alerts`` read it.
* **Jobs**: :class:`AlertFollower` picks a job's new alerts out of its events as the user's own
  dllmctl follows it (``dllmctl train --alert-command``, ``dllmctl jobs watch``) and delivers each
  with the user's own command or webhook.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dllmd.alerts import Alert, AlertSink, alerts_of
from dllmctl.paths import data_dir

log = logging.getLogger("dllmctl.alerts")

KEPT = 200
LOG_NAME = "alerts.jsonl"


def log_path() -> Path:
    return data_dir() / LOG_NAME


def record(alert: Alert, path: Path | None = None) -> None:
    """Append one alert to the local log: one write of one line (O_APPEND), so concurrent clients'
    lines never interleave. A log that cannot be written is reported, never fatal to the generation."""
    path = path or log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (alert.to_json() + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot record the alert in %s: %s", path, exc)


def recent(limit: int = KEPT, path: Path | None = None) -> list[Alert]:
    """The newest ``limit`` alerts of the local log, oldest first (a damaged line is skipped)."""
    try:
        lines = (path or log_path()).read_text(errors="replace").splitlines()[-limit:]
    except FileNotFoundError:
        return []
    alerts = []
    for line in lines:
        alert = Alert.from_event({"kind": "alert.", "message": line})
        if alert is not None:
            alerts.append(alert)
    return alerts


class AlertFollower:
    """A job's alerts not seen yet, delivered (in this process, before it goes on) to ``sink``."""

    def __init__(self, sink: AlertSink):
        self.sink = sink
        self.seen: set[str] = set()

    def feed(self, events: list[dict]) -> list[Alert]:
        fresh = []
        for alert in alerts_of(events):
            key = alert.to_json()
            if key not in self.seen:
                self.seen.add(key)
                fresh.append(alert)
                self.sink.deliver_now(alert)
        return fresh


def job_alerts(shown: dict) -> list[dict]:
    """The alerts among a ``jobs show`` reply's events, as maps."""
    return [json.loads(a.to_json()) for a in alerts_of(shown.get("events", []))]
