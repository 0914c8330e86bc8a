"""A job's shards on one node: the ones it computes, in memory, and spare copies of others', on disk.

Each shard of a training job has spare copies on other nodes (``--shard-copies``, on its owner's
next ring members), so that the shards of nodes that die together move to one that has them. A
spare is read only if this node takes its shard over; until then it costs disk, not memory, and a
node keeps as many as the job asks without running short of RAM. Spares are written atomically (a
temporary file renamed; room checked first: a full disk refuses the copy with ``no_space`` and
keeps what was there) under ``<home>/jobs/<job>/spares/`` and removed when the job releases its
replica done or failed, or idle for 15 minutes; an interrupted job's release, a daemon that stops
and a job prepared again to resume keep them, so a resumed job can go on without a node that is gone
for good (data parallelism) or move its stage elsewhere (pipelines).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from typing import TYPE_CHECKING

from dllmd.storage.room import save_tensors

if TYPE_CHECKING:
    from dllmd.train.worker import ShardRows


class ShardSet(MutableMapping[str, "ShardRows"]):
    """shard -> its rows; a spare is loaded the first time it is asked for (then kept in memory: this
    node computes it from now on). Without a directory spares stay in memory."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self._rows: dict[str, ShardRows] = {}
        self._spares: dict[str, tuple[Path, int]] = {}  # shard -> its file, its row count

    def __getitem__(self, shard: str) -> ShardRows:
        if shard not in self._rows and shard in self._spares:
            self._rows[shard] = _load(self._spares[shard][0])
        return self._rows[shard]

    def __setitem__(self, shard: str, rows: ShardRows) -> None:
        self._rows[shard] = rows

    def __delitem__(self, shard: str) -> None:
        if shard not in self:
            raise KeyError(shard)
        self._rows.pop(shard, None)
        spare = self._spares.pop(shard, None)
        if spare is not None:
            spare[0].unlink(missing_ok=True)

    def __contains__(self, shard: object) -> bool:
        return shard in self._rows or shard in self._spares

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._rows) + [s for s in self._spares if s not in self._rows])

    def __len__(self) -> int:
        return len(set(self._rows) | set(self._spares))

    def in_memory(self) -> set[str]:
        return set(self._rows)

    def row_count(self, shard: str) -> int:
        """A shard's rows, without reading a spare."""
        if shard in self._rows:
            return int(self._rows[shard].tokens.shape[0])
        return self._spares[shard][1]

    def keep_spare(self, shard: str, rows: ShardRows) -> None:
        """Keep a copy of another node's shard, on disk when this set has a directory."""
        if self.directory is None:
            self._rows[shard] = rows
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # Shard ids are node keys: a digest makes a file name of any of them.
        path = self.directory / f"{hashlib.sha256(shard.encode()).hexdigest()[:32]}.safetensors"
        temporary = path.with_suffix(".partial")
        save_tensors({"tokens": rows.tokens.contiguous()}, temporary, "a spare copy of a training shard",
                     metadata={"valid_tokens": str(rows.valid_tokens), "shard": shard})
        os.replace(temporary, path)
        self._spares[shard] = (path, int(rows.tokens.shape[0]))

    def adopt(self) -> list[str]:
        """Take up the spares a replica of this job left in the directory before (the daemon stopped,
        or the job is prepared again to resume): the shards they hold."""
        if self.directory is None or not self.directory.is_dir():
            return []
        from safetensors import SafetensorError, safe_open

        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    shard, rows = f.metadata()["shard"], f.get_slice("tokens").get_shape()[0]
            except (SafetensorError, OSError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # cut short or not ours: a spare is only ever a copy
                continue
            self._spares.setdefault(shard, (path, int(rows)))
        return sorted(self._spares)

    def close(self, keep_spares: bool = False) -> None:
        """Forget every shard; remove the spares' files unless ``keep_spares`` (the job may resume)."""
        self._rows.clear()
        self._spares.clear()
        if self.directory is not None and not keep_spares:
            shutil.rmtree(self.directory, ignore_errors=True)


def _load(path: Path) -> ShardRows:
    from safetensors import safe_open

    from dllmd.train.worker import ShardRows

    with safe_open(str(path), framework="pt") as f:
        tokens = f.get_tensor("tokens")
        valid = int(f.metadata()["valid_tokens"])
    return ShardRows(tokens, valid)
