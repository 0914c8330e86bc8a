"""Files sent in chunks (``model.put``, ``data.put``): one argument and one reply type for every
operation that receives a file this way. The chunk rides as one int8 tensor."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import bounded

MAX_CHUNK_BYTES = 16 * 1024 * 1024  # what a node accepts in one chunk
CHUNK_BYTES = 4 * 1024 * 1024  # what a client sends


@dataclass
class PutArgs:
    """A chunk of a staged file: model files, dataset shards."""

    name: str = bounded(max_len=128)  # the model or dataset it belongs to
    offset: int = bounded(lo=0, hi=2**48)
    path: str = bounded("", max_len=256)  # the file within it ("" where there is one file)


@dataclass
class PutReply:
    """How much of the file the node holds now, and whether it is complete (verified and published)."""

    received: int
    complete: bool
