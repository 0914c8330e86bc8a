"""DLLMD_FAILPOINTS: a process dies at exactly the armed point, as kill -9 would; a bad spec stops the start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dllmd import failpoints
from tests.conftest import make_home, run_cli


def test_the_spec_names_points_values_and_actions():
    assert failpoints.parse("train.step@5=exit, jobs.step@60=exit,x=exit,") == {
        "train.step": {"5": "exit"}, "jobs.step": {"60": "exit"}, "x": {None: "exit"}}
    assert failpoints.parse("") == {}
    for bad in ("train.step@5", "train.step@=exit", "train.step@5=crash", "=exit"):
        with pytest.raises(failpoints.FailpointError, match="NAME@VALUE=ACTION"):
            failpoints.parse(bad)


def test_an_armed_point_ends_the_process_at_once_with_137():
    code = ("import logging; from dllmd import failpoints as f; logging.basicConfig(); f.load()\n"
            "for step in range(10):\n"
            "    f.failpoint('other', step); f.failpoint('x.step', step); print('done', step, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, failpoints.ENV: "x.step@5=exit"})
    assert done.returncode == failpoints.EXIT_CODE, done.stderr
    assert done.stdout.split("\n")[:-1] == [f"done {i}" for i in range(5)]
    assert "failpoint x.step@5" in done.stderr


def test_dllmd_start_refuses_a_malformed_spec(tmp_path):
    make_home(tmp_path / "home", "node")
    done = run_cli("dllmd", "start", "--home", str(tmp_path / "home"), env={failpoints.ENV: "train.step@5"})
    message = " ".join(done.stderr.split())
    assert done.returncode == 1 and "neither NAME=ACTION nor NAME@VALUE=ACTION" in message, done.stderr
    assert "Traceback" not in done.stderr
