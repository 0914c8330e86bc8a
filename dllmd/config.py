"""The node's home directory and its typed ``node.toml``.

Layout of a home::

    node.toml          NodeConfig (this module)
    identity           Ed25519 secret key, 0600 (dllmd.net.identity)
    authorized_keys.toml   who may talk to this node, with roles (dllmd.net.keys)
    daemon.json        written by a running daemon: pid, bound endpoint, start time
    hardware.json      cached hardware measurements (dllmd.hardware)
    dllmd.log          stderr of daemons started by ``dllmctl cluster up``
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

import tomli_w

from dllmd.alerts import AlertError, AlertSettings
from dllmd.storage import atomic_write
from dllmd.units import parse_size

DEFAULT_LISTEN = "tcp://0.0.0.0:7740"
DAEMON_FILE = "daemon.json"  # written by a running daemon: pid, bound endpoint, start time
LOCK_FILE = "daemon.lock"  # held (flock) by the running daemon: one per home
_ENDPOINT = re.compile(r"^tcp://(\*|[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5}|\*)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as dllmd.data.shards names them


class ConfigError(ValueError):
    """node.toml (or a value meant for it) is invalid; the message says which field and why."""


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    """The node's home: ``--home``, else ``$DLLMD_HOME``, else ``$STATE_DIRECTORY`` (systemd), else
    ``~/.local/state/dllmd``."""
    if home:
        return Path(home).expanduser()
    for var in ("DLLMD_HOME", "STATE_DIRECTORY"):
        value = os.environ.get(var)
        if value:
            # systemd may pass several colon-separated state directories; the first is ours.
            return Path(value.split(":")[0]).expanduser()
    return Path("~/.local/state/dllmd").expanduser()


WILDCARD_HOSTS = ("0.0.0.0", "*", "::", "")


def listen_host(listen: str) -> str:
    """The host part of a ``tcp://HOST:PORT`` listen address (IPv6 without its brackets)."""
    host = urlparse(listen.replace("tcp://", "http://", 1)).hostname
    return host if host not in (None, "") else "0.0.0.0"


def bind_host(listen: str) -> str:
    """Where a node's other sockets (ring, tensor-parallel group) bind: its listen host, every
    interface when it listens on all of them. Peers reach them at the host they know the node by."""
    host = listen_host(listen)
    return "0.0.0.0" if host in WILDCARD_HOSTS else host


def validate_endpoint(endpoint: str) -> str:
    """A ZeroMQ TCP endpoint ``tcp://HOST:PORT`` (port ``0``/``*`` binds a free port)."""
    match = _ENDPOINT.match(endpoint or "")
    if not match or (match.group(2) != "*" and int(match.group(2)) > 65535):
        raise ConfigError(f"listen address must look like tcp://HOST:PORT, got {endpoint!r}")
    return endpoint


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")
LOOPBACK_NAMES = ("localhost",)


def metrics_address(listen: str, allow_remote: bool = False) -> tuple[str, int]:
    """``metrics_listen`` as (host, port): ``HOST:PORT`` (``[::1]:9740`` for IPv6; port 0 binds a free
    one). The endpoint is plain, unauthenticated HTTP, so the host must be a loopback address unless
    ``allow_remote`` (node.toml's ``metrics_allow_remote``) says the owner means to expose it."""
    import ipaddress

    match = _HOST_PORT.match(listen or "")
    if not match or int(match.group(2)) > 65535:
        raise ConfigError(f"metrics_listen must look like HOST:PORT (127.0.0.1:9740, [::1]:9740), got {listen!r}")
    host, port = match.group(1).strip("[]"), int(match.group(2))
    if host.lower() in LOOPBACK_NAMES:
        return host, port
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"metrics_listen's host must be an IP address or localhost, got {host!r}") from None
    if not address.is_loopback and not allow_remote:
        raise ConfigError(f"metrics_listen {listen!r} is not a loopback address: the metrics endpoint has no "
                          f"authentication or encryption, so anyone who reaches it reads what the node runs. "
                          f"Scrape it locally (127.0.0.1), or set metrics_allow_remote = true to expose it")
    return host, port


def validate_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ConfigError(
            f"a node name is 1-63 letters, digits, '.', '_' or '-' and starts with a letter or digit; got {name!r}"
        )
    return name


