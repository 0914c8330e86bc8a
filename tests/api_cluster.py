"""A user with a local cluster serving the tiny llama model, for the API tests (``test_openai_api``,
``test_mcp_server``), built once per module: a module-scoped fixture cannot use conftest's
function-scoped ``user_env``, so the environment is passed to every CLI call explicitly."""

from __future__ import annotations

import json
import subprocess
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
