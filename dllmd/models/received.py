"""A node's copy of a model: only the files its spans need, received in chunks and verified.

Deploy sends the signed manifest first (``offer``), then each needed file in chunks (``put``).
Chunks are appended to ``.incoming/<file>.part``, so an interrupted deploy resumes where it
stopped; a file becomes visible only after its sha256 matches the manifest, so a tampered or
truncated file can never be loaded. Before a span is loaded, the manifest's signature is checked
against the node's admin keys and every file the span reads is hashed again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import safe_open

from dllmd.net.identity import verify_signature
from dllmd.models.store import sha256_file
from dllmd.storage import atomic_write, fsync_dir

SAFE_PART = re.compile(r"^[A-Za-z0-9._-]+$")
MANIFEST, SIGNATURE, INCOMING = "manifest.json", "manifest.sig", ".incoming"


class ModelFileError(ValueError):
    """A model file or manifest that must not be used; the message says which and why."""


def safe_relative(path: str) -> str:
    """A manifest path that stays inside the model directory (no '..', no absolute paths)."""
    parts = path.split("/")
    if (not path or len(path) > 200 or path in (MANIFEST, SIGNATURE)
            or any(p in ("", ".", "..") or p.startswith(".") or not SAFE_PART.match(p) for p in parts)):
        raise ModelFileError(f"unsafe file name in manifest: {path!r}")
    return path




def span_files(manifest: Mapping, start: int, end: int, embed: bool, head: bool) -> list[str]:
    """Files holding the tensors of layers [start, end) (+ embeddings / norm and head)."""
    layers = {int(layer["index"]): layer["file"] for layer in manifest["layers"]}
    files = ["config.json", *(layers[i] for i in range(start, end))]
    if embed or (head and manifest.get("tied_embeddings")):
        files.append(manifest["embed"]["file"])
    if head:
        files.extend(manifest["head"]["files"])
    return list(dict.fromkeys(files))


class ReceivedModels:
    """``<home>/models/<name>/``: manifests and the files received for them."""

    def __init__(self, root: Path):
        self.root = root

    def _dir(self, name: str) -> Path:
        if not SAFE_PART.match(name) or name.startswith("."):
            raise ModelFileError(f"invalid model name {name!r}")
        return self.root / name

    # --- receiving ------------------------------------------------------------------------------

    def offer(self, name: str, manifest_blob: bytes, signature: bytes, trusted: Iterable[str]) -> dict:
        """Accept a signed manifest; returns what is already here so the sender can skip or resume."""
        manifest = self._check_manifest(name, manifest_blob, signature, trusted)
        directory = self._dir(name)
        old = directory / MANIFEST
        if old.exists() and old.read_bytes() != manifest_blob:
            # A different import under the same name: its files are not ours to reuse.
            shutil.rmtree(directory)
        (directory / INCOMING).mkdir(parents=True, exist_ok=True)
        atomic_write(directory / MANIFEST, manifest_blob)
        atomic_write(directory / SIGNATURE, signature.hex().encode())
        have, partial = {}, {}
        for rel, meta in manifest["files"].items():
            part = directory / INCOMING / (rel.replace("/", "__") + ".part")
            if part.exists() and part.stat().st_size == meta["bytes"]:
                self._publish(directory, rel, part, meta)  # complete but never published (a crash)
            if (directory / rel).exists() and (directory / rel).stat().st_size == meta["bytes"]:
                # Size only: hashing every file on every offer would be slow; span.load hashes, and
                # deletes a file that fails, so the next deploy sends it again.
                have[rel] = meta["sha256"]
            elif part.exists():
                partial[rel] = part.stat().st_size
        return {"have": have, "partial": partial}

    @staticmethod
    def _publish(directory: Path, rel: str, part: Path, meta: dict) -> None:
        digest = sha256_file(part)
        if digest != meta["sha256"]:
            part.unlink()
            raise ModelFileError(f"{rel} does not match its signed sha256 (got {digest[:12]}..., expected "
                                 f"{meta['sha256'][:12]}...): refused; the file was tampered with or corrupted")
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        fsync_dir(target.parent)

    def put(self, name: str, rel: str, offset: int, chunk: bytes) -> dict:
        """Append a chunk at ``offset``; when the file is complete, verify and publish it."""
        directory = self._dir(name)
        manifest = self.manifest(name)
        rel = safe_relative(rel)
        meta = manifest["files"].get(rel)
        if meta is None:
            raise ModelFileError(f"{rel} is not part of {name}'s manifest")
        part = directory / INCOMING / (rel.replace("/", "__") + ".part")
        size = part.stat().st_size if part.exists() else 0
        if offset != size:
            raise ModelFileError(f"{rel}: chunk at offset {offset} but {size} bytes are here; resume from {size}")
        if size + len(chunk) > meta["bytes"]:
            raise ModelFileError(f"{rel}: more bytes than the manifest's {meta['bytes']}")
        with open(part, "ab") as f:
            f.write(chunk)
            if size + len(chunk) == meta["bytes"]:
                f.flush()
                os.fsync(f.fileno())
        if size + len(chunk) < meta["bytes"]:
            return {"complete": False, "received": size + len(chunk)}
        self._publish(directory, rel, part, meta)
        return {"complete": True, "received": meta["bytes"]}

    # --- reading --------------------------------------------------------------------------------

    def manifest(self, name: str) -> dict:
        try:
            return json.loads((self._dir(name) / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise ModelFileError(f"model {name!r} has not been deployed to this node") from None

    def verified_span(self, name: str, start: int, end: int, embed: bool, head: bool,
                      trusted: Iterable[str]) -> tuple[dict, list[Path]]:
        """The manifest and the span's file paths, after checking the signature and every hash."""
        directory = self._dir(name)
        try:
            blob = (directory / MANIFEST).read_bytes()
            signature = bytes.fromhex((directory / SIGNATURE).read_text().strip())
        except (FileNotFoundError, ValueError):
            raise ModelFileError(f"model {name!r} has no signed manifest on this node; deploy it") from None
        manifest = self._check_manifest(name, blob, signature, trusted)
        paths = []
        for rel in span_files(manifest, start, end, embed, head):
            path = directory / safe_relative(rel)
            if not path.exists():
                raise ModelFileError(f"{rel} of {name} is missing on this node; deploy again")
            if sha256_file(path) != manifest["files"][rel]["sha256"]:
                path.unlink()  # so the next deploy sends it again
                raise ModelFileError(f"{rel} of {name} does not match its signed sha256: refused and removed; "
                                     f"deploy again")
            paths.append(path)
        return manifest, paths

    def config_path(self, name: str) -> Path:
        return self._dir(name) / "config.json"

    def remove(self, name: str) -> bool:
        directory = self._dir(name)
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        return True

    def _check_manifest(self, name: str, blob: bytes, signature: bytes, trusted: Iterable[str]) -> dict:
        try:
            manifest = json.loads(blob)
            signer = manifest["importer"]
            files = manifest["files"]
            for rel in files:
                safe_relative(rel)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFileError(f"manifest of {name!r} is malformed: {exc}") from None
        if manifest.get("name") != name:
            raise ModelFileError(f"manifest names {manifest.get('name')!r}, not {name!r}")
        if signer not in set(trusted):
            raise ModelFileError(f"manifest of {name!r} is signed by {str(signer)[:16]}..., which is not an admin "
                                 f"key of this node")
        if not verify_signature(signer, _canonical(manifest), signature):
            raise ModelFileError(f"manifest of {name!r} has an invalid signature: refused")
        return manifest


def _canonical(manifest: Mapping) -> bytes:
    """The bytes a manifest signature covers (sorted keys, no spaces), as the importer signed them."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def tensor_source(paths: Sequence[Path]):
    """A TensorSource reading requested tensors from these safetensors files (mmap, lazily)."""

    def read(names: Sequence[str]) -> dict[str, torch.Tensor]:
        wanted, out = set(names), {}
        for path in (p for p in paths if p.suffix == ".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                for key in wanted.intersection(f.keys()):
                    out[key] = f.get_tensor(key)
        return out

    return read
