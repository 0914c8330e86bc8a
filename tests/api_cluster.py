"""A user with a local cluster serving the tiny llama model, for the API tests (``test_openai_api``,
``test_mcp_server``), built once per module: a module-scoped fixture cannot use conftest's
function-scoped ``user_env``, so the environment is passed to every CLI call explicitly."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dllmd.net.identity import Identity
from tests.conftest import run_cli
from tests.tiny_models import make_tiny_model

MODEL = "tiny"


def _ok(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def start_user_cluster(root: Path, nodes: int = 3) -> dict:
    """A user (identity, config and data dirs under ``root``), ``nodes`` local daemons and the tiny
    llama model imported and deployed across them; returns the environment the CLI needs."""
    env = {"DLLM_CONFIG_DIR": str(root / "config"), "DLLM_DATA_DIR": str(root / "data"),
           "DLLM_CACHE_DIR": str(root / "cache")}
    (root / "config").mkdir(parents=True)
    Identity.generate().save(root / "config" / "identity")
    _ok(run_cli("dllmctl", "cluster", "up", "--local", str(nodes), "--dir", str(root / "cluster"), "--json", env=env))
    source = make_tiny_model("llama", root / "src")
    _ok(run_cli("dllmctl", "model", "import", str(source), "--name", MODEL, "--json", env=env))
    _ok(run_cli("dllmctl", "deploy", MODEL, "--json", env=env))
    return env


def stop_user_cluster(root: Path, env: dict) -> None:
    run_cli("dllmctl", "cluster", "down", "--dir", str(root / "cluster"), env=env)


def infer(env: dict, prompt: str, *args: str) -> dict:
    return _ok(run_cli("dllmctl", "infer", prompt, "-m", MODEL, "--json", *args, env=env))


@contextlib.contextmanager
def serve_api(log_path: Path, env: dict, key: str, *args: str):
    """``dllmctl serve --port 0`` with ``key`` (in DLLM_API_KEY, as a user keeps it out of the process
    list) and ``args``; yields its base URL (``http://127.0.0.1:PORT/v1``), stops it afterwards."""
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dllmctl", "serve", "--port", "0", "--log-level", "warning", *args],
                            stdout=log, stderr=log, env={**os.environ, **env, "DLLM_API_KEY": key})
    try:
        yield _wait_for_url(proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_for_url(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "listening on http://" in line:
                return line.split("listening on ", 1)[1].strip()
        if proc.poll() is not None:
            raise RuntimeError(f"dllmctl serve exited: {log.read_text()}")
        time.sleep(0.1)
    raise RuntimeError(f"dllmctl serve did not start: {log.read_text()}")
