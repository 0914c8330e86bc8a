"""Alerts: something about a job (or a served model) that its owner should hear of now.

An alert is a typed record (:class:`Alert`) stored where the thing it is about already keeps its
history: a training job's alerts are events of the job (kind ``alert.<code>``, the alert's JSON as
the message) in the coordinator's ``jobs.sqlite``, so ``jobs show``, ``dllmctl metrics`` and the MCP
resources see them with everything else. Serving alerts are about a client's own generation, so they
live in that client's local log (:mod:`dllmctl.alerts`).

Delivery (:class:`AlertSink`) runs a command (no shell: ``shlex.split``, the alert's JSON on stdin,
with a timeout) and/or POSTs the JSON to a webhook. Both are configured only by whoever owns the
machine that runs them: the ``[alerts]`` table of a coordinator's node.toml (:class:`AlertSettings`,
also the detectors' thresholds), or a user's own ``dllmctl train --alert-command`` / ``dllmctl jobs
watch``. A job submitted over the network never carries a command. A failed delivery is logged, never
fatal.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields

log = logging.getLogger("dllmd.alerts")

EVENT_PREFIX = "alert."
SEVERITY = {"loss_nan": "critical", "loss_diverged": "critical", "node_lost": "warning", "node_hung": "warning",
            "stall": "warning", "straggler": "info", "disk_low": "warning", "epsilon_budget": "warning"}
CODES = tuple(SEVERITY)


class AlertError(ValueError):
    """Alert settings that cannot be used; the message names the setting."""


@dataclass
class Alert:
    code: str  # one of CODES
    severity: str  # info, warning, critical
    job: str  # the job (or, serving, the model) it is about
    node: str  # the node it is about ("" when the whole job)
    message: str
    time: float = field(default_factory=time.time)
    details: dict = field(default_factory=dict)

    @classmethod
    def of(cls, code: str, job: str, message: str, node: str = "", **details) -> "Alert":
        if code not in SEVERITY:
            raise ValueError(f"unknown alert code {code!r}")
        return cls(code, SEVERITY[code], job, node, message, time.time(), details)

    @property
    def kind(self) -> str:
        """The job event kind it is stored as."""
        return EVENT_PREFIX + self.code

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False, default=str)

    @classmethod
    def from_event(cls, event: dict) -> "Alert | None":
        """The alert a job event holds, or None (another kind of event, or not an alert's JSON)."""
        if not event.get("kind", "").startswith(EVENT_PREFIX):
            return None
        try:
            data = json.loads(event["message"])
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (ValueError, KeyError, TypeError):
            return None


def alerts_of(events: list[dict]) -> list[Alert]:
    return [a for a in map(Alert.from_event, events) if a is not None]


@dataclass
class AlertSettings:
    """The ``[alerts]`` table of node.toml: where a coordinator delivers its jobs' alerts, and the
    detectors' thresholds (``dllmd.train.watch`` says what each means)."""

    command: str = ""  # run on each alert, no shell, the alert's JSON on stdin
    webhook: str = ""  # http(s) URL each alert's JSON is POSTed to
    timeout_s: float = 10.0  # per delivery
    diverge_factor: float = 3.0  # loss above this times its running minimum ...
    diverge_steps: int = 5  # ... this many steps in a row: loss_diverged
    stall_factor: float = 10.0  # no step for this times the median step time ...
    stall_min_s: float = 60.0  # ... and at least this long: stall (and node_hung for whoever has not answered)
    straggler_factor: float = 3.0  # a node's compute time above this times the others' median ...
    straggler_min_s: float = 1.0  # ... and above this: straggler
    disk_min_free_mb: float = 1024.0  # free space of the coordinator's home below this: disk_low
    epsilon_fraction: float = 0.9  # DP: epsilon spent at this share of --dp-epsilon-budget: epsilon_budget

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "str":
                if not isinstance(value, str):
                    raise AlertError(f"alerts.{f.name} must be a string, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise AlertError(f"alerts.{f.name} must be a non-negative number, got {value!r}")
        if self.command:
            try:
                if not shlex.split(self.command):
                    raise ValueError("empty")
            except ValueError as exc:
                raise AlertError(f"alerts.command cannot be split into a program and its arguments: {exc}") from None
        if self.webhook and not self.webhook.startswith(("http://", "https://")):
            raise AlertError(f"alerts.webhook must be an http:// or https:// URL, got {self.webhook!r}")
        if self.diverge_factor <= 1 or self.stall_factor <= 1 or self.straggler_factor <= 1:
            raise AlertError("alerts.diverge_factor, stall_factor and straggler_factor must be above 1")
        if not 0 < self.epsilon_fraction <= 1:
            raise AlertError(f"alerts.epsilon_fraction must be in (0, 1], got {self.epsilon_fraction}")

    @classmethod
    def from_toml(cls, data) -> "AlertSettings":
        if not isinstance(data, dict):
            raise AlertError(f"alerts must be a table ([alerts]), got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AlertError(f"unknown setting(s) alerts.{', alerts.'.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_toml(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != getattr(AlertSettings, k, None)}


class AlertSink:
    """Delivers alerts to a command and/or a webhook, each in a thread of its own (a slow receiver never
    holds up training or the event loop)."""

    def __init__(self, command: str = "", webhook: str = "", timeout_s: float = 10.0):
        self.argv = shlex.split(command) if command else []
        self.webhook = webhook
        self.timeout_s = timeout_s

    @classmethod
    def of(cls, settings: AlertSettings) -> "AlertSink":
        return cls(settings.command, settings.webhook, settings.timeout_s)

    @property
    def enabled(self) -> bool:
        return bool(self.argv or self.webhook)

    def deliver(self, alert: Alert) -> threading.Thread | None:
        if not self.enabled:
            return None
        thread = threading.Thread(target=self.deliver_now, args=(alert,), name=f"alert-{alert.code}", daemon=True)
        thread.start()
        return thread

    def deliver_now(self, alert: Alert) -> None:
        body = alert.to_json().encode()
        if self.argv:
            try:
                done = subprocess.run(self.argv, input=body, capture_output=True, timeout=self.timeout_s, check=False)
                if done.returncode:
                    log.warning("alert command %s exited %d: %s", self.argv[0], done.returncode,
                                done.stderr.decode(errors="replace")[-300:])
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("alert command %s failed: %s", self.argv[0], exc)
        if self.webhook:
            request = urllib.request.Request(self.webhook, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    reply.read()
            except (OSError, urllib.error.URLError, ValueError) as exc:
                log.warning("alert webhook %s failed: %s", self.webhook, exc)
