"""Checkpoints of a job, kept by its coordinator: ``<home>/jobs/<job>/checkpoints/step-000123/``.

    model.safetensors      the weights (fp32, transformers' parameter names; a tied head is omitted)
    optimizer.safetensors  AdamW's exp_avg / exp_avg_sq per parameter
    config.json            the model's config, so the directory (plus a tokenizer) loads in transformers
    state.json             step, AdamW step count, data cursor (seed, epoch), job spec, RNG state, last metrics
    manifest.json          sha256 and size of every file above, signed by the node: manifest.sig
                           (canonical JSON and a hex signature, as model manifests: dllmd.storage.signed)

A checkpoint is written into ``.partial-step-N``, fsynced, then swapped into place in one step
(:func:`dllmd.storage.replace_directory`, also when a checkpoint of that step exists already): it
either exists whole or not at all. Reading checks the signature and every hash.

A pipeline job's checkpoint has one part per stage, each in this same layout and signed by the node
that wrote it; :func:`copy_checkpoint` copies one from another node (or to the export client) file by
file, each checked against the signed manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable

import torch
from safetensors.torch import load_file

from dllmd.models.store import MANIFEST, SIGNATURE, FileEntry, ModelStoreError
from dllmd.net.messages.training import CheckpointChunk
from dllmd.net.identity import Identity
from dllmd.storage import ensure_room, is_disk_full, recover_directories, replace_directory, save_tensors, sha256_file
from dllmd.storage.room import tensor_bytes
from dllmd.storage.signed import json_object, read_signature, signed_by, write_signed

FILES = ("model.safetensors", "optimizer.safetensors", "config.json", "state.json")
READ_CHUNK = 4 * 1024 * 1024  # bytes of a checkpoint file per message (exports, copies)


class CheckpointError(ValueError):
    """A checkpoint that is missing or fails verification."""


class NoRoomForCheckpoint(CheckpointError):
    """The disk cannot hold the next checkpoint; the earlier ones are intact (the job can resume from the
    latest once there is room)."""


@dataclass(frozen=True)
class CheckpointManifest:
    """What a checkpoint holds: every file's sha256 and size, and the node key that signed it."""

    step: int
    files: dict[str, FileEntry]
    signer: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "CheckpointManifest":
        """Parse and check a checkpoint manifest; raises :class:`CheckpointError` naming what is wrong."""
        data = json_object(blob, "checkpoint manifest", CheckpointError)
        try:
            files, step, signer = data["files"], data["step"], data["signer"]
            if not isinstance(files, dict) or set(files) != set(FILES):
                raise CheckpointError(f"checkpoint manifest must list exactly {', '.join(FILES)}")
            if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(signer, str):
                raise CheckpointError("checkpoint manifest has a malformed step or signer")
            return cls(step=step, files={name: FileEntry.from_dict(entry) for name, entry in files.items()},
                       signer=signer)
        except (KeyError, TypeError, ModelStoreError) as exc:
            raise CheckpointError(f"checkpoint manifest is malformed: {exc}") from None


def verify_checkpoint_manifest(blob: bytes, signature: bytes, signer: str) -> CheckpointManifest:
    """The checkpoint manifest in ``blob``, after checking that ``signer`` signed exactly these (canonical)
    bytes and that the manifest names ``signer`` as its signer. What a coordinator checks before reading
    its checkpoint, and what an export checks against the coordinator's pinned key."""
    manifest = CheckpointManifest.from_bytes(blob)
    if manifest.signer != signer:
        raise CheckpointError(f"the checkpoint was signed by another node ({manifest.signer[:16]}...)")
    if not signed_by(blob, signature, signer, manifest.to_dict()):
        raise CheckpointError("the checkpoint has an invalid manifest signature")
    return manifest


def _dirname(step: int) -> str:
    return f"step-{step:06d}"


