"""A node's dataset shards: ``<home>/datasets/<name>/`` holds ``shard.safetensors`` (packed token
sequences) and ``shard.json`` (what they are: samples, tokens, strategy, sha256).

Pushing a dataset is two-phase, so an interrupted or partly failed push leaves nothing half-written
anywhere: every node first *stages* its shard under ``.incoming/<name>/`` (chunked, resumable, the
sha256 checked when the last byte arrives: :class:`~dllmd.storage.StagedFile`), and only when every
node holds a verified staged shard does the client *commit* on each, which swaps the staged
directory into place in one step (:func:`~dllmd.storage.replace_directory`). A client that gives up
sends *abort*; a stage nobody commits is swept away after a day.

An update stages a *patch* instead of a whole shard (:mod:`dllmd.data.patch`): the new description,
and the tokens of only the pieces this node's committed shard lacks, received the same chunked way
(``patch.bin``). When its last byte is in, the node builds the new shard from the committed one and
the patch, checks it against the sha256 the client computed, and holds it staged like any pushed
shard; the commit is the same swap.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dllmd.data.errors import PatchTooLarge, ShardError, StaleBase
from dllmd.data.patch import apply_patch
from dllmd.data.pieces import piece_digest
from dllmd.storage import (DiskFull, StagedFile, StagingError, atomic_write, ensure_room, recover_directories,
                           remove_directory, replace_directory)

if TYPE_CHECKING:
    import torch

    from dllmd.data.packing import Packed

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHARD, META, PART, INCOMING = "shard.safetensors", "shard.json", "shard.safetensors.part", ".incoming"
PATCH, PATCH_PART, PATCH_STATE = "patch.bin", "patch.bin.part", "patch.json"
STALE_STAGE_S = 24 * 3600
SHARD_FORMAT = "dllm-shard-1"
# A patched shard is built in memory (the committed one read, the new one written) while the last
# data.put waits (120 s); a larger shard is pushed whole, which streams to disk in chunks.
MAX_PATCHED_SHARD_BYTES = 2 * 2**30


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
        _check_sha256(sha256)
        self._sweep_stale()
        staged = self._staged(name)
        meta = {**meta, "bytes": size, "sha256": sha256}
        current = self._read_meta(staged)
        if (current is None or current.get("sha256") != sha256 or current.get("bytes") != size
                or (staged / PATCH_STATE).exists()):
            shutil.rmtree(staged, ignore_errors=True)  # another shard (or a patch) under this name: start over
            staged.mkdir(parents=True)
            atomic_write(staged / META, json.dumps(meta).encode())
        elif current != meta:
            atomic_write(staged / META, json.dumps(meta).encode())
        try:
            received = self._file(name, staged, meta).resume()
        except StagingError:
            received = 0  # complete but corrupt: its bytes are gone, send them again
        if received < size:  # refused now, not when the disk fills halfway through (nothing staged is kept)
            try:
                ensure_room(staged, size - received, f"shard {name!r}")
            except DiskFull:
                shutil.rmtree(staged, ignore_errors=True)
                raise
        return {"received": received, "complete": received == size}

    def stage_patch(self, name: str, meta: dict, size: int, sha256: str, base: str) -> dict:
        """Begin (or resume) receiving a patch of ``size`` bytes (int32 tokens) that turns the committed
        shard ``base`` (its sha256) into the one ``meta`` describes (``meta["bytes"]``, ``meta["sha256"]``);
        the shard is built when the patch is complete. Raises :class:`StaleBase` when this node's shard
        is not ``base``, :class:`PatchTooLarge` for a shard too large to build in memory."""
        for digest in (sha256, base, meta.get("sha256")):
            _check_sha256(digest)
        if size % 4:
            raise ShardError(f"a patch holds int32 tokens: {size} bytes is not a multiple of 4")
        if not isinstance(meta.get("bytes"), int) or not 0 < meta["bytes"] <= MAX_PATCHED_SHARD_BYTES:
            raise PatchTooLarge(f"a patched shard may be at most {MAX_PATCHED_SHARD_BYTES} bytes; push it whole")
        self._base(name, base)
        self._sweep_stale()
        staged = self._staged(name)
        state = {"bytes": size, "sha256": sha256, "base": base}
        current = self._read_meta(staged)
        if current == meta and self._file(name, staged, meta).published:
            return {"received": size, "complete": True}  # built already: a resumed push
        if current != meta or _read_json(staged / PATCH_STATE) != state:
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
            atomic_write(staged / META, json.dumps(meta).encode())
            atomic_write(staged / PATCH_STATE, json.dumps(state).encode())
        try:
            received = self._patch_file(name, staged, state).resume()  # an empty patch is complete at once
        except StagingError:
            received = 0
        if received == size:
            self._build(name, staged, meta, base)
        return {"received": received, "complete": received == size}

    def put(self, name: str, offset: int, chunk: bytes) -> dict:
        """Append a chunk of a staged shard (or patch) at ``offset``; the sha256 is checked when the last
        byte arrives (and a patch's shard built)."""
        staged = self._staged(name)
        meta = self._read_meta(staged)
        if meta is None:
            raise ShardError(f"no staged shard {name!r} here; stage it first (data.stage)")
        state = _read_json(staged / PATCH_STATE)
        file = self._patch_file(name, staged, state) if state else self._file(name, staged, meta)
        try:
            received = file.append(offset, chunk)
        except StagingError as exc:
            raise ShardError(str(exc)) from None
        if state and received == state["bytes"]:
            self._build(name, staged, meta, state["base"])
        return {"received": received, "complete": received == file.size}

    @staticmethod
    def _patch_file(name: str, staged: Path, state: dict) -> StagedFile:
        return StagedFile(staged / PATCH_PART, staged / PATCH, state["bytes"], state["sha256"], f"patch of {name!r}")

    def _base(self, name: str, base: str) -> dict:
        """The committed description of ``name``, which must be the shard ``base``."""
        committed = self._read_meta(self.root / self._name(name))
        if committed is None or committed.get("sha256") != base or not (self.root / name / SHARD).exists():
            raise StaleBase(f"this node's shard of {name!r} is not {base[:12]}... (any more): push it whole")
        return committed

    def _build(self, name: str, staged: Path, meta: dict, base: str) -> None:
        """The shard ``meta`` describes, from the committed shard and the complete patch, staged as
        ``shard.safetensors``; the patch is deleted either way (a bad one is sent again)."""
        try:
            committed = self._base(name, base)
            tokens, _ = read_shard(self.root / name / SHARD)
            patch = np.fromfile(staged / PATCH, dtype="<i4")
            packed = apply_patch(tokens.reshape(-1).numpy(), committed.get("samples", []), meta.get("samples", []),
                                 patch, _int(meta, "seq_len", 1, 1 << 20), _int(meta, "eos_id", 0, 2**31 - 1),
                                 max_tokens=meta["bytes"] // 4)
            blob = shard_blob(packed.tokens.numpy(), packed.valid_tokens)
            if len(blob) != meta["bytes"] or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                raise ShardError(f"the shard patched from {name!r} does not match its sha256; push it whole")
            atomic_write(staged / SHARD, blob)
        finally:
            for leftover in (PATCH, PATCH_PART, PATCH_STATE):
                (staged / leftover).unlink(missing_ok=True)

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
        return _read_json(directory / META)

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

    def describe(self, name: str) -> dict | None:
        """The committed shard's full description (with its piece table), or None when there is none."""
        directory = self.root / self._name(name)
        meta = self._read_meta(directory)
        return meta if meta is not None and (directory / SHARD).exists() else None

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


def _check_sha256(digest: object) -> None:
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ShardError("sha256 must be 64 lowercase hex digits")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _int(meta: dict, key: str, lo: int, hi: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ShardError(f"the shard description's {key!r} must be an integer in [{lo}, {hi}]")
    return value


def read_shard(path: Path) -> tuple["torch.Tensor", dict]:
    """The token rows of a committed shard and its description (what training reads)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tokens = f.get_tensor("tokens")
    meta = json.loads((path.parent / META).read_bytes())
    return tokens, meta