def _ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _count(value) -> bool:
    """A non-negative integer (TOML's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def default_data_roots(home: Path) -> list[Path]:
    """Where ``data.local`` reads when node.toml sets no ``data_roots``: ``<home>/data`` and a
    ``datasets`` folder beside the home. Not the home itself: it holds the node's secret key."""
    return [home / "data", home.parent / "datasets"]


def validate_data_roots(roots) -> None:
    """``data_roots``: None (the defaults), or a list of absolute or ``~`` paths ([]: data.local off)."""
    if roots is None:
        return
    if not isinstance(roots, list):
        raise ConfigError(f"data_roots must be a list of directories such as [\"~/datasets\"], got {roots!r}")
    for root in roots:
        if not isinstance(root, str) or not root or "\0" in root:
            raise ConfigError(f"data_roots entries must be non-empty path strings, got {root!r}")
        if not (root.startswith("~") or Path(root).is_absolute()):
            raise ConfigError(f"data_roots entry {root!r} must be an absolute path or start with ~ (a relative "
                              f"path would depend on where dllmd was started)")
        try:
            Path(root).expanduser()
        except RuntimeError:  # ~someone who has no account here
            raise ConfigError(f"data_roots entry {root!r}: cannot expand {root.split('/')[0]!r} to a home "
                              f"directory") from None


