"""The daemon's life: init, start, info, systemd readiness, clean stop, refusing to double-start."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import stat

from dllmd.net.client import RpcClient
from dllmd.net.keys import Role
from tests.conftest import make_home, run_cli, start_daemon


def test_init_creates_private_identity_and_refuses_to_overwrite(tmp_path):
    home = tmp_path / "node"
    done = run_cli("dllmd", "init", "--home", str(home), "--listen", "tcp://127.0.0.1:0", "--name", "alpha", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["name"] == "alpha" and len(doc["public_key"]) == 64 and len(doc["node_id"]) == 12
    assert stat.S_IMODE((home / "identity").stat().st_mode) == 0o600
    identity_before = (home / "identity").read_bytes()
    again = run_cli("dllmd", "init", "--home", str(home))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert (home / "identity").read_bytes() == identity_before
    shown = json.loads(run_cli("dllmd", "id", "--home", str(home), "--json").stdout)
    assert shown["public_key"] == doc["public_key"]


def test_bad_config_and_arguments_get_clear_errors(tmp_path):
    home = tmp_path / "node"
    bad = run_cli("dllmd", "init", "--home", str(home), "--listen", "http://nope")
    assert bad.returncode == 1 and "tcp://HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr
    make_home(home, "n")
    (home / "node.toml").write_text("name = 'n'\nlisten = 'tcp://127.0.0.1:0'\nturbo = true\n")
    started = run_cli("dllmd", "start", "--home", str(home))
    assert started.returncode == 1 and "unknown setting(s) turbo" in started.stderr
    (home / "node.toml").write_text("this is [not toml")
    started = run_cli("dllmd", "start", "--home", str(home))
    assert started.returncode == 1 and "not valid TOML" in started.stderr
    missing = run_cli("dllmd", "start", "--home", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "dllmd init" in missing.stderr
    bad_key = run_cli("dllmd", "authorize", "abc", "--role", "client", "--home", str(home))
    assert bad_key.returncode == 1 and "64 hex characters" in bad_key.stderr
    bad_role = run_cli("dllmd", "authorize", "ab" * 32, "--role", "king", "--home", str(home))
    assert bad_role.returncode == 2 and "king" in bad_role.stderr


def test_info_reports_identity_role_and_hardware(daemon_factory, user):
    daemon = daemon_factory("infonode", keys={user.public_key: Role.ADMIN})

    async def scenario():
        async with RpcClient(user, daemon.address, daemon.public_key) as client:
            return (await client.call("info"))[0]

    info = asyncio.run(scenario())
    assert info["name"] == "infonode" and info["public_key"] == daemon.public_key and info["role"] == "admin"
    assert info["protocol_version"] == 1 and info["uptime_s"] >= 0 and info["serving"] == []
    hw = info["hardware"]
    assert hw["cpu_cores"] >= 1 and 0 < hw["ram_available"] <= hw["ram_total"] and hw["disk_free"] > 0
    assert hw["matmul_gflops"] > 0 and isinstance(hw["gpus"], list)
    # A one-row matmul reads its weights from memory: far fewer FLOPs per second than a square product.
    assert 0 < hw["stream_gbps"] / 2 < hw["matmul_gflops"]
    cached = json.loads((daemon.home / "hardware.json").read_text())
    assert (cached["matmul_gflops"], cached["stream_gbps"]) == (hw["matmul_gflops"], hw["stream_gbps"])


def test_sigterm_stops_cleanly_and_systemd_is_told(tmp_path):
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    home = tmp_path / "node"
    make_home(home, "svc")
    daemon = start_daemon(home, env={"NOTIFY_SOCKET": str(notify_path)})
    assert listener.recv(64) == b"READY=1"
    second = run_cli("dllmd", "start", "--home", str(home))
    assert second.returncode == 1 and "already running" in second.stderr
    assert daemon.stop(signal.SIGTERM) == 0
    assert listener.recv(64) == b"STOPPING=1"
    assert not (home / "daemon.json").exists()
    assert "stopped cleanly" in daemon.log()
    listener.close()


def test_sigint_also_stops_cleanly(daemon_factory):
    daemon = daemon_factory("ctrlc")
    assert daemon.stop(signal.SIGINT) == 0
    assert "stopped cleanly" in daemon.log()
