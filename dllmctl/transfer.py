"""Sending a file to a node in chunks (``model.put``, ``data.put``): the one upload loop.

The node appends each chunk to its staged copy and says how much it holds (:mod:`dllmd.storage`);
a caller that was told a file is partly there (``model.offer``, ``data.stage``) resumes from that
offset, so an interrupted upload never sends a byte twice.
"""

from __future__ import annotations

from typing import BinaryIO, Callable


from dllmd.net.client import RpcClient
from dllmd.net.messages.transfer import CHUNK_BYTES, PutArgs, PutReply
from dllmd.net.schema import Op

PUT_TIMEOUT_S = 120.0


async def upload(client: RpcClient, op: Op[PutArgs, PutReply], name: str, source: BinaryIO, size: int,
                 offset: int = 0, path: str = "", on_sent: Callable[[int], None] = lambda _: None) -> int:
    """Send bytes ``[offset, size)`` of ``source`` (a binary file object) as ``op`` chunks of file ``path``
    of ``name``; ``on_sent`` hears each chunk's length. Returns the bytes sent."""
    import torch  # only here: the CLI's other commands never need it

    source.seek(offset)
    sent = 0
    while offset < size:
        chunk = source.read(min(CHUNK_BYTES, size - offset))
        if not chunk:
            raise OSError(f"{getattr(source, 'name', path or name)} ended at {offset} bytes, before the {size} "
                          f"it should have")
        await client.invoke(op, PutArgs(name=name, offset=offset, path=path),
                            [torch.frombuffer(bytearray(chunk), dtype=torch.int8)], timeout=PUT_TIMEOUT_S)
        offset += len(chunk)
        sent += len(chunk)
        on_sent(len(chunk))
    return sent
