"""A node's copy of a model: only the files its spans need, received in chunks and verified.

Deploy sends the signed manifest first (``offer``), then each needed file in chunks (``put``).
Chunks are appended to ``.incoming/<file>.part`` (:class:`~dllmd.storage.StagedFile`), so an
interrupted deploy resumes where it stopped; a file becomes visible only after its sha256 matches the
manifest, so a tampered or truncated file can never be loaded. Before a span is loaded, the
manifest's signature is checked against the node's admin keys and every file the span reads is
hashed again.

The layout is the model store's (:mod:`dllmd.models.store`), holding only some of the files; its
:class:`~dllmd.models.store.Manifest` is the one parser and checker of the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dllmd.models.store import (MANIFEST, SIGNATURE, FileEntry, Manifest, ModelNotFound, ModelStore, ModelStoreError,
                                check_relative_path, verify_manifest)
from dllmd.net.messages.models import Offer
from dllmd.net.messages.transfer import PutReply
from dllmd.storage import StagedFile, StagingError, atomic_write, remove_directory, sha256_file
from dllmd.storage.signed import read_signature

INCOMING = ".incoming"


class ModelFileError(ModelStoreError):
    """A model file or manifest that must not be used; the message says which and why."""


class ReceivedModels:
    """``<home>/models/<name>/``: manifests and the files received for them."""

    def __init__(self, root: Path):
        self.root = root
        self.store = ModelStore(root)

    def _staged(self, name: str, rel: str, entry: FileEntry) -> StagedFile:
        directory = self.store.path(name)
        return StagedFile(directory / INCOMING / (rel.replace("/", "__") + ".part"), directory / rel, entry.bytes,
                          entry.sha256, rel, signed=True)

    # --- receiving ------------------------------------------------------------------------------

    def offer(self, name: str, manifest_blob: bytes, signature: bytes, trusted: Iterable[str]) -> Offer:
        """Accept a signed manifest; returns what is already here so the sender can skip or resume."""
        manifest = verify_manifest(name, manifest_blob, signature, trusted)
        directory = self.store.path(name)
        old = directory / MANIFEST
        if old.exists() and old.read_bytes() != manifest_blob:
            # A different import under the same name: its files are not ours to reuse.
            remove_directory(directory)
        (directory / INCOMING).mkdir(parents=True, exist_ok=True)
        atomic_write(directory / MANIFEST, manifest_blob)
        atomic_write(directory / SIGNATURE, signature.hex().encode())
        have, partial = {}, {}
        for rel, entry in manifest.files.items():
            staged = self._staged(name, rel, entry)
            try:
                received = staged.resume()  # a complete part never published (a crash) is published now
            except StagingError:
                received = 0  # it failed its hash and is gone: send it again
            if staged.published:
                # Size only: hashing every file on every offer would be slow; span.load hashes, and
                # deletes a file that fails, so the next deploy sends it again.
                have[rel] = entry.sha256
            elif received:
                partial[rel] = received
        return Offer(have=have, partial=partial)

    def put(self, name: str, rel: str, offset: int, chunk: bytes) -> PutReply:
        """Append a chunk at ``offset``; when the file is complete, verify and publish it."""
        manifest = self.manifest(name)
        entry = manifest.files.get(check_relative_path(rel))
        if entry is None:
            raise ModelFileError(f"{rel} is not part of {name}'s manifest")
        try:
            received = self._staged(name, rel, entry).append(offset, chunk)
        except StagingError as exc:
            raise ModelFileError(str(exc)) from None
        return PutReply(received=received, complete=received == entry.bytes)

    # --- reading --------------------------------------------------------------------------------

    def manifest(self, name: str) -> Manifest:
        """The manifest offered for ``name`` (parsed; its signature was checked when it was offered)."""
        if not (self.store.path(name) / MANIFEST).is_file():
            raise ModelNotFound(f"model {name!r} has not been deployed to this node; deploy it")
        return self.store.get(name)

    def verified_span(self, name: str, start: int, end: int, embed: bool, head: bool,
                      trusted: Iterable[str]) -> tuple[Manifest, list[Path]]:
        """The manifest and the span's file paths, after checking the signature and every hash."""
        directory = self.store.path(name)
        try:
            blob = (directory / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise ModelNotFound(f"model {name!r} has not been deployed to this node; deploy it") from None
        try:
            signature = read_signature(directory / SIGNATURE)
        except (OSError, ValueError):
            raise ModelFileError(f"model {name!r} has no signed manifest on this node; deploy it") from None
        manifest = verify_manifest(name, blob, signature, trusted)
        paths = []
        for rel in manifest.span_files(start, end, embed, head):
            path = directory / rel
            if path.is_symlink() or not path.is_file():
                raise ModelFileError(f"{rel} of {name} is missing on this node; deploy again")
            if sha256_file(path) != manifest.files[rel].sha256:
                path.unlink()  # so the next deploy sends it again
                raise ModelFileError(f"{rel} of {name} does not match its signed sha256: refused and removed; "
                                     f"deploy again")
            paths.append(path)
        return manifest, paths

    def tensor_source(self, name: str, paths: Iterable[Path]):
        """A ``TensorSource`` reading a span's tensors from its verified files (``paths``) only."""
        directory = self.store.path(name)
        return self.store.tensor_source(name, {path.relative_to(directory).as_posix() for path in paths})

    def config_path(self, name: str) -> Path:
        return self.store.path(name) / "config.json"

    def remove(self, name: str) -> bool:
        """Delete every file of ``name`` on this node; returns whether there were any."""
        return remove_directory(self.store.path(name))
