"""Room on disk: refuse a write that cannot fit before it starts, and name a full disk when one fills
anyway (another process wrote meanwhile).

Every durable write here goes to a temporary name first and is renamed into place, so a full disk
never corrupts what was there; what this module adds is the clear refusal (what needed how much, how
much is free, where) instead of a half-written temporary file and an ``OSError`` from deep inside,
and the removal of that temporary file so the space it took comes back.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported by what merely lists things (dllmctl nodes list stays fast)
    import torch

# Left free beyond the write itself: filesystems and the sqlite journal need a little room to work.
SLACK_BYTES = 1 << 20
SAFETENSORS_HEADER_SLACK = 64 * 1024


class DiskFull(OSError):
    """Not enough room for a write at ``directory``; nothing of it was kept."""

    def __init__(self, what: str, need: int, free: int, directory: Path):
        self.what, self.need, self.free, self.directory = what, need, free, Path(directory)
        super().__init__(errno.ENOSPC, f"no space left for {what} under {directory}: it needs {_mib(need)}, "
                                       f"{_mib(free)} is free")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the user's quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes free to this process on the filesystem that holds ``path`` (or would: the nearest existing
    parent is measured)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_room(directory: Path, need: int, what: str) -> None:
    """Raise :class:`DiskFull` unless ``need`` bytes (and a little slack) fit under ``directory``."""
    free = free_bytes(directory)
    if need + SLACK_BYTES > free:
        raise DiskFull(what, need, free, directory)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, what: str, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` that checks for room first and removes a file a full disk cut
    short (safetensors reports that as a plain ``SafetensorError``: the disk is measured to tell)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    need = tensor_bytes(tensors) + SAFETENSORS_HEADER_SLACK
    ensure_room(path.parent, need, what)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except (SafetensorError, OSError) as exc:
        _remove(path)
        if is_disk_full(exc) or free_bytes(path.parent) < need:
            raise DiskFull(what, need, free_bytes(path.parent), path.parent) from exc
        raise


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
