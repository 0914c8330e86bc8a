"""Receiving a file in chunks: appended to a part file, checked against its sha256 when the last byte
arrives, then published with one rename.

The part file is the only state, so a receive interrupted by anything (a dropped connection, a
daemon restart) resumes from the bytes already there. The published file appears only whole and
verified: a tampered or truncated file can never be read under its real name.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dllmd.storage.atomic import fsync_dir
from dllmd.storage.digest import sha256_file
from dllmd.storage.room import DiskFull, ensure_room, free_bytes, is_disk_full


class StagingError(ValueError):
    """A chunk that cannot be accepted; the message says why and what to send instead."""


class WrongOffset(StagingError):
    """A chunk that does not continue the bytes already received (``have`` says where to resume)."""

    def __init__(self, message: str, have: int):
        super().__init__(message)
        self.have = have


class TooManyBytes(StagingError):
    """A chunk that would make the file longer than its declared size."""


class DigestMismatch(StagingError):
    """The complete file does not have its declared sha256; its bytes were deleted."""


class StagedFile:
    """One file being received: ``part`` grows chunk by chunk to ``size`` bytes, and is renamed to
    ``target`` once its sha256 is ``sha256``. ``label`` names the file in error messages; ``signed``
    says the sha256 came from a signed manifest (rather than from the sender alone)."""

    def __init__(self, part: Path, target: Path, size: int, sha256: str, label: str, signed: bool = False):
        self.part, self.target, self.size, self.sha256 = Path(part), Path(target), size, sha256
        self.label, self.signed = label, signed

    @property
    def received(self) -> int:
        """Bytes of the part file received so far (0 when none)."""
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def published(self) -> bool:
        """Whether the target holds a file of the declared size (size only: hashing is for loaders)."""
        try:
            return self.target.is_file() and self.target.stat().st_size == self.size
        except OSError:
            return False

    def resume(self) -> int:
        """Publish a part file that is complete but was never published (a crash between the last byte
        and the rename), and an empty file at once; returns the bytes received of an unpublished file."""
        if not self.published and (self.size == 0 or self.received == self.size):
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self.part.touch()
            self.publish()
        return self.size if self.published else self.received

    def append(self, offset: int, chunk: bytes) -> int:
        """Append ``chunk`` at ``offset`` (which must be the bytes already here); verify and publish when
        the file is complete. Returns the bytes received. Raises :class:`StagingError`."""
        if not chunk:
            raise StagingError(f"{self.label}: an empty chunk carries nothing; send the bytes from {offset}")
        self.part.parent.mkdir(parents=True, exist_ok=True)
        if offset == 0:  # refused before the first byte, not when the disk fills halfway through
            ensure_room(self.part.parent, self.size, self.label)
        try:
            return self._append(offset, chunk)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.discard()  # the space a part file took comes back; the sender starts again later
            raise DiskFull(self.label, self.size, free_bytes(self.part.parent), self.part.parent) from exc

    def _append(self, offset: int, chunk: bytes) -> int:
        with open(self.part, "ab") as f:
            # One writer at a time: a retried chunk racing its first attempt must not be written twice.
            fcntl.flock(f, fcntl.LOCK_EX)
            have = os.fstat(f.fileno()).st_size
            if offset != have:
                raise WrongOffset(f"{self.label}: chunk at offset {offset} but {have} bytes are here; resume from "
                                  f"{have}", have)
            if have + len(chunk) > self.size:
                raise TooManyBytes(f"{self.label}: more bytes than the {self.size} announced")
            f.write(chunk)
            received = have + len(chunk)
            if received < self.size:
                return received
            f.flush()
            os.fsync(f.fileno())
            self.publish()
        return received

    def publish(self) -> None:
        """Check the complete part file's sha256 and rename it into place (deleting it on a mismatch)."""
        digest = sha256_file(self.part)
        if digest != self.sha256:
            self.part.unlink()
            source = "signed sha256" if self.signed else "sha256"
            raise DigestMismatch(f"{self.label} does not match its {source} (got {digest[:12]}..., expected "
                                 f"{self.sha256[:12]}...): refused; the bytes were corrupted or tampered with, "
                                 f"send it again")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.part, self.target)
        fsync_dir(self.target.parent)
        if self.part.parent != self.target.parent:
            fsync_dir(self.part.parent)

    def discard(self) -> None:
        """Forget the bytes received so far."""
        try:
            self.part.unlink()
        except FileNotFoundError:
            pass
