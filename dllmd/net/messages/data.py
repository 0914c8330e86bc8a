"""Dataset shards on a node: ``data.stage`` / ``data.put`` / ``data.commit`` / ``data.abort`` (a two-phase
push), ``data.stage_patch`` (an update: only the pieces the node lacks, the shard built on the node),
``data.describe`` (what the node's shard holds, piece by piece), ``data.local`` (shard a path on the
node's own disk), ``data.list``, ``data.remove``. Admin only."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.messages.transfer import PutArgs, PutReply
from dllmd.net.schema import NoArgs, Op, bounded


@dataclass
class StageArgs:
    dataset: str = bounded(max_len=128)
    bytes: int = bounded(lo=1, hi=2**44)
    sha256: str = bounded(max_len=64)


@dataclass
class PatchArgs:
    """Stage the shard ``shard_bytes`` / ``shard_sha256`` as a patch of ``bytes`` (int32 tokens, sha256
    ``sha256``) on top of the committed shard ``base``; the description rides as a tensor, as with
    ``data.stage``. Refused with ``conflict`` when this node's shard is not ``base``, ``too_large`` when
    the shard is too large to build here: the sender then pushes the shard whole."""
    dataset: str = bounded(max_len=128)
    bytes: int = bounded(lo=0, hi=2**40)
    sha256: str = bounded(max_len=64)
    base: str = bounded(max_len=64)
    shard_bytes: int = bounded(lo=1, hi=2**44)
    shard_sha256: str = bounded(max_len=64)


@dataclass
class DescribeReply:
    """The committed shard; its description (``shard.json``: info, counts, the piece table
    ``[id, start, length, digest]``) rides as one int8 tensor of JSON."""
    sha256: str
    bytes: int


@dataclass
class DatasetArgs:
    dataset: str = bounded(max_len=128)


@dataclass
class LocalArgs:
    dataset: str = bounded(max_len=128)
    uri: str = bounded(max_len=4096)  # a path on this node's own disk
    field: str = bounded("text", max_len=128)
    include: list[str] = bounded([], max_len=256)
    exclude: list[str] = bounded([], max_len=256)
    strict: bool = False
    seq_len: int = bounded(2048, lo=8, hi=1_048_576)
    tokenizer_files: list[str] = bounded([], max_len=16)  # names of the tensors (int8 file bytes) carried
    info: bytes = bounded(b"{}", max_len=64 * 1024)  # JSON: what the shard description records


DATA_STAGE = Op("data.stage", StageArgs, PutReply)  # what is staged already: resume from ``received``
DATA_STAGE_PATCH = Op("data.stage_patch", PatchArgs, PutReply)  # then data.put the patch; complete = built
DATA_PUT = Op("data.put", PutArgs, PutReply)  # ``name`` is the dataset; a shard is one file (no ``path``)
DATA_COMMIT = Op("data.commit", DatasetArgs, dict)
DATA_ABORT = Op("data.abort", DatasetArgs, dict)
DATA_LIST = Op("data.list", NoArgs, dict)
DATA_DESCRIBE = Op("data.describe", DatasetArgs, DescribeReply)  # not_found: no committed shard
DATA_REMOVE = Op("data.remove", DatasetArgs, dict)
DATA_LOCAL = Op("data.local", LocalArgs, dict)
