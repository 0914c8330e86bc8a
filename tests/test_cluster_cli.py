"""A newcomer's path: init, start a local cluster, list it live, benchmark, stop exactly what started
(also without repeating the --dir that started it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from dllmctl.cluster import local
from tests.conftest import run_cli


def _json(done):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_three_local_daemons_up_listed_with_hardware_and_down(user_env, tmp_path):
    env = user_env
    me = _json(run_cli("dllmctl", "init", "--json", env=env))
    assert me["created"] and len(me["public_key"]) == 64
    assert _json(run_cli("dllmctl", "init", "--json", env=env))["public_key"] == me["public_key"]

    cluster_dir = tmp_path / "cluster"
    started = _json(run_cli("dllmctl", "cluster", "up", "--local", "3", "--dir", str(cluster_dir), "--json", env=env))
    try:
        assert [n["name"] for n in started] == ["local-1", "local-2", "local-3"]
        again = run_cli("dllmctl", "cluster", "up", "--local", "3", "--dir", str(cluster_dir), env=env)
        assert again.returncode == 1 and "already running" in again.stderr

        rows = _json(run_cli("dllmctl", "nodes", "list", "--json", env=env))
        assert len(rows) == 3
        for row in rows:
            assert set(row) >= {"name", "id", "address", "status", "latency_ms", "hardware", "serving"}
            assert row["status"] == "up" and row["latency_ms"] > 0
            assert row["hardware"]["cpu_cores"] >= 1 and row["hardware"]["ram_total"] > 0
            assert row["address"].startswith("tcp://127.0.0.1:")
        table = run_cli("dllmctl", "nodes", "list", env=env)
        assert table.returncode == 0 and "local-2" in table.stdout

        status = _json(run_cli("dllmctl", "cluster", "status", "--dir", str(cluster_dir), "--json", env=env))
        pids = [s["pid"] for s in status]
        assert all(s["running"] and s["status"] == "up" for s in status)
        assert pids == [n["pid"] for n in started]

        # The wall clock steps an hour (NTP, a VM resumed): psutil's start times move with it, and
        # the daemons must still read as ours and running.
        state = cluster_dir / local.STATE_FILE
        recorded = json.loads(state.read_text())
        for node in recorded["nodes"]:
            node["create_time"] += 3600
        state.write_text(json.dumps(recorded))
        status = _json(run_cli("dllmctl", "cluster", "status", "--dir", str(cluster_dir), "--json", env=env))
        assert all(s["running"] for s in status)
        # A pid that another program now holds is not ours.
        stranger = local.LocalNode("x", started[0]["home"], os.getpid(), 0.0, "", "")
        assert stranger.process() is None

        # Every daemon trusts the others as peers.
        keys = _json(run_cli("dllmd", "keys", "--home", started[0]["home"], "--json", env=env))
        roles = {k["public_key"]: k["role"] for k in keys}
        assert roles[me["public_key"]] == "admin"
        assert roles[started[1]["public_key"]] == roles[started[2]["public_key"]] == "peer"

        bench = _json(run_cli("dllmctl", "bench", "ping", "--count", "50", "--json", env=env))
        assert bench["encrypted"]["tensor_echo"]["median_us"] > 0
        assert bench["baseline_raw_zmq"]["tensor_echo"]["median_us"] > 0
    finally:
        down = _json(run_cli("dllmctl", "cluster", "down", "--dir", str(cluster_dir), "--json", env=env))
    assert sorted(down["stopped"]) == ["local-1", "local-2", "local-3"]
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _json(run_cli("dllmctl", "nodes", "list", "--json", env=env)) == []


def test_nodes_registry_rejects_bad_input_and_reports_down_nodes(user_env):
    env = user_env
    _json(run_cli("dllmctl", "init", "--json", env=env))
    bad_key = run_cli("dllmctl", "nodes", "add", "tcp://127.0.0.1:9", "--key", "nope", env=env)
    assert bad_key.returncode == 1 and "64 hex characters" in bad_key.stderr and "Traceback" not in bad_key.stderr
    bad_addr = run_cli("dllmctl", "nodes", "add", "127.0.0.1:9", "--key", "a" * 64, env=env)
    assert bad_addr.returncode == 1 and "tcp://HOST:PORT" in bad_addr.stderr
    from dllmd.net.identity import Identity

    key = Identity.generate().public_key
    added = _json(run_cli("dllmctl", "nodes", "add", "tcp://127.0.0.1:9", "--key", key, "--name", "ghost", "--json", env=env))
    assert added["name"] == "ghost"
    dup = run_cli("dllmctl", "nodes", "add", "tcp://127.0.0.1:10", "--key", key, "--name", "ghost", env=env)
    assert dup.returncode == 1 and "already registered" in dup.stderr
    rows = _json(run_cli("dllmctl", "nodes", "list", "--json", "--timeout", "1", env=env))
    assert rows[0]["name"] == "ghost" and rows[0]["status"] == "down" and rows[0]["latency_ms"] is None
    _json(run_cli("dllmctl", "nodes", "remove", "ghost", "--json", env=env))
    missing = run_cli("dllmctl", "nodes", "remove", "ghost", env=env)
    assert missing.returncode == 1 and "no node named" in missing.stderr


def test_commands_without_identity_say_what_to_do(user_env):
    done = run_cli("dllmctl", "nodes", "list", env=user_env)
    assert done.returncode == 1 and "dllmctl init" in done.stderr


def test_status_and_down_without_dir_find_the_cluster_up_started_with_dir(user_env, user, tmp_path):
    env = user_env
    cluster_dir = tmp_path / "somewhere-else"
    started = _json(run_cli("dllmctl", "cluster", "up", "--local", "2", "--dir", str(cluster_dir), "--json", env=env))
    pids = [n["pid"] for n in started]
    try:
        status = _json(run_cli("dllmctl", "cluster", "status", "--json", env=env))
        assert [s["pid"] for s in status] == pids
        assert all(s["running"] and s["status"] == "up" for s in status)
        assert {str(Path(s["home"]).parent) for s in status} == {str(cluster_dir.resolve())}
        down = _json(run_cli("dllmctl", "cluster", "down", "--json", env=env))
    except BaseException:
        run_cli("dllmctl", "cluster", "down", "--dir", str(cluster_dir), env=env)
        raise
    assert sorted(down["stopped"]) == ["local-1", "local-2"]
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _json(run_cli("dllmctl", "cluster", "status", "--json", env=env)) == []
    assert _json(run_cli("dllmctl", "cluster", "down", "--json", env=env)) == {"stopped": []}
    assert _json(run_cli("dllmctl", "nodes", "list", "--json", env=env)) == []
