"""Dataset operations of a node: receive a shard in two phases (stage, put, commit / abort), list
and remove shards. Admin only: pushing data is as privileged as deploying a model."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dllmd.data.shards import ShardError, ShardStore
from dllmd.net.keys import Role
from dllmd.net.schema import bounded
from dllmd.net.server import Call, HandlerError, Operation, RpcServer, allow
from dllmd.net.wire import ErrorCode

MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_META_BYTES = 32 * 1024 * 1024  # the per-sample table of a big shard


@dataclass
class StageArgs:
    dataset: str = bounded(max_len=128)
    meta: bytes = bounded(max_len=MAX_META_BYTES)  # JSON object describing the shard
    bytes: int = bounded(lo=1, hi=2**44)
    sha256: str = bounded(max_len=64)


@dataclass
class PutArgs:
    dataset: str = bounded(max_len=128)
    offset: int = bounded(lo=0, hi=2**44)


@dataclass
class DatasetArgs:
    dataset: str = bounded(max_len=128)


@dataclass
class NoArgs:
    pass


class DataOps:
    def __init__(self, home: Path):
        self.shards = ShardStore(home / "datasets")

    def register(self, server: RpcServer) -> None:
        admin = allow(Role.ADMIN)
        server.register(Operation("data.stage", self._stage, StageArgs, admin))
        server.register(Operation("data.put", self._put, PutArgs, admin))
        server.register(Operation("data.commit", self._commit, DatasetArgs, admin))
        server.register(Operation("data.abort", self._abort, DatasetArgs, admin))
        server.register(Operation("data.list", self._list, NoArgs, admin))
        server.register(Operation("data.remove", self._remove, DatasetArgs, admin))

    @staticmethod
    async def _run(fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except ShardError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None

    async def _stage(self, call: Call) -> dict:
        a: StageArgs = call.args
        try:
            meta = json.loads(a.meta)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise HandlerError(ErrorCode.BAD_ARGS, "meta must be a JSON object")
        return await self._run(self.shards.stage, a.dataset, meta, a.bytes, a.sha256)

    async def _put(self, call: Call) -> dict:
        a: PutArgs = call.args
        if len(call.tensors) != 1 or call.tensors[0].dtype != torch.int8 or call.tensors[0].dim() != 1:
            raise HandlerError(ErrorCode.BAD_ARGS, "data.put carries one int8 [n] tensor of shard bytes")
        if call.tensors[0].numel() > MAX_CHUNK_BYTES:
            raise HandlerError(ErrorCode.TOO_LARGE, f"chunks are at most {MAX_CHUNK_BYTES} bytes")
        return await self._run(self.shards.put, a.dataset, a.offset, call.tensors[0].numpy().tobytes())

    async def _commit(self, call: Call) -> dict:
        return await self._run(self.shards.commit, call.args.dataset)

    async def _abort(self, call: Call) -> dict:
        return {"aborted": await self._run(self.shards.abort, call.args.dataset)}

    async def _list(self, call: Call) -> dict:
        return {"datasets": await self._run(self.shards.list)}

    async def _remove(self, call: Call) -> dict:
        removed = await self._run(self.shards.remove, call.args.dataset)
        if not removed:
            raise HandlerError(ErrorCode.NOT_FOUND, f"no dataset {call.args.dataset!r} on this node")
        return {"removed": True}