def trusted_checkpoint_manifest(blob: bytes, signature: bytes, trusted: Collection[str]) -> CheckpointManifest:
    """The manifest in ``blob`` once it checks out as signed by the key it names, which must be one of
    ``trusted`` (a pipeline job's parts are signed by the stages that wrote them)."""
    signer = CheckpointManifest.from_bytes(blob).signer
    if signer not in trusted:
        raise CheckpointError(f"the checkpoint was signed by a node outside the job ({signer[:16]}...)")
    return verify_checkpoint_manifest(blob, signature, signer)


class Checkpoints:
    def __init__(self, root: Path, identity: Identity, trusted: Collection[str] | None = None):
        """Checkpoints under ``root``, written with ``identity``'s key; those read must be signed by a
        key of ``trusted`` (default: ``identity``'s own)."""
        self.root = root
        self.identity = identity
        self.trusted = set(trusted) if trusted is not None else {identity.public_key}
        recover_directories(root)  # a checkpoint swap a crash interrupted

    def write(self, step: int, tensors: dict[str, torch.Tensor], config_json: bytes, state: dict) -> dict:
        """Write the checkpoint after ``step`` completed steps (replacing one of the same step atomically);
        returns its description."""
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".partial-{_dirname(step)}"
        shutil.rmtree(work, ignore_errors=True)
        model = {k.removeprefix("model."): v.contiguous() for k, v in tensors.items() if k.startswith("model.")}
        optim = {k.removeprefix("optim."): v.contiguous() for k, v in tensors.items() if k.startswith("optim.")}
        try:
            # All of it must fit: a checkpoint is useful whole or not at all.
            ensure_room(self.root, tensor_bytes(model) + tensor_bytes(optim), f"the checkpoint at step {step}")
            work.mkdir()
            save_tensors(model, work / "model.safetensors", f"the checkpoint at step {step}", {"format": "pt"})
            save_tensors(optim, work / "optimizer.safetensors", f"the checkpoint at step {step}")
            (work / "config.json").write_bytes(config_json)
            (work / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
            manifest = CheckpointManifest(step=step, signer=self.identity.public_key, files={
                name: FileEntry(sha256_file(work / name), (work / name).stat().st_size) for name in FILES})
            write_signed(work / MANIFEST, work / SIGNATURE, manifest.to_dict(), self.identity)
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)  # its space comes back; the earlier checkpoints are untouched
            if not is_disk_full(exc):
                raise
            kept = self.latest()
            raise NoRoomForCheckpoint(f"{exc.strerror}; the checkpoint "
                                  f"{f'at step {kept} is intact' if kept is not None else 'was not written'}: "
                                  f"free some space") from exc
        replace_directory(work, self.root / _dirname(step))
        return self.describe(step)

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.root.glob("step-*") if p.name.split("-")[1].isdigit())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path(self, step: int) -> Path:
        path = self.root / _dirname(step)
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint at step {step}; steps with one: {self.steps() or 'none'}")
        return path

    def signed_manifest(self, step: int) -> tuple[CheckpointManifest, bytes, bytes]:
        """The verified manifest of a checkpoint, with its exact signed bytes and signature (what an
        export checks again on the client)."""
        path = self.path(step)
        blob = (path / MANIFEST).read_bytes()
        try:
            signature = read_signature(path / SIGNATURE)
        except (OSError, ValueError):
            raise CheckpointError(f"checkpoint {path} has no readable signature") from None
        try:
            manifest = trusted_checkpoint_manifest(blob, signature, self.trusted)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        return manifest, blob, signature

    def read_chunk(self, step: int, file: str, offset: int) -> tuple[CheckpointChunk, bytes]:
        """A chunk of one file of checkpoint ``step``, with the manifest's signed bytes and signature to
        check it against (what an export or a copy on another node receives)."""
        manifest, blob, signature = self.signed_manifest(step)
        if file not in manifest.files:
            raise CheckpointError(f"a checkpoint has no file {file!r}; files: {', '.join(manifest.files)}")
        with open(self.path(step) / file, "rb") as f:
            f.seek(offset)
            chunk = f.read(READ_CHUNK)
        return CheckpointChunk(manifest=blob, signature=signature, size=manifest.files[file].bytes), chunk

    def manifest(self, step: int) -> CheckpointManifest:
        return self.signed_manifest(step)[0]

    def describe(self, step: int) -> dict:
        path = self.path(step)
        state = json.loads((path / "state.json").read_text())
        return {"step": step, "path": str(path), "bytes": sum(f.stat().st_size for f in path.iterdir()),
                "created": path.stat().st_mtime, "loss": state.get("metrics", {}).get("loss")}

    def read(self, step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The verified tensors (``model.*``, ``optim.*``) and state of a checkpoint."""
        path = self.path(step)
        manifest = self.manifest(step)
        for name, entry in manifest.files.items():
            if not (path / name).is_file() or (path / name).stat().st_size != entry.bytes \
                    or sha256_file(path / name) != entry.sha256:
                raise CheckpointError(f"{path / name} does not match its signed sha256: the checkpoint is corrupt")
        tensors = {f"model.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
        # Loaded whole: the caller copies them into its own tensors, which it holds anyway.
        tensors.update({f"optim.{k}": v for k, v in load_file(str(path / "optimizer.safetensors")).items()})
        return tensors, json.loads((path / "state.json").read_text())

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    async def copy_from(self, step: int, read: "ReadChunk") -> dict:
        """Copy checkpoint ``step`` from another node (``read``: its chunks), verified against its
        signed manifest (by a trusted key) and placed atomically; a copy already here is kept."""
        if step in self.steps():
            self.manifest(step)  # a copy here must still check out
            return self.describe(step)
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".partial-{_dirname(step)}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        blob = signature = None
        for name in FILES:
            blob, signature = await copy_checkpoint_file(read, name, work / name, step, self.trusted, blob)
        (work / MANIFEST).write_bytes(blob)
        (work / SIGNATURE).write_text(signature.hex())
        await asyncio.to_thread(replace_directory, work, self.root / _dirname(step))
        self.manifest(step)
        return self.describe(step)


ReadChunk = Callable[[str, int], Awaitable[tuple[CheckpointChunk, bytes]]]
"""Reads ``(file, offset)`` of a checkpoint elsewhere: the reply (its ``manifest``, ``signature`` and
the file's ``size``) and the chunk's bytes (empty at the end)."""


async def copy_checkpoint_file(read: ReadChunk, name: str, path: Path, step: int, trusted: Collection[str],
                               expected_blob: bytes | None = None) -> tuple[bytes, bytes]:
    """Download checkpoint file ``name`` into ``path``, its sha256 checked against the manifest that
    comes with every chunk, whose signature (by a ``trusted`` key) is checked first; returns that
    manifest's signed bytes and signature. Another manifest than ``expected_blob`` (or than the first
    chunk's) means the checkpoint changed during the copy: refused."""
    digest, offset, blob, manifest, signature = hashlib.sha256(), 0, expected_blob, None, b""
    with open(path, "wb") as f:
        while True:
            reply, chunk = await read(name, offset)
            if blob is not None and reply.manifest != blob:
                raise CheckpointError(f"checkpoint {step} changed during the copy; copy it again")
            if manifest is None:
                manifest = trusted_checkpoint_manifest(reply.manifest, reply.signature, trusted)
                blob, signature = reply.manifest, reply.signature
                if manifest.step != step or name not in manifest.files:
                    raise CheckpointError(f"the manifest sent for checkpoint {step} is of another checkpoint")
            f.write(chunk)
            digest.update(chunk)
            offset += len(chunk)
            if not chunk or offset >= reply.size:
                break
    entry = manifest.files[name]
    if offset != entry.bytes or digest.hexdigest() != entry.sha256:
        raise CheckpointError(f"{name} of checkpoint {step} arrived corrupted (sha256 mismatch)")
    return blob, signature
