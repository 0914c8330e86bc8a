"""Connections from this daemon to other daemons (next pipeline stage, ring neighbours), opened
on first use with the daemon's own key and kept for reuse."""

from __future__ import annotations

import zmq

from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity


class PeerPool:
    def __init__(self, identity: Identity, ctx: zmq.Context):
        self.identity = identity
        self.ctx = ctx
        self._clients: dict[tuple[str, str], RpcClient] = {}

    def get(self, address: str, public_key: str) -> RpcClient:
        key = (address, public_key)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = RpcClient(self.identity, address, public_key, ctx=self.ctx)
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
