"""Encrypted connections kept for reuse, one per (address, key): a daemon's to its peers (next stage,
ring neighbours, workers) and a client's to the nodes its sessions run through. Create and use
it inside one running event loop; connections open on first use with the pool's identity."""

from __future__ import annotations

from typing import Any

import zmq

from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity


class ConnectionPool:
    def __init__(self, identity: Identity, ctx: zmq.Context | None = None):
        self.identity = identity
        self.ctx = ctx
        self._clients: dict[tuple[str, str], RpcClient] = {}

    def get(self, address: str, public_key: str) -> RpcClient:
        key = (address, public_key)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = RpcClient(self.identity, address, public_key, ctx=self.ctx)
        return client

    def drop(self, address: str, public_key: str) -> None:
        """Forget a failed node's connection (the next use reconnects from scratch)."""
        client = self._clients.pop((address, public_key), None)
        if client is not None:
            client.close()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    async def __aenter__(self) -> "ConnectionPool":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
