"""``dllmctl cluster up --local N``: N real daemons on 127.0.0.1, for trying dllm on one machine.

Each daemon gets its own home under the cluster directory (kept across ``down``/``up``, so keys and
deployed models survive), binds a free port, trusts the user as admin and every other daemon of
the cluster as peer, and is registered in the user's cluster file. ``cluster.json`` records the
processes we started (pid and start time), so ``down`` stops exactly those and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import psutil

from dllmd.config import DAEMON_FILE, NodeConfig
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.storage import atomic_write
from dllmctl.cluster.registry import NodeEntry, Registry, RegistryError
from dllmctl.paths import local_clusters_dir

STATE_FILE = "cluster.json"
CURRENT_FILE = "current"  # in local_clusters_dir(): the directory of the cluster 'up' started last
START_TIMEOUT_S = 120.0


class LocalClusterError(RuntimeError):
    pass


@dataclass
class LocalNode:
    name: str
    home: str
    pid: int
    create_time: float  # for the record only: see process()
    address: str
    public_key: str

    def process(self) -> psutil.Process | None:
        """Our daemon process, or None if it is gone (a reused pid does not count).

        The pid is ours while it runs ``dllmd start --home <our home>``: no other process can, since a
        home's lock admits one daemon. Comparing start times instead breaks when the wall clock is
        stepped (psutil adds the boot time, which moves with the clock): a live daemon read as gone."""
        try:
            proc = psutil.Process(self.pid)
            command = proc.cmdline()
            if proc.status() != psutil.STATUS_ZOMBIE and _is_daemon_of(command, self.home):
                return proc
        except psutil.Error:
            pass
        return None


def _is_daemon_of(command: list[str], home: str) -> bool:
    """Whether ``command`` is the one ``_spawn`` starts for ``home``."""
    try:
        at = command.index("--home")
    except ValueError:
        return False
    return command[at - 3:at] == ["-m", "dllmd", "start"] and command[at + 1:at + 2] == [home]


def default_dir() -> Path:
    return local_clusters_dir() / "local"


def resolve_dir(directory: Path | None) -> Path:
    """``directory`` if given, else the one the last ``up`` used, else the default."""
    if directory is not None:
        return directory.expanduser().resolve()
    try:
        remembered = Path((local_clusters_dir() / CURRENT_FILE).read_text().strip())
        if remembered.is_absolute() and (remembered / STATE_FILE).is_file():
            return remembered
    except (FileNotFoundError, UnicodeDecodeError, OSError):
        pass
    return default_dir().expanduser().resolve()


def _remember(directory: Path) -> None:
    atomic_write(local_clusters_dir() / CURRENT_FILE, str(directory.resolve()).encode())


def load_state(directory: Path) -> list[LocalNode]:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        return [LocalNode(**n) for n in data["nodes"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        raise LocalClusterError(f"{directory / STATE_FILE} is corrupt ({exc}); stop stray dllmd processes by hand") from None


def _save_state(directory: Path, nodes: list[LocalNode]) -> None:
    atomic_write(directory / STATE_FILE, json.dumps({"nodes": [asdict(n) for n in nodes]}, indent=2).encode())


def _prepare_home(home: Path, name: str, bench: bool = False, settings: dict | None = None) -> Identity:
    """A daemon's home; ``bench``: it serves the benchmark operations and allows a plaintext ring
    (a temporary benchmark cluster on loopback, which is trusted); ``settings``: more node.toml
    settings for a new home."""
    if not (home / "identity").exists():
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        Identity.generate().save(home / "identity")
        NodeConfig(name=name, listen="tcp://127.0.0.1:0", allow_plaintext_ring=bench, bench_operations=bench,
                   **(settings or {})).save(home)
    elif bench:  # a kept home: allow it now (never taken back here: that is node.toml's to say)
        config = NodeConfig.load(home)
        if not (config.allow_plaintext_ring and config.bench_operations):
            replace(config, allow_plaintext_ring=True, bench_operations=True).save(home)
    return Identity.load(home / "identity")


def _share_hardware_measurement(homes: list[Path], progress: Callable[[str], None]) -> None:
    """Daemons on one machine share its hardware: measure its rates once, here, on the threads each
    daemon gets, and give every home the same figures. Measured by each daemon at once they would
    contend for the cores and report different rates, and the planner would split the layers unevenly
    for no reason."""
    import torch

    from dllmd import hardware

    progress("measuring this machine")  # at once if homes[0] holds a current measurement
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads_per_daemon(len(homes)))  # each daemon's share of the cores: its speed
    try:
        hardware.cached_speed(homes[0])
    finally:
        torch.set_num_threads(threads)
    measured = (homes[0] / hardware.CACHE_FILE).read_bytes()
    for home in homes[1:]:
        path = home / hardware.CACHE_FILE
        if not path.exists() or path.read_bytes() != measured:  # none yet, or one from an older dllmd
            shutil.copyfile(homes[0] / hardware.CACHE_FILE, path)


def _spawn(home: Path, threads: int, verbose: bool = False) -> subprocess.Popen:
    log = open(home / "dllmd.log", "ab")
    # Daemons of a local cluster share the cores: OpenMP threads that spin after each op would
    # steal them from the next stage (measured: ~9% slower decode on SmolLM2 with 3 nodes, 2 cores).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           # Nor should they oversubscribe them: a decode pass is bound by memory bandwidth, and with
           # 3 daemons on 2 cores one thread each gave the same single-session speed and 16 concurrent
           # sessions 16% more tokens/s than torch's default of one thread per core each.
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    try:
        # A session of its own: Ctrl+C in the user's terminal must not kill the cluster.
        return subprocess.Popen([sys.executable, "-m", "dllmd", "start", "--home", str(home),
                                 *(["--verbose"] if verbose else [])], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    finally:
        log.close()


def _threads_per_daemon(daemons: int) -> int:
    return max(1, (os.cpu_count() or 1) // daemons)


def _wait_ready(home: Path, proc: subprocess.Popen, deadline: float) -> str:
    """Wait for the daemon to publish its bound endpoint; return it."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (home / "dllmd.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise LocalClusterError(f"daemon in {home} exited with {proc.returncode}:\n" + "\n".join(tail))
        try:
            info = json.loads((home / DAEMON_FILE).read_text())
            if info.get("pid") == proc.pid:
                return info["endpoint"]
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise LocalClusterError(f"daemon in {home} did not become ready within {START_TIMEOUT_S:.0f}s; see {home / 'dllmd.log'}")


