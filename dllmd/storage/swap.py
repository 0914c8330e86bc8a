"""Replacing a whole directory atomically: a reader sees the old directory or the new one, never
neither and never a mix, even across a crash.

On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two names in one step. Elsewhere (or on a file
system that refuses it) the old directory is renamed aside to ``.<name>.old`` first; a crash between
that rename and the next leaves the aside copy, which the next use of the directory puts back.
Every other leftover is named ``.<name>.swap-<hex>`` and only ever deleted. Removing never deletes
in place either: the directory is renamed away first, then deleted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dllmd.storage.atomic import fsync_dir, fsync_tree

AT_FDCWD = -100
RENAME_EXCHANGE = 2
ASIDE, TRASH = ".old", ".swap-"
LEFTOVER = re.compile(r"^\.(?P<name>.+)(?:\.old|\.swap-[0-9a-f]+)$")
# What renameat2 answers where the kernel or the file system cannot exchange: fall back.
UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def _load_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False (nothing changed) where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}{ASIDE}"


def _trash(target: Path) -> Path:
    return target.parent / f".{target.name}{TRASH}{secrets.token_hex(4)}"


@contextmanager
def _locked(parent: Path) -> Iterator[None]:
    """Exclusive use of ``parent``'s swaps, across threads and processes (flock on the directory)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _recover(target: Path) -> None:
    """Put back a directory a crash left aside, and delete every other leftover of ``target``."""
    aside = _aside(target)
    if not os.path.lexists(target) and aside.is_dir():
        os.rename(aside, target)
        fsync_dir(target.parent)
    for entry in target.parent.glob(f".{glob.escape(target.name)}{TRASH}*"):
        shutil.rmtree(entry, ignore_errors=True)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def recover_directories(parent: Path) -> list[str]:
    """Recover every directory in ``parent`` an interrupted swap or removal left behind (see the
    module docstring); returns their names. Call it before trusting what ``parent`` holds."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    names = sorted({m["name"] for m in map(LEFTOVER.match, os.listdir(parent)) if m})
    if names:
        with _locked(parent):
            for name in names:
                _recover(parent / name)
    return names


def replace_directory(staged: Path, target: Path) -> None:
    """Make the complete directory ``staged`` appear at ``target`` in one step, replacing whatever
    directory is there (then deleted). Everything under ``staged`` is made durable first."""
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        _recover(target)
        if not os.path.lexists(target):
            os.rename(staged, target)
            old = None
        else:
            # Under a leftover name first: a crash from here on leaves the old directory in place.
            swap = _trash(target)
            os.rename(staged, swap)
            if exchange(swap, target):
                old = swap
            else:
                os.rename(target, _aside(target))
                os.rename(swap, target)
                old = _trash(target)
                os.rename(_aside(target), old)
        fsync_dir(target.parent)
        if staged.parent != target.parent:
            fsync_dir(staged.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_directory(target: Path) -> bool:
    """Delete directory ``target``: it disappears at once (a rename), its files a moment later.
    Returns whether it existed."""
    target = Path(target)
    if not target.parent.is_dir():
        return False
    with _locked(target.parent):
        _recover(target)
        if not os.path.lexists(target):
            return False
        doomed = _trash(target)
        os.rename(target, doomed)
        fsync_dir(target.parent)
    shutil.rmtree(doomed, ignore_errors=True)
    return True
