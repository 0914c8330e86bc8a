"""Putting dataset shards on their nodes, all or nothing.

Phase 1 stages every node's shard concurrently (chunks over the node's encrypted channel; the node
checks the sha256 when the last byte arrives). Only when every node holds a verified staged shard
does phase 2 commit them. If any node is unreachable or refuses, every stage is aborted and no node
changes what it serves: nothing is half-written anywhere. (A node that dies between two commits is
the one window left; its peers' new shards are then removed again.)

An update may stage a *patch* instead (only the pieces a node lacks; the node builds the shard, see
:mod:`dllmd.data.patch`); a node that refuses it (its shard is not the base any more, or too large
to build in memory) is sent the whole shard instead, in the same phase 1.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable


from dllmctl.cluster.registry import NodeEntry
from dllmctl.transfer import upload
from dllmd.net.client import CallError, RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages import data as M
from dllmd.net.messages.node import PING
from dllmd.net.wire import ErrorCode

Progress = Callable[[str, int], None]  # (node name, bytes just sent or found already there)


class PushError(RuntimeError):
    """A shard could not be placed; no node's data changed."""


@dataclass
class ShardUpload:
    node: NodeEntry
    blob: bytes
    meta: dict
    patch: bytes | None = None
    """int32 tokens of the pieces the node's shard ``base`` lacks: sent instead of ``blob`` when set."""
    base: str = ""
    sent: int = 0
    """Bytes sent (or found staged already): the patch's, or the whole shard's."""

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()


async def _stage(client: RpcClient, dataset: str, shard: ShardUpload, progress: Progress) -> None:
    await client.invoke(PING, timeout=5)  # a node that is down answers nothing: fail in seconds, not a minute
    import torch

    meta = torch.frombuffer(bytearray(json.dumps(shard.meta).encode()), dtype=torch.int8)
    payload = shard.blob
    if shard.patch is not None:
        try:
            state, _ = await client.invoke(M.DATA_STAGE_PATCH, M.PatchArgs(
                dataset=dataset, bytes=len(shard.patch), sha256=hashlib.sha256(shard.patch).hexdigest(),
                base=shard.base, shard_bytes=len(shard.blob), shard_sha256=shard.sha256), [meta], timeout=60)
            payload = shard.patch
        except RemoteError as exc:
            if exc.code not in (ErrorCode.CONFLICT, ErrorCode.TOO_LARGE):
                raise
            shard.patch = None  # the node cannot build it: the whole shard, then
    if shard.patch is None:
        state, _ = await client.invoke(M.DATA_STAGE, M.StageArgs(dataset=dataset, bytes=len(shard.blob),
                                                                 sha256=shard.sha256), [meta], timeout=60)

    def sent(count: int) -> None:
        shard.sent += count
        progress(shard.node.name, count)

    sent(state.received)
    await upload(client, M.DATA_PUT, dataset, io.BytesIO(payload), len(payload), state.received, on_sent=sent)


async def push_shards(user: Identity, dataset: str, uploads: list[ShardUpload],
                      progress: Progress = lambda *_: None) -> list[dict]:
    """Stage every shard, then commit them all; returns each node's commit report."""
    clients = {u.node.name: RpcClient(user, u.node.address, u.node.public_key) for u in uploads}
    try:
        staged = await asyncio.gather(*(_stage(clients[u.node.name], dataset, u, progress) for u in uploads),
                                      return_exceptions=True)
        failures = [f"{u.node.name}: {r}" for u, r in zip(uploads, staged) if isinstance(r, BaseException)]
        if failures:
            await _each(clients, "data.abort", dataset)
            raise PushError(f"could not place {dataset}: {'; '.join(failures)}; no node's data was changed")
        commits = await asyncio.gather(*(clients[u.node.name].call("data.commit", {"dataset": dataset}, timeout=60)
                                         for u in uploads), return_exceptions=True)
        failures = [f"{u.node.name}: {r}" for u, r in zip(uploads, commits) if isinstance(r, BaseException)]
        if failures:
            committed = {u.node.name: clients[u.node.name] for u, r in zip(uploads, commits)
                         if not isinstance(r, BaseException)}
            await _each(committed, "data.remove", dataset)
            await _each(clients, "data.abort", dataset)
            raise PushError(f"commit of {dataset} failed on {'; '.join(failures)}; the shards committed "
                            f"elsewhere were removed again")
        return [{"node": u.node.name, **result} for u, (result, _) in zip(uploads, commits)]
    finally:
        for client in clients.values():
            client.close()


async def _each(clients: dict[str, RpcClient], op: str, dataset: str) -> None:
    async def one(client: RpcClient) -> None:
        try:
            await client.call(op, {"dataset": dataset}, timeout=10)
        except CallError:
            pass  # unreachable: its stage is swept after a day, and it never committed

    await asyncio.gather(*(one(c) for c in clients.values()))


async def remove_everywhere(user: Identity, nodes: list[NodeEntry], dataset: str) -> dict[str, str]:
    async def one(node: NodeEntry) -> tuple[str, str]:
        async with RpcClient(user, node.address, node.public_key) as client:
            try:
                await client.call("ping", timeout=5)
                await client.call("data.remove", {"dataset": dataset}, timeout=30)
                return node.name, "removed"
            except CallError as exc:
                return node.name, f"error: {exc}"

    return dict(await asyncio.gather(*(one(n) for n in nodes)))