@dataclass
class ResourceLimits:
    """The ``[limits]`` table: what the machine's owner lets dllm use of it (a home machine is also
    someone's desktop). Absent or 0: no cap beyond what the machine has."""

    memory: int = 0  # bytes for weights, KV caches and activations, RAM or VRAM; node.toml may say "6GiB"
    threads: int = 0  # compute threads (torch.set_num_threads); 0: torch's default
    gpus: list[int] | None = None  # GPU indices the daemon may use; []: CPU only; None: all

    def __post_init__(self) -> None:
        if isinstance(self.memory, str):
            try:
                self.memory = parse_size(self.memory)
            except ValueError as exc:
                raise ConfigError(f"limits.memory: {exc}") from None
        if not _count(self.memory):
            raise ConfigError(f"limits.memory must be a number of bytes or a size such as \"6GiB\", got {self.memory!r}")
        if not _count(self.threads):
            raise ConfigError(f"limits.threads must be a non-negative integer, got {self.threads!r}")
        if self.threads > 4096:
            raise ConfigError(f"limits.threads must be at most 4096, got {self.threads}")
        if self.gpus is not None:
            if not isinstance(self.gpus, list) or not all(_count(i) and i < 1024 for i in self.gpus):
                raise ConfigError(f"limits.gpus must be a list of GPU indices such as [0, 1] ([] for CPU only), "
                                  f"got {self.gpus!r}")
            if len(set(self.gpus)) != len(self.gpus):
                raise ConfigError(f"limits.gpus lists a GPU more than once: {self.gpus!r}")

    @classmethod
    def from_toml(cls, data) -> "ResourceLimits":
        if not isinstance(data, dict):
            raise ConfigError(f"limits must be a table ([limits]), got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) limits.{', limits.'.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_toml(self) -> dict:
        """What is set (TOML has no null: an absent ``gpus`` means all of them)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class NodeConfig:
    """Everything ``dllmd start`` reads from node.toml. Units are in the field names."""

    name: str
    listen: str = DEFAULT_LISTEN
    max_message_bytes: int = 256 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    heartbeat_interval_ms: int = 2000
    heartbeat_timeout_ms: int = 6000
    memory_budget_bytes: int = 0  # 0: derive from available RAM/VRAM at start
    # Share of that budget the prompt-prefix cache may hold (only what sessions leave unreserved); 0: off.
    prefix_cache_percent: int = 25
    # How long a tensor-parallel member spins for a partial sum before it sleeps in poll (0: never
    # spins). A sleeping thread's wake-up costs more than the transfer (docs/inference.md "Tensor
    # parallelism"); spinning yields the CPU to any other runnable thread, and stops after this long.
    tensor_spin_us: int = 500
    ring_port: int = 0  # the training ring's socket, on the listen host; 0: a free port per job
    allow_plaintext_ring: bool = False  # trusted links only: lets a job ask for an unencrypted ring
    bench_operations: bool = False  # serve the benchmark-only operations (ring.*, dllmctl bench allreduce)
    relay: bool = False  # pass sealed session traffic on for this node's clients (relay.forward)
    # Prometheus' /metrics over plain HTTP (docs/observability.md), e.g. "127.0.0.1:9740"; "": off.
    metrics_listen: str = ""
    metrics_allow_remote: bool = False  # let metrics_listen bind a non-loopback address (unauthenticated!)
    # Announce this daemon on the LAN over mDNS (dllmd/discovery.py) so 'dllmctl nodes discover' lists it.
    # Off by default: an announcement tells the network a dllm node runs here. It never grants trust.
    discoverable: bool = False
    # The addresses mDNS runs on; None: every interface ("127.0.0.1" keeps it on this machine).
    discovery_interfaces: list[str] | None = None
    limits: ResourceLimits = field(default_factory=ResourceLimits)  # the [limits] table
    # Datasets a key with the federation role may train on here (federated rounds; the rows never leave).
    federated_datasets: list[str] = field(default_factory=list)
    # Directories data.local (dllmctl shard-data --local-only) may read; None: DEFAULT_DATA_ROOTS.
    data_roots: list[str] | None = None
    alerts: AlertSettings = field(default_factory=AlertSettings)  # the [alerts] table (dllmd.alerts)

    def __post_init__(self) -> None:
        if not isinstance(self.limits, ResourceLimits):  # as TOML gives it
            self.limits = ResourceLimits.from_toml(self.limits)
        if not isinstance(self.alerts, AlertSettings):
            try:
                self.alerts = AlertSettings.from_toml(self.alerts)
            except AlertError as exc:
                raise ConfigError(str(exc)) from None
        validate_name(self.name)
        validate_endpoint(self.listen)
        for f in fields(self):
            if f.type == "int":
                value = getattr(self, f.name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ConfigError(f"{f.name} must be a non-negative integer, got {value!r}")
        if self.discovery_interfaces is not None and not (
                isinstance(self.discovery_interfaces, list) and self.discovery_interfaces
                and all(isinstance(a, str) and _ip(a) for a in self.discovery_interfaces)):
            raise ConfigError(f"discovery_interfaces must be a list of IP addresses such as [\"192.168.1.20\"], "
                              f"got {self.discovery_interfaces!r}")
        for flag in ("allow_plaintext_ring", "bench_operations", "relay", "metrics_allow_remote", "discoverable"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if not isinstance(self.federated_datasets, list) or not all(
                isinstance(d, str) and _DATASET.match(d) for d in self.federated_datasets):
            raise ConfigError(f"federated_datasets must be a list of dataset names, got {self.federated_datasets!r}")
        validate_data_roots(self.data_roots)
        if not isinstance(self.metrics_listen, str):
            raise ConfigError(f"metrics_listen must be a string such as \"127.0.0.1:9740\", got {self.metrics_listen!r}")
        if self.metrics_listen:
            metrics_address(self.metrics_listen, self.metrics_allow_remote)
        if self.prefix_cache_percent > 100:
            raise ConfigError(f"prefix_cache_percent must be between 0 and 100, got {self.prefix_cache_percent}")
        if self.tensor_spin_us > 1_000_000:
            raise ConfigError(f"tensor_spin_us must be at most 1000000 (a second), got {self.tensor_spin_us}")
        if self.ring_port > 65535:
            raise ConfigError(f"ring_port must be a TCP port (0-65535), got {self.ring_port}")
        if self.max_header_bytes < 1024 or self.max_message_bytes < self.max_header_bytes:
            raise ConfigError("max_header_bytes must be >= 1024 and <= max_message_bytes")

    def data_root_paths(self, home: Path) -> list[Path]:
        """The directories ``data.local`` may read, ``~`` expanded, symlinks and ``..`` resolved (so a
        root is compared as the place it really is)."""
        roots = default_data_roots(home) if self.data_roots is None else [Path(r) for r in self.data_roots]
        return [root.expanduser().resolve() for root in roots]

    @classmethod
    def load(cls, home: Path) -> "NodeConfig":
        path = home / "node.toml"
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist; run 'dllmd init --home {home}' first") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "name" not in data:
            raise ConfigError(f"{path}: 'name' is required")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, home: Path) -> None:
        data = {**asdict(self), "limits": self.limits.to_toml(), "alerts": self.alerts.to_toml()}
        if self.limits == ResourceLimits():  # nothing capped: node.toml reads as it did before [limits]
            del data["limits"]
        if not data["alerts"]:
            del data["alerts"]
        if not self.federated_datasets:
            del data["federated_datasets"]
        if self.data_roots is None:  # TOML has no null: absent means the default roots
            del data["data_roots"]
        if self.discovery_interfaces is None:
            del data["discovery_interfaces"]
        atomic_write(home / "node.toml", tomli_w.dumps(data).encode())
