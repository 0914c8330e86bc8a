"""A node's dataset shards: ``<home>/datasets/<name>/`` holds ``shard.safetensors`` (packed token
sequences) and ``shard.json`` (what they are: samples, tokens, strategy, sha256).

Pushing a dataset is two-phase, so an interrupted or partly failed push leaves nothing half-written
anywhere: every node first *stages* its shard under ``.incoming/<name>/`` (chunked, resumable, the
sha256 checked when the last byte arrives: :class:`~dllmd.storage.StagedFile`), and only when every
node holds a verified staged shard does the client *commit* on each, which swaps the staged
directory into place in one step (:func:`~dllmd.storage.replace_directory`). A client that gives up
sends *abort*; a stage nobody commits is swept away after a day.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dllmd.data.pieces import piece_digest
from dllmd.storage import StagedFile, StagingError, atomic_write, recover_directories, remove_directory, replace_directory

if TYPE_CHECKING:
    import torch

    from dllmd.data.packing import Packed

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHARD, META, PART, INCOMING = "shard.safetensors", "shard.json", "shard.safetensors.part", ".incoming"
STALE_STAGE_S = 24 * 3600
SHARD_FORMAT = "dllm-shard-1"


class ShardError(ValueError):
    """A shard operation that cannot be done; the message says why and what to do."""




class ShardStore:
    def __init__(self, root: Path):
        self.root = root
        recover_directories(root)  # a commit or removal a crash interrupted

    def _name(self, name: str) -> str:
        if not NAME.match(name):
            raise ShardError(f"invalid dataset name {name!r}: letters, digits, '.', '_' and '-' (max 128)")
        return name

    def _staged(self, name: str) -> Path:
        return self.root / INCOMING / self._name(name)

    @staticmethod
    def _file(name: str, staged: Path, meta: dict) -> StagedFile:
        return StagedFile(staged / PART, staged / SHARD, meta["bytes"], meta["sha256"], f"shard {name!r}")

    # --- staging --------------------------------------------------------------------------------

    def stage(self, name: str, meta: dict, size: int, sha256: str) -> dict:
        """Begin (or resume) receiving a shard; returns how many bytes are already here."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ShardError("sha256 must be 64 lowercase hex digits")
        self._sweep_stale()
        staged = self._staged(name)
        meta = {**meta, "bytes": size, "sha256": sha256}
        current = self._read_meta(staged)
        if current is None or current.get("sha256") != sha256 or current.get("bytes") != size:
            shutil.rmtree(staged, ignore_errors=True)  # another shard under this name: start over
            staged.mkdir(parents=True)
            atomic_write(staged / META, json.dumps(meta).encode())
        elif current != meta:
            atomic_write(staged / META, json.dumps(meta).encode())
        try:
            received = self._file(name, staged, meta).resume()
        except StagingError:
            received = 0  # complete but corrupt: its bytes are gone, send them again
        return {"received": received, "complete": received == size}

    def put(self, name: str, offset: int, chunk: bytes) -> dict:
        """Append a chunk of a staged shard at ``offset``; the sha256 is checked when the last byte arrives."""
        staged = self._staged(name)
        meta = self._read_meta(staged)
        if meta is None:
            raise ShardError(f"no staged shard {name!r} here; stage it first (data.stage)")
        try:
            received = self._file(name, staged, meta).append(offset, chunk)
        except StagingError as exc:
            raise ShardError(str(exc)) from None
        return {"received": received, "complete": received == meta["bytes"]}

    def commit(self, name: str) -> dict:
        """Publish a complete staged shard, replacing any earlier shard of this dataset at once."""
        staged = self._staged(name)
        meta = self._read_meta(staged)
        if meta is None or not (staged / SHARD).exists():
            raise ShardError(f"shard {name!r} is not completely staged here; push it again")
        replace_directory(staged, self.root / name)
        return {"committed": name, **self._public(meta)}

    def abort(self, name: str) -> bool:
        staged = self._staged(name)
        existed = staged.exists()
        shutil.rmtree(staged, ignore_errors=True)
        return existed

    def _sweep_stale(self) -> None:
        incoming = self.root / INCOMING
        if not incoming.exists():
            return
        cutoff = time.time() - STALE_STAGE_S
        for entry in incoming.iterdir():
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)

    # --- reading --------------------------------------------------------------------------------

    @staticmethod
    def _read_meta(directory: Path) -> dict | None:
        try:
            return json.loads((directory / META).read_bytes())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    @staticmethod
    def _public(meta: dict) -> dict:
        """What listings show: everything but the per-sample table."""
        return {k: v for k, v in meta.items() if k != "samples"}

    def list(self) -> list[dict]:
        if not self.root.exists():
            return []
        shards = []
        for entry in sorted(self.root.iterdir()):
            meta = self._read_meta(entry) if NAME.match(entry.name) else None
            if meta is not None and (entry / SHARD).exists():
                shards.append({"dataset": entry.name, **self._public(meta)})
        return shards

    def shard_path(self, name: str) -> Path:
        path = self.root / self._name(name) / SHARD
        if not path.exists():
            raise ShardError(f"dataset {name!r} has no shard on this node; run 'dllmctl shard-data'")
        return path

    def remove(self, name: str) -> bool:
        existed = remove_directory(self.root / self._name(name))
        self.abort(name)
        return existed


def shard_payload(packed: Packed, **info) -> tuple[bytes, dict]:
    """A packed shard as the bytes of ``shard.safetensors`` (``tokens``: int32 [sequences, seq_len])
    and its ``shard.json`` description (``info`` plus counts and the per-sample table)."""
    flat = packed.tokens.reshape(-1).numpy()
    blob = shard_blob(packed.tokens.numpy(), packed.valid_tokens)
    meta = {**info, "format": SHARD_FORMAT, "seq_len": int(packed.tokens.shape[1]) if packed.tokens.dim() == 2 else 0,
            "eos_id": packed.eos_id,
            # [id, start, length, digest]: the digest lets an update tell what this node already holds.
            "samples": [[s.sample_id, s.start, s.length, piece_digest(flat[s.start:s.start + s.length])]
                        for s in packed.spans],
            "sample_count": len(packed.spans), "tokens": int(packed.valid_tokens), "sequences": int(packed.rows)}
    return blob, meta


def shard_blob(tokens: np.ndarray, valid_tokens: int) -> bytes:
    """``tokens`` (int32 ``[rows, seq_len]``) as a safetensors file, byte for byte the same wherever it
    is written. safetensors' own writer orders the metadata by a hash map seeded per process, so the
    same tokens would hash differently on the client and on a node that rebuilds its shard."""
    data = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
    header = json.dumps({"__metadata__": {"format": SHARD_FORMAT, "valid_tokens": str(int(valid_tokens))},
                         "tokens": {"dtype": "I32", "shape": [int(n) for n in tokens.shape],
                                    "data_offsets": [0, len(data)]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(header)) + header + data


def read_shard(path: Path) -> tuple["torch.Tensor", dict]:
    """The token rows of a committed shard and its description (what training reads)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tokens = f.get_tensor("tokens")
    meta = json.loads((path.parent / META).read_bytes())
    return tokens, meta
