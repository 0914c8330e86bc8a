"""Deploy-side operations of a node: receive a model's files, load and unload layer spans."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig

from dllmd.hardware import best_device
from dllmd.models.dtypes import WEIGHT_DTYPES, torch_dtype
from dllmd.inference.ops import InferenceService
from dllmd.models.received import ModelFileError, ReceivedModels, tensor_source
from dllmd.models.span import LayerSpan
from dllmd.models.families import UnsupportedFamily
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.schema import Op, bounded, to_wire
from dllmd.net.server import Call, HandlerError, Operation, RpcServer, allow
from dllmd.net.wire import ErrorCode

MAX_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass
class OfferArgs:
    model: str = bounded(max_len=128)
    manifest: bytes = bounded(max_len=4 * 1024 * 1024)
    signature: bytes = bounded(max_len=64)


@dataclass
class PutArgs:
    model: str = bounded(max_len=128)
    path: str = bounded(max_len=200)
    offset: int = bounded(lo=0, hi=2**48)


@dataclass
class LoadArgs:
    model: str = bounded(max_len=128)
    start: int = bounded(lo=0, hi=100_000)
    end: int = bounded(lo=0, hi=100_000)
    embed: bool = False
    head: bool = False
    dtype: str = bounded("", max_len=16)  # "": the dtype the model was imported in


@dataclass
class ModelArgs:
    model: str = bounded(max_len=128)


class ModelOps:
    def __init__(self, home: Path, keys: AuthorizedKeys, inference: InferenceService):
        self.models = ReceivedModels(home / "models")
        self.keys = keys
        self.inference = inference

    def register(self, server: RpcServer) -> None:
        admin = allow(Role.ADMIN)
        for op, handler in ((Op("model.offer", OfferArgs, dict), self._offer), (Op("model.put", PutArgs, dict), self._put),
                            (Op("model.remove", ModelArgs, dict), self._remove),
                            (Op("span.load", LoadArgs, dict), self._load), (Op("span.unload", ModelArgs, dict), self._unload)):
            server.register(Operation(op, handler, admin))

    def _admins(self) -> list[str]:
        return [k.public_key for k in self.keys.all() if k.role == Role.ADMIN]

    async def _offer(self, call: Call) -> dict:
        a: OfferArgs = call.args
        try:
            return await asyncio.to_thread(self.models.offer, a.model, a.manifest, a.signature, self._admins())
        except ModelFileError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None

    async def _put(self, call: Call) -> dict:
        a: PutArgs = call.args
        if len(call.tensors) != 1 or call.tensors[0].dtype != torch.int8 or call.tensors[0].dim() != 1:
            raise HandlerError(ErrorCode.BAD_ARGS, "model.put carries one int8 [n] tensor of file bytes")
        chunk = call.tensors[0]
        if chunk.numel() > MAX_CHUNK_BYTES:
            raise HandlerError(ErrorCode.TOO_LARGE, f"chunks are at most {MAX_CHUNK_BYTES} bytes")
        try:
            return await asyncio.to_thread(self.models.put, a.model, a.path, a.offset, chunk.numpy().tobytes())
        except ModelFileError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None

    async def _load(self, call: Call) -> dict:
        a: LoadArgs = call.args
        if a.dtype and a.dtype not in WEIGHT_DTYPES:
            raise HandlerError(ErrorCode.BAD_ARGS, f"dtype must be one of {', '.join(WEIGHT_DTYPES)}")
        try:
            manifest, paths = await asyncio.to_thread(
                self.models.verified_span, a.model, a.start, a.end, a.embed, a.head, self._admins())
            config = AutoConfig.from_pretrained(self.models.config_path(a.model).parent)
        except ModelFileError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        except (OSError, ValueError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"config of {a.model} cannot be read: {exc}") from None
        dtype = torch_dtype(a.dtype or manifest.get("dtype", "float32"))
        device = best_device()

        def build() -> LayerSpan:
            return LayerSpan(config, a.start, a.end, embed=a.embed, head=a.head, tensors=tensor_source(paths),
                             dtype=dtype, device=device)

        try:
            served = await self.inference.load(a.model, build)
        except (ValueError, UnsupportedFamily) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"cannot load layers [{a.start}, {a.end}) of {a.model}: {exc}") from None
        return {**to_wire(served.describe()), "device": str(device), "rss_bytes": psutil.Process().memory_info().rss}

    async def _unload(self, call: Call) -> dict:
        if not self.inference.unload(call.args.model):
            raise HandlerError(ErrorCode.NOT_FOUND, f"{call.args.model} is not loaded here")
        return {"unloaded": True}

    async def _remove(self, call: Call) -> dict:
        self.inference.unload(call.args.model)
        try:
            removed = await asyncio.to_thread(self.models.remove, call.args.model)
        except ModelFileError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        return {"removed": removed}