def up(count: int, directory: Path, user: Identity, registry: Registry,
       progress: Callable[[str], None] = lambda _: None, bench: bool = False,
       remember: bool = False, settings: dict | list[dict] | None = None, verbose: bool = False) -> list[LocalNode]:
    """Start ``count`` daemons and register them. Refuses if this directory's cluster is running.
    ``bench``: the nodes serve the benchmark operations and may run a training ring unencrypted;
    ``remember``: later commands without ``--dir`` find this cluster (the user's own, not a benchmark's
    temporary one); ``settings``: node.toml settings of new homes (e.g. a memory budget), the same for
    every node or one map per node (e.g. each its own ring port); ``verbose``: the daemons log at DEBUG
    (``dllmd start -v``)."""
    if count < 1 or count > 64:
        raise LocalClusterError("--local takes a node count between 1 and 64")
    running = [n for n in load_state(directory) if n.process()]
    if running:
        raise LocalClusterError(f"a local cluster is already running in {directory} "
                                f"({', '.join(n.name for n in running)}); run 'dllmctl cluster down' first")
    names = [f"local-{i + 1}" for i in range(count)]
    homes = [directory / name for name in names]
    per_node = settings if isinstance(settings, list) else [settings] * count
    identities = [_prepare_home(h, n, bench, own) for h, n, own in zip(homes, names, per_node)]
    _share_hardware_measurement(homes, progress)
    for home, identity in zip(homes, identities):
        keys = AuthorizedKeys(home / "authorized_keys.toml")
        keys.authorize(user.public_key, Role.ADMIN, "dllmctl user")
        for name, other in zip(names, identities):
            if other.public_key != identity.public_key:
                keys.authorize(other.public_key, Role.PEER, name)
    progress(f"starting {count} daemon(s)")
    procs = [_spawn(h, _threads_per_daemon(count), verbose) for h in homes]
    nodes: list[LocalNode] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        for name, home, identity, proc in zip(names, homes, identities, procs):
            address = _wait_ready(home, proc, deadline)
            nodes.append(LocalNode(name, str(home), proc.pid, psutil.Process(proc.pid).create_time(),
                                   address, identity.public_key))
            progress(f"{name} ready on {address}")
    except BaseException:
        _terminate(*(proc.pid for proc in procs))
        raise
    _save_state(directory, nodes)
    if remember:
        _remember(directory)
    for node in nodes:
        stale = registry.nodes.get(node.name)
        if stale is not None and stale.public_key != node.public_key:
            raise RegistryError(f"a different node is registered as {node.name!r}; remove it with 'dllmctl nodes remove'")
        registry.add(NodeEntry(node.name, node.address, node.public_key), replace=True)
    registry.save()
    return nodes


def _terminate(*pids: int, timeout: float = 10.0) -> None:
    """SIGTERM every one at once (each stops cleanly in parallel), then SIGKILL what is left after ``timeout``."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, psutil.Error):
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def down(directory: Path, registry: Registry) -> list[str]:
    """Stop the daemons this directory's cluster started and unregister them; returns their names."""
    nodes = load_state(directory)
    running = [node for node in nodes if node.process() is not None]
    _terminate(*(node.pid for node in running))
    stopped = [node.name for node in running]
    for node in nodes:
        entry = registry.nodes.get(node.name)
        if entry is not None and entry.public_key == node.public_key:
            registry.remove(node.name)
    registry.save()
    _save_state(directory, [])
    return stopped


def restart(directory: Path, name: str, registry: Registry) -> LocalNode:
    """Start one node of this directory's cluster again (after a crash, or after ``kill`` in a
    failover test or benchmark); it binds a new port, so its registry entry is updated."""
    nodes = load_state(directory)
    index = next((i for i, n in enumerate(nodes) if n.name == name), None)
    if index is None:
        raise LocalClusterError(f"{name} is not part of the local cluster in {directory}")
    old = nodes[index]
    if old.process() is not None:
        raise LocalClusterError(f"{name} is still running (pid {old.pid})")
    home = Path(old.home)
    proc = _spawn(home, _threads_per_daemon(len(nodes)))
    try:
        address = _wait_ready(home, proc, time.monotonic() + START_TIMEOUT_S)
    except BaseException:
        _terminate(proc.pid)
        raise
    nodes[index] = LocalNode(name, old.home, proc.pid, psutil.Process(proc.pid).create_time(), address, old.public_key)
    _save_state(directory, nodes)
    registry.add(NodeEntry(name, address, old.public_key), replace=True)
    registry.save()
    return nodes[index]


def kill(directory: Path, name: str) -> None:
    """SIGKILL one node of this directory's cluster, as a crash or a power cut would stop it."""
    node = next((n for n in load_state(directory) if n.name == name), None)
    proc = node.process() if node else None
    if proc is None:
        raise LocalClusterError(f"{name} is not running in the local cluster in {directory}")
    proc.kill()
    proc.wait(10)
