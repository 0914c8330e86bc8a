"""What the registered nodes are doing now: every listing asks every node, concurrently, right now."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import zmq

from dllmd.net.client import CallError, CallTimeout, NodeKeyMismatch, NodeUnauthorized, NodeUnreachable, RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages.node import INFO, PING
from dllmd.net.schema import Op, to_wire
from dllmctl.cluster.registry import NodeEntry

# What 'nodes list --json' (and the MCP server's llm://nodes) show of each row, in this order.
LISTED_FIELDS = ("name", "id", "address", "status", "latency_ms", "hardware", "limits", "memory_used_bytes",
                 "serving", "peer_rtts", "error")

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


@dataclass
class Answer:
    """One node's answer to one operation, measured: ``reply`` when ``status`` is up, else ``error``
    (the message) and ``code`` (the node's error code, or the status for a node that never answered)."""

    status: str
    latency_ms: float | None = None
    reply: Any = None
    error: str | None = None
    code: str | None = None


async def ask_node(identity: Identity, entry: NodeEntry, op: Op, timeout: float, ctx: zmq.Context) -> Answer:
    """``op`` (no arguments) on one node, after a ping that times one round trip: always returns,
    whatever the node does."""
    async with RpcClient(identity, entry.address, entry.public_key, ctx=ctx) as client:
        try:
            # Connect and authenticate first so latency measures one round trip, not the handshake.
            await client.invoke(PING, timeout=timeout)
            start = time.perf_counter()
            await client.invoke(PING, timeout=timeout)
            latency = round((time.perf_counter() - start) * 1000, 3)
            reply, _ = await client.invoke(op, timeout=timeout)
        except RemoteError as exc:
            return Answer(STATUS_ERROR, error=str(exc), code=exc.code)
        except CallError as exc:
            return Answer(status_of(exc), error=str(exc), code=status_of(exc))
    return Answer(STATUS_UP, latency, reply)


async def query_node(identity: Identity, entry: NodeEntry, timeout: float, ctx: zmq.Context) -> dict[str, Any]:
    """One node's row for ``nodes list``: always returns, whatever the node does."""
    row: dict[str, Any] = {"name": entry.name, "id": entry.node_id, "address": entry.address, "status": STATUS_DOWN,
                           "latency_ms": None, "hardware": None, "limits": None, "memory_used_bytes": None,
                           "serving": [], "peer_rtts": [], "error": None}
    answer = await ask_node(identity, entry, INFO, timeout, ctx)
    if answer.status != STATUS_UP:
        row.update(status=answer.status, error=answer.error)
        return row
    info = answer.reply
    # Rows stay plain maps (they are what 'nodes list --json' prints), built from the checked reply.
    row.update(status=STATUS_UP, latency_ms=answer.latency_ms, hardware=to_wire(info.hardware),
               serving=[to_wire(s) for s in info.serving],
               version=info.version, role=info.role, rss_bytes=info.rss_bytes, kv_budget_bytes=info.kv_budget_bytes,
               limits=to_wire(info.limits), memory_used_bytes=info.memory_used_bytes,
               prefix_cache_limit_bytes=info.prefix_cache_limit_bytes,
               peer_rtts=[to_wire(r) for r in info.peer_rtts])
    return row


async def query_nodes(identity: Identity, entries: list[NodeEntry], timeout: float = 3.0) -> list[dict[str, Any]]:
    ctx = zmq.Context()
    try:
        rows = list(await asyncio.gather(*(query_node(identity, e, timeout, ctx) for e in entries)))
    finally:
        ctx.destroy(linger=0)
    names = {e.public_key: e.name for e in entries}
    for row in rows:  # a node knows its peers by key; the registry knows their names
        for rtt in row["peer_rtts"]:
            rtt["name"] = names.get(rtt["public_key"], "")
    return rows
