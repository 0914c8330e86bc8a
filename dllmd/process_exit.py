"""Leaving a command-line process without the interpreter's module teardown.

With torch and transformers imported, Python's finalization (clearing thousands of modules and
collecting what they held) takes about a second per process (measured: 1.0 s of a 4.8 s run), paid
by every daemon that stops and every ``dllmctl`` command that loaded a model, and by whoever waits on
them (``cluster down`` waits for each daemon). Nothing durable depends on it: files are written
atomically and closed, SQLite commits per statement. So after the command has finished, this does
what a normal exit does that matters (join the non-daemon threads, run the atexit handlers, flush
stdout and stderr) and ends the process with the command's exit status.

Uncaught exceptions and Ctrl+C take Python's own path (its traceback, its exit status for SIGINT), and
so does a run under a profiler, debugger or coverage (they report at the interpreter's exit).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def run_and_exit(command: Callable[[], object]) -> NoReturn:
    """Run ``command`` (a typer app), then leave with its status as described above."""
    if sys.gettrace() or sys.getprofile():  # a profiler, debugger or coverage reports at the usual exit
        command()
        sys.exit(0)
    try:
        command()
        status = 0
    except SystemExit as exc:
        status = _status(exc.code)
    # The interpreter's own first two steps of an exit (CPython): threading's exit hooks (which wake
    # idle executor workers) and the join of every non-daemon thread; then the atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said on it
            pass
    os._exit(status)


def _status(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
