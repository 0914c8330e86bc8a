"""Dataset operations of a node: receive a shard in two phases (stage or stage a patch, put, commit /
abort), describe, list and remove shards. Admin only: pushing data is as privileged as deploying a model."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import tempfile
from pathlib import Path

import torch

from dllmd.data import DataError, eos_id, load_data_tokenizer, pack, read_samples, tokenize_samples
from dllmd.data.errors import PatchTooLarge, PathForbidden, StaleBase
from dllmd.data.shards import ShardError, ShardStore, shard_payload
from dllmd.data.sources import path_under
from dllmd.net.chunked import int8_payload, int8_tensor, receive_chunk
from dllmd.net.messages import data as M
from dllmd.net.messages.transfer import PutArgs, PutReply
from dllmd.net.server import Call, HandlerError, Operation, RpcServer
from dllmd.net.wire import ErrorCode

MAX_META_BYTES = 32 * 1024 * 1024  # the per-sample table of a big shard
MAX_SKIPPED_REPORTED = 200  # the reply is a header (64 KiB); the count says how many there were
TOKENIZER_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")  # a plain name: no '..', no '/'
# What a sender branches on: push the shard whole instead of a patch.
SHARD_ERROR_CODES = {StaleBase: ErrorCode.CONFLICT, PatchTooLarge: ErrorCode.TOO_LARGE}


def _handler_error(exc: ShardError) -> HandlerError:
    return HandlerError(SHARD_ERROR_CODES.get(type(exc), ErrorCode.BAD_ARGS), str(exc))


class DataOps:
    def __init__(self, home: Path, data_roots: list[Path]):
        self.shards = ShardStore(home / "datasets")
        self.data_roots = data_roots  # resolved: what data.local may read (node.toml's data_roots)

    def register(self, server: RpcServer) -> None:
        for op, handler in ((M.DATA_STAGE, self._stage), (M.DATA_STAGE_PATCH, self._stage_patch),
                            (M.DATA_PUT, self._put), (M.DATA_COMMIT, self._commit), (M.DATA_ABORT, self._abort),
                            (M.DATA_LIST, self._list), (M.DATA_DESCRIBE, self._describe),
                            (M.DATA_REMOVE, self._remove), (M.DATA_LOCAL, self._local)):
            server.register(Operation(op, handler))

    @staticmethod
    async def _run(fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except ShardError as exc:
            raise _handler_error(exc) from None

    @staticmethod
    def _meta(call: Call) -> dict:
        # The description (with its per-sample table, megabytes for a big shard) rides as a tensor
        # frame: headers are limited to 64 KiB.
        blob = int8_payload(call, MAX_META_BYTES, "the shard's JSON description")
        try:
            meta = json.loads(blob)
        except (ValueError, RecursionError):
            meta = None
        if not isinstance(meta, dict):
            raise HandlerError(ErrorCode.BAD_ARGS, "meta must be a JSON object")
        return meta

    async def _stage(self, call: Call) -> PutReply:
        a: M.StageArgs = call.args
        return PutReply(**await self._run(self.shards.stage, a.dataset, self._meta(call), a.bytes, a.sha256))

    async def _stage_patch(self, call: Call) -> PutReply:
        a: M.PatchArgs = call.args
        meta = {**self._meta(call), "bytes": a.shard_bytes, "sha256": a.shard_sha256}
        return PutReply(**await self._run(self.shards.stage_patch, a.dataset, meta, a.bytes, a.sha256, a.base))

    async def _put(self, call: Call) -> PutReply:
        try:
            return await receive_chunk(call, self._append)
        except ShardError as exc:
            raise _handler_error(exc) from None

    def _append(self, a: PutArgs, chunk: bytes) -> PutReply:
        if a.path:
            raise ShardError(f"a dataset's shard is one file: data.put takes no path (got {a.path!r})")
        return PutReply(**self.shards.put(a.name, a.offset, chunk))

    async def _commit(self, call: Call) -> dict:
        return await self._run(self.shards.commit, call.args.dataset)

    async def _abort(self, call: Call) -> dict:
        return {"aborted": await self._run(self.shards.abort, call.args.dataset)}

    async def _list(self, call: Call) -> dict:
        return {"datasets": await self._run(self.shards.list)}

    async def _describe(self, call: Call) -> tuple[M.DescribeReply, list[torch.Tensor]]:
        meta = await self._run(self.shards.describe, call.args.dataset)
        if meta is None:
            raise HandlerError(ErrorCode.NOT_FOUND, f"no dataset {call.args.dataset!r} on this node")
        return (M.DescribeReply(sha256=meta.get("sha256", ""), bytes=meta.get("bytes", 0)),
                [int8_tensor(json.dumps(meta).encode())])

    async def _remove(self, call: Call) -> dict:
        removed = await self._run(self.shards.remove, call.args.dataset)
        if not removed:
            raise HandlerError(ErrorCode.NOT_FOUND, f"no dataset {call.args.dataset!r} on this node")
        return {"removed": True}

    async def _local(self, call: Call) -> dict:
        """Shard a path on this node's disk into a staged shard (``data.commit`` publishes it):
        the data never leaves the machine, only counts and the sha256 go back."""
        a: M.LocalArgs = call.args
        try:
            # First, before anything is read or staged: the caller's path must be one the owner allowed.
            source = await asyncio.to_thread(path_under, a.uri, self.data_roots)
        except PathForbidden as exc:
            raise HandlerError(ErrorCode.FORBIDDEN, str(exc)) from None
        except DataError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        try:
            info = json.loads(a.info)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise HandlerError(ErrorCode.BAD_ARGS, "info must be a JSON object")
        if any(not TOKENIZER_FILE.match(name) for name in a.tokenizer_files):
            raise HandlerError(ErrorCode.BAD_ARGS, "tokenizer file names must be plain file names")
        if len(call.tensors) != len(a.tokenizer_files) or any(t.dtype != torch.int8 or t.dim() != 1
                                                              for t in call.tensors):
            raise HandlerError(ErrorCode.BAD_ARGS, "data.local carries one int8 [n] tensor per tokenizer file")
        files = {name: t.numpy().tobytes() for name, t in zip(a.tokenizer_files, call.tensors)}
        try:
            return await asyncio.to_thread(self._shard_locally, a, source, info, files)
        except (DataError, ShardError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None

    def _shard_locally(self, a: M.LocalArgs, path: Path, info: dict, files: dict[str, bytes]) -> dict:
        # The resolved path, not a.uri: what was checked is what is read (its symlinks resolved there).
        source = read_samples(str(path), field=a.field, include=a.include or None, exclude=a.exclude, strict=a.strict)
        with tempfile.TemporaryDirectory() as directory:
            for name, blob in files.items():
                (Path(directory) / name).write_bytes(blob)
            tokenizer = load_data_tokenizer(Path(directory))
        samples = tokenize_samples(tokenizer, source.samples)
        packed = pack(samples, a.seq_len, eos_id(tokenizer))
        blob, meta = shard_payload(packed, **info)
        sha256 = hashlib.sha256(blob).hexdigest()
        state = self.shards.stage(a.dataset, meta, len(blob), sha256)
        if not state["complete"]:
            self.shards.put(a.dataset, state["received"], blob[state["received"]:])
        return {"samples": meta["sample_count"], "tokens": meta["tokens"], "sequences": meta["sequences"],
                "bytes": len(blob), "sha256": sha256, "sample_count": meta["sample_count"],
                "skipped": [dataclasses.asdict(s) for s in source.skipped[:MAX_SKIPPED_REPORTED]],
                "skipped_count": len(source.skipped)}
