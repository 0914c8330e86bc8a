"""The daemon's side of a chunked put (``model.put``, ``data.put``): the checks of a chunk, and handing
its bytes to the staging area (:class:`dllmd.storage.StagedFile`) off the event loop."""

from __future__ import annotations

import asyncio
from typing import Callable

import torch

from dllmd.net.messages.transfer import MAX_CHUNK_BYTES, PutArgs, PutReply
from dllmd.net.server import Call, HandlerError
from dllmd.net.wire import ErrorCode


def int8_tensor(data: bytes) -> torch.Tensor:
    """``data`` as the one 1-D int8 tensor a chunk of file bytes rides as (empty at a file's end)."""
    return torch.frombuffer(bytearray(data), dtype=torch.int8) if data else torch.zeros(0, dtype=torch.int8)


def int8_payload(call: Call, limit: int, what: str) -> bytes:
    """The bytes of the one 1-D int8 tensor ``call`` must carry (``what`` names them in errors), at most
    ``limit`` of them."""
    if len(call.tensors) != 1 or call.tensors[0].dtype != torch.int8 or call.tensors[0].dim() != 1:
        raise HandlerError(ErrorCode.BAD_ARGS, f"{what} must ride as one int8 [n] tensor (and nothing else)")
    if call.tensors[0].numel() > limit:
        raise HandlerError(ErrorCode.TOO_LARGE, f"{what} is at most {limit} bytes per message")
    return call.tensors[0].numpy().tobytes()


async def receive_chunk(call: Call, store: Callable[[PutArgs, bytes], PutReply]) -> PutReply:
    """Check the chunk ``call`` carries and pass it to ``store`` (which appends it to the staged file) in
    a worker thread; ``store``'s errors propagate to the operation's own error mapping."""
    chunk = int8_payload(call, MAX_CHUNK_BYTES, "a chunk of file bytes")
    return await asyncio.to_thread(store, call.args, chunk)
