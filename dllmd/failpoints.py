"""Fault injection for tests: a daemon that dies at an exact point of its work, as ``kill -9`` would.

A test that means to kill a node mid-job must know it is mid-job; a ``kill`` racing the job on a
loaded machine may come after the job ended. So the code calls ``failpoint(name, value)`` at a few
named points, and a daemon started with ``DLLMD_FAILPOINTS`` in its environment acts there:

    DLLMD_FAILPOINTS="train.step@5=exit"                  # die as this worker starts step 5
    DLLMD_FAILPOINTS="jobs.step@60=exit,train.step=exit"  # several, comma-separated

Each entry is ``NAME[@VALUE]=ACTION``: ``NAME`` is a point (below); ``VALUE`` the value it must be
called with (compared as text; without ``@VALUE``, any value); ``ACTION`` is ``exit``: log one line,
then ``os._exit(137)`` (no cleanup, nothing flushed or removed, sockets dropped by the kernel: what
SIGKILL leaves), ``stop``: the whole process stops as SIGSTOP stops it (alive, its connections
open, answering nothing: a hung node), ``sleep:SECONDS``: a node that is slow there (in a worker thread: a straggler; on
the event loop: a hung daemon, which answers nothing meanwhile), or ``scale:FACTOR``: ``failpoint``
returns FACTOR (``nan`` and ``inf`` too) for the caller to multiply what it reports by (a diverging or
NaN loss). The variable is read once, when ``dllmd start`` begins (``load``); a malformed one
stops the start with an error naming it. Unset, as on every real node, ``failpoint`` is one dict
lookup that finds nothing.

Points: ``train.step`` (a worker starts computing a step, or a DiLoCo inner step, on its event loop;
value: the step), ``train.compute`` (the same, in its compute thread), ``train.loss`` (the loss a
worker reports for a step: ``scale``), ``train.stage_step``
(a pipeline stage starts a step; value: the step), ``fed.train`` (a federated client starts its
local steps, in its training thread; value: the round) and ``jobs.step`` (a coordinator starts a step of
a job's loop; value: the step).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Mapping

log = logging.getLogger("dllmd.failpoints")

ENV = "DLLMD_FAILPOINTS"
ACTIONS = ("exit", "stop")
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL

_armed: dict[str, dict[str | None, str]] = {}  # name -> value (None: any) -> action


class FailpointError(ValueError):
    pass


def parse(spec: str) -> dict[str, dict[str | None, str]]:
    armed: dict[str, dict[str | None, str]] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        point, has_action, action = entry.partition("=")
        name, has_value, value = point.strip().partition("@")
        action, name, value = action.strip(), name.strip(), value.strip()
        if not has_action or not name or (has_value and not value) or not _valid(action):
            raise FailpointError(f"{ENV}: {entry!r} is neither NAME=ACTION nor NAME@VALUE=ACTION "
                                 f"(ACTION: {', '.join(ACTIONS)}, sleep:SECONDS or scale:FACTOR)")
        armed.setdefault(name, {})[value if has_value else None] = action
    return armed


def _valid(action: str) -> bool:
    if action in ACTIONS:
        return True
    kind, _, number = action.partition(":")
    try:
        value = float(number)
    except ValueError:
        return False
    return (kind == "sleep" and 0 <= value <= 3600) or kind == "scale"


def load(environ: Mapping[str, str] = os.environ) -> dict[str, dict[str | None, str]]:
    """Arm the failpoints ``environ`` names (and disarm all others); called once at daemon start."""
    global _armed
    _armed = parse(environ.get(ENV, ""))
    if _armed:
        log.warning("failpoints armed (%s=%s): this daemon will die on purpose", ENV, environ[ENV])
    return _armed


def failpoint(name: str, value: object = None) -> float | None:
    """Act here if a failpoint is armed for ``name`` (and this ``value``); a ``scale`` action's factor."""
    points = _armed.get(name)
    if not points:
        return None
    action = points.get(str(value), points.get(None))
    if action and action.startswith("scale:"):
        log.warning("failpoint %s@%s: scaling by %s", name, value, action[6:])
        return float(action[6:])
    if action and action.startswith("sleep:"):
        log.warning("failpoint %s@%s: sleeping %s s", name, value, action[6:])
        time.sleep(float(action[6:]))
        return None
    if action == "exit":
        log.warning("failpoint %s@%s: exiting with %d, as kill -9 would", name, value, EXIT_CODE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_CODE)
    if action == "stop":
        log.warning("failpoint %s@%s: stopping this process, as SIGSTOP would", name, value)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
    return None
