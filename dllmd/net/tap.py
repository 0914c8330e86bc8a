"""A record of everything this daemon sends over its RPC connections, before encryption: how a test
(or a suspicious owner) checks what leaves the node, e.g. that no federated operation ever sends a
token of the node's data.

Off unless ``dllmd start`` runs with ``DLLMD_WIRE_TAP=/path/to/file`` in its environment (read once,
like the failpoints). Each message is appended as its frames, each frame a 4-byte big-endian length
then its bytes, the message ended by a zero-length frame. Unset, ``record`` is one attribute test.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, Iterator, Sequence

ENV = "DLLMD_WIRE_TAP"

_file: BinaryIO | None = None


def load() -> None:
    global _file
    path = os.environ.get(ENV)
    _file = open(path, "ab", buffering=0) if path else None


def record(frames: Sequence) -> None:
    if _file is None:
        return
    parts = []
    for frame in frames:
        data = bytes(frame.buffer if hasattr(frame, "buffer") else frame)
        parts += [struct.pack(">I", len(data)), data]
    _file.write(b"".join(parts) + struct.pack(">I", 0))


def messages(path: str | os.PathLike) -> Iterator[list[bytes]]:
    """The messages a tap file holds, each as its list of frames."""
    data = open(path, "rb").read()
    offset, frames = 0, []
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if size == 0:
            yield frames
            frames = []
            continue
        frames.append(data[offset:offset + size])
        offset += size
