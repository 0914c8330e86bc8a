"""The cluster as the user sees it: the registered nodes (``cluster.toml``) and their live state.

Membership is static and key-pinned, like WireGuard peers: a node is an address plus the public
key we expect to find there. Every listing asks every node, concurrently, right now.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomli_w
import zmq

from dllmd.config import ConfigError, validate_endpoint, validate_name
from dllmd.net.client import (
    CallError,
    CallTimeout,
    NodeKeyMismatch,
    NodeUnauthorized,
    NodeUnreachable,
    RemoteError,
    RpcClient,
)
from dllmd.net.identity import Identity, node_id_of, parse_public_key
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


# --- live state ----------------------------------------------------------------------------------

STATUS_UP, STATUS_DOWN, STATUS_UNAUTHORIZED, STATUS_KEY_MISMATCH, STATUS_ERROR = (
    "up", "down", "unauthorized", "key-mismatch", "error")


def status_of(error: CallError) -> str:
    if isinstance(error, NodeUnauthorized):
        return STATUS_UNAUTHORIZED
    if isinstance(error, NodeKeyMismatch):
        return STATUS_KEY_MISMATCH
    if isinstance(error, (NodeUnreachable, CallTimeout)):
        return STATUS_DOWN
    return STATUS_ERROR


async def query_node(identity: Identity, entry: NodeEntry, timeout: float, ctx: zmq.Context) -> dict[str, Any]:
    """One node's row for ``nodes list``: always returns, whatever the node does."""
    row: dict[str, Any] = {"name": entry.name, "id": entry.node_id, "address": entry.address, "status": STATUS_DOWN,
                           "latency_ms": None, "hardware": None, "serving": [], "error": None}
    async with RpcClient(identity, entry.address, entry.public_key, ctx=ctx) as client:
        try:
            # Connect and authenticate first so latency measures one round trip, not the handshake.
            await client.call("ping", timeout=timeout)
            start = time.perf_counter()
            await client.call("ping", timeout=timeout)
            row["latency_ms"] = round((time.perf_counter() - start) * 1000, 3)
            info, _ = await client.call("info", timeout=timeout)
        except RemoteError as exc:
            row.update(status=STATUS_ERROR, error=str(exc))
            return row
        except CallError as exc:
            row.update(status=status_of(exc), error=str(exc))
            return row
    row.update(status=STATUS_UP, hardware=info.get("hardware"), serving=info.get("serving", []),
               version=info.get("version"), role=info.get("role"))
    return row


async def query_nodes(identity: Identity, entries: list[NodeEntry], timeout: float = 3.0) -> list[dict[str, Any]]:
    ctx = zmq.Context()
    try:
        return list(await asyncio.gather(*(query_node(identity, e, timeout, ctx) for e in entries)))
    finally:
        ctx.destroy(linger=0)
