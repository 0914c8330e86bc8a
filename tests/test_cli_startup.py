"""``dllmctl`` answers at once: the commands that only talk to nodes never import torch or transformers
(seconds of imports), help imports only what building the commands needs, and ``dllmctl bench cli``
measures the wall time of the commonest ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import run_cli

# Runs a dllmctl command in this process and reports the modules it imported.
PROBE = """
import json, sys
from dllmctl.cli import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""
HEAVY = {"torch", "transformers", "safetensors.torch"}
# What help never needs (keys, the network, process tools, progress bars): the dllmctl.cli modules import
# them in the commands that use them, so that 'dllmctl --help' prints in well under half a second.
NOT_FOR_HELP = HEAVY | {"nacl", "zmq", "psutil", "asyncio", "rich.progress"}


def _imports(*args: str, env: dict) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _heavy_imports(*args: str, env: dict) -> list[str]:
    return sorted(HEAVY & _imports(*args, env=env))


def test_help_imports_only_what_building_the_commands_needs(user_env):
    env = {**os.environ, **user_env}
    for args in (["--help"], ["nodes", "--help"], ["jobs", "--help"], ["train", "--help"], ["model", "import", "--help"]):
        assert sorted(NOT_FOR_HELP & _imports(*args, env=env)) == [], args


def test_listing_commands_do_not_import_torch(user_env, user, tmp_path):
    env = {**os.environ, **user_env}
    cluster = tmp_path / "c"
    up = run_cli("dllmctl", "cluster", "up", "--local", "2", "--dir", str(cluster), "--json", env=user_env)
    assert up.returncode == 0, up.stderr
    try:
        for args in (["--help"], ["nodes", "list", "--json"], ["jobs", "list", "--json"], ["model", "list", "--json"],
                     ["data", "list", "--json"], ["cluster", "status", "--json"], ["plan", "--help"]):
            assert _heavy_imports(*args, env=env) == [], args
    finally:
        run_cli("dllmctl", "cluster", "down", "--dir", str(cluster), env=user_env)


def test_bench_cli_reports_every_command_against_its_target(user_env, user):
    done = run_cli("dllmctl", "bench", "cli", "--nodes", "2", "--runs", "1", "--json", env=user_env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["nodes"] == 2 and report["runs"] == 1 and report["interpreter_start_s"] > 0
    assert set(report["commands"]) == {"--help", "nodes list", "jobs list"}
    for row in report["commands"].values():
        assert row["best_s"] > 0 and row["meets_target"] == (row["best_s"] <= row["target_s"])
