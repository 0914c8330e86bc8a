"""Deploy-side operations of a node: receive a model's files, load and unload layer spans.

Everything a caller can get wrong (a hostile manifest, a chunk that does not fit, a span outside
the model) is answered ``bad_args`` (``not_found`` for a model never offered here), never
``internal``: the store and the staging area raise :class:`ModelStoreError` for all of it.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
from transformers import AutoConfig

from dllmd.hardware import best_device
from dllmd.inference.memory import NoRoom
from dllmd.inference.ops import InferenceService
from dllmd.models.dtypes import WEIGHT_DTYPES, torch_dtype
from dllmd.models.families import UnsupportedFamily
from dllmd.models.received import ReceivedModels
from dllmd.models.span import LayerSpan, expected_weight_bytes
from dllmd.models.store import ModelNotFound, ModelStoreError
from dllmd.net.chunked import receive_chunk
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages import models as M
from dllmd.net.messages.transfer import PutArgs, PutReply
from dllmd.net.server import Call, HandlerError, Operation, RpcServer
from dllmd.net.wire import ErrorCode


@contextmanager
def refusing() -> Iterator[None]:
    """Answer the store's refusals with their error codes."""
    try:
        yield
    except ModelNotFound as exc:
        raise HandlerError(ErrorCode.NOT_FOUND, str(exc)) from None
    except ModelStoreError as exc:
        raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None


class ModelOps:
    def __init__(self, home: Path, keys: AuthorizedKeys, inference: InferenceService):
        self.models = ReceivedModels(home / "models")
        self.keys = keys
        self.inference = inference

    def register(self, server: RpcServer) -> None:
        for op, handler in ((M.MODEL_OFFER, self._offer), (M.MODEL_PUT, self._put), (M.MODEL_REMOVE, self._remove),
                            (M.SPAN_LOAD, self._load), (M.SPAN_UNLOAD, self._unload)):
            server.register(Operation(op, handler))

    def _admins(self) -> list[str]:
        return [k.public_key for k in self.keys.all() if k.role == Role.ADMIN]

    async def _offer(self, call: Call) -> M.Offer:
        a: M.OfferArgs = call.args
        with refusing():
            return await asyncio.to_thread(self.models.offer, a.model, a.manifest, a.signature, self._admins())

    async def _put(self, call: Call) -> PutReply:
        with refusing():
            return await receive_chunk(call, self._append)

    def _append(self, a: PutArgs, chunk: bytes) -> PutReply:
        return self.models.put(a.name, a.path, a.offset, chunk)

    async def _load(self, call: Call) -> M.Loaded:
        a: M.LoadArgs = call.args
        if a.dtype and a.dtype not in WEIGHT_DTYPES:
            raise HandlerError(ErrorCode.BAD_ARGS, f"dtype must be one of {', '.join(WEIGHT_DTYPES)}")
        with refusing():
            manifest, paths = await asyncio.to_thread(
                self.models.verified_span, a.model, a.start, a.end, a.embed, a.head, self._admins())
        try:
            config = AutoConfig.from_pretrained(self.models.config_path(a.model).parent)
        except (OSError, ValueError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"config of {a.model} cannot be read: {exc}") from None
        dtype = torch_dtype(a.dtype or manifest.dtype)
        device = best_device()
        tensors = self.models.tensor_source(a.model, paths)

        def build() -> LayerSpan:
            return LayerSpan(config, a.start, a.end, embed=a.embed, head=a.head, tensors=tensors, dtype=dtype,
                             device=device, tensor_slice=a.tensor_slice)

        try:
            expected = await asyncio.to_thread(
                expected_weight_bytes, config, a.start, a.end, embed=a.embed, head=a.head, dtype=dtype,
                tensor_slice=a.tensor_slice, quantized=manifest.quantization is not None)
            served = await self.inference.load(a.model, build, expected)
        except (ValueError, UnsupportedFamily) as exc:  # ModelStoreError and SpanLoadError are ValueErrors
            raise HandlerError(ErrorCode.BAD_ARGS, f"cannot load layers [{a.start}, {a.end}) of {a.model}: {exc}") from None
        except NoRoom as exc:
            raise HandlerError(ErrorCode.NO_MEMORY, f"cannot load layers [{a.start}, {a.end}) of {a.model}: {exc}; "
                                                    f"plan it over more nodes") from None
        return M.Loaded(span=served.describe(), device=str(device), rss_bytes=psutil.Process().memory_info().rss)

    async def _unload(self, call: Call) -> M.Unloaded:
        if not self.inference.unload(call.args.model):
            raise HandlerError(ErrorCode.NOT_FOUND, f"{call.args.model} is not loaded here")
        return M.Unloaded(unloaded=True)

    async def _remove(self, call: Call) -> M.Removed:
        self.inference.unload(call.args.model)
        with refusing():
            removed = await asyncio.to_thread(self.models.remove, call.args.model)
        return M.Removed(removed=removed)
