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
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dllmd.models.store import MANIFEST, SIGNATURE, FileEntry, ModelStoreError
from dllmd.net.identity import Identity
from dllmd.storage import recover_directories, replace_directory, sha256_file
from dllmd.storage.signed import json_object, read_signature, signed_by, write_signed

FILES = ("model.safetensors", "optimizer.safetensors", "config.json", "state.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing or fails verification."""


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


class Checkpoints:
    def __init__(self, root: Path, identity: Identity):
        self.root = root
        self.identity = identity
        recover_directories(root)  # a checkpoint swap a crash interrupted

    def write(self, step: int, tensors: dict[str, torch.Tensor], config_json: bytes, state: dict) -> dict:
        """Write the checkpoint after ``step`` completed steps (replacing one of the same step atomically);
        returns its description."""
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / f".partial-{_dirname(step)}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        model = {k.removeprefix("model."): v.contiguous() for k, v in tensors.items() if k.startswith("model.")}
        optim = {k.removeprefix("optim."): v.contiguous() for k, v in tensors.items() if k.startswith("optim.")}
        save_file(model, str(work / "model.safetensors"), metadata={"format": "pt"})
        save_file(optim, str(work / "optimizer.safetensors"))
        (work / "config.json").write_bytes(config_json)
        (work / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        manifest = CheckpointManifest(step=step, signer=self.identity.public_key, files={
            name: FileEntry(sha256_file(work / name), (work / name).stat().st_size) for name in FILES})
        write_signed(work / MANIFEST, work / SIGNATURE, manifest.to_dict(), self.identity)
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
            manifest = verify_checkpoint_manifest(blob, signature, self.identity.public_key)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        return manifest, blob, signature

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
        tensors.update({f"optim.{k}": v for k, v in load_file(str(path / "optimizer.safetensors")).items()})
        return tensors, json.loads((path / "state.json").read_text())

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
