"""The registered nodes (``cluster.toml``): the cluster as the user defined it.

Membership is static and key-pinned, like WireGuard peers: a node is an address plus the public
key we expect to find there. What the nodes are doing now is :mod:`dllmctl.cluster.live`'s.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from dllmd.config import ConfigError, validate_endpoint, validate_name
from dllmd.net.identity import node_id_of, parse_public_key
from dllmd.storage import atomic_write


class RegistryError(ValueError):
    """The cluster file or a change to it is invalid."""


@dataclass(frozen=True)
class NodeEntry:
    name: str
    address: str
    public_key: str

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)


class Registry:
    """``cluster.toml``: the nodes this user drives."""

    def __init__(self, path: Path):
        self.path = path
        self.nodes: dict[str, NodeEntry] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = tomllib.loads(self.path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.path} is not valid TOML: {exc}") from None
        for i, raw in enumerate(data.get("nodes", [])):
            try:
                entry = make_entry(raw.get("name", ""), raw.get("address", ""), raw.get("public_key", ""))
            except (RegistryError, AttributeError) as exc:
                raise RegistryError(f"{self.path}: nodes[{i}]: {exc}") from None
            self.nodes[entry.name] = entry

    def save(self) -> None:
        doc = {"nodes": [asdict(e) for e in sorted(self.nodes.values(), key=lambda e: e.name)]}
        atomic_write(self.path, tomli_w.dumps(doc).encode(), mode=0o600)

    def add(self, entry: NodeEntry, replace: bool = False) -> None:
        if not replace and entry.name in self.nodes:
            raise RegistryError(f"a node named {entry.name!r} is already registered; remove it first")
        for other in self.nodes.values():
            if other.name != entry.name and other.public_key == entry.public_key:
                raise RegistryError(f"that key is already registered as {other.name!r}")
        self.nodes[entry.name] = entry

    def remove(self, name: str) -> NodeEntry:
        try:
            return self.nodes.pop(name)
        except KeyError:
            raise RegistryError(f"no node named {name!r}; see 'dllmctl nodes list'") from None

    def select(self, names: list[str] | None) -> list[NodeEntry]:
        """The named nodes (all when ``names`` is empty), in registry order; unknown names are an error."""
        if not names:
            return sorted(self.nodes.values(), key=lambda e: e.name)
        missing = [n for n in names if n not in self.nodes]
        if missing:
            raise RegistryError(f"unknown node(s): {', '.join(missing)}; see 'dllmctl nodes list'")
        return [self.nodes[n] for n in names]


def make_entry(name: str, address: str, public_key: str) -> NodeEntry:
    try:
        validate_name(name)
        validate_endpoint(address)
    except ConfigError as exc:
        raise RegistryError(str(exc)) from None
    if address.endswith(":0") or address.endswith(":*") or "//*:" in address or "0.0.0.0" in address:
        raise RegistryError(f"{address} is a bind address; give the address clients connect to")
    try:
        key = parse_public_key(public_key).hex()
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    return NodeEntry(name, address, key)
