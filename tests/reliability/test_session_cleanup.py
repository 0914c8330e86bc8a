"""Nothing left behind: a client that stops mid-generation leaves no session on any stage.

Ctrl+C during `dllmctl infer` closes the session on every stage before the command exits (130, no
traceback); a client killed outright (kill -9: nothing of it runs) sends no keepalive, and every
stage frees its session within the lease (`SESSION_LEASE_S`) and one sweep, not the old 600 s TTL.
Real daemons and the real CLI, a tiny llama split over two nodes.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from dllmctl.cluster.live import query_nodes
from dllmctl.inference.session import SESSION_LEASE_S
from dllmd.inference.ops import SWEEP_INTERVAL_S
from tests.reliability.conftest import MODEL, serving_cluster

CONTEXT = 4096


@pytest.fixture
def served(user_env, user, tmp_path):
    """Two daemons serving a tiny llama, registered in the user's own files so that the `dllmctl`
    subprocesses find them."""
    with serving_cluster(user, tmp_path, 2, context=CONTEXT) as served:
        yield served


def _sessions(served) -> dict[str, int]:
    rows = asyncio.run(query_nodes(*served))
    return {r["name"]: sum(s["sessions"] for s in r["serving"]) for r in rows}


def _start_long_generation(served) -> subprocess.Popen:
    """A generation far longer than the test waits (a prompt whose greedy continuation has no end of
    sequence), streaming; returns once every stage holds it."""
    proc = subprocess.Popen([sys.executable, "-m", "dllmctl", "infer", "the cat sat on the mat", "-m", MODEL, "--raw",
                             "--temperature", "0", "--max-new-tokens", str(CONTEXT - 16)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the generation ended early: {proc.communicate()}"
        if all(n >= 1 for n in _sessions(served).values()):
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the stages never held the session")


def _wait_for_no_sessions(served, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not any(_sessions(served).values()):
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"sessions still open after {timeout:.0f} s: {_sessions(served)}")


def test_ctrl_c_closes_the_session_on_every_stage_and_a_killed_client_is_freed_within_the_lease(served, report_figures):
    proc = _start_long_generation(served)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    # Closed by the client on its way out, not left to its lease (SESSION_LEASE_S + a sweep): the bound
    # leaves a loaded machine room while staying below what an expiring lease would take.
    assert _wait_for_no_sessions(served, timeout=SESSION_LEASE_S - 5) < SESSION_LEASE_S - 5

    proc = _start_long_generation(served)
    proc.kill()
    proc.communicate(timeout=30)
    freed_after = _wait_for_no_sessions(served, timeout=SESSION_LEASE_S + 2 * SWEEP_INTERVAL_S + 20)
    assert freed_after <= SESSION_LEASE_S + 2 * SWEEP_INTERVAL_S + 20
    report_figures(f"session cleanup: Ctrl+C -> 0 sessions on every stage at once; kill -9 -> freed after "
                   f"{freed_after:.1f} s (lease {SESSION_LEASE_S:g} s)")
