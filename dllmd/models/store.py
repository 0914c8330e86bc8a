"""The model store: one directory per model, laid out so one layer span can be read alone.

    <root>/<name>/
        manifest.json      Manifest (below), as the canonical JSON bytes that were signed
        manifest.sig       Ed25519 signature (hex) by the importer's key
        config.json, generation_config.json, tokenizer files (with the chat template)
        embed.safetensors  model.embed_tokens.weight
        layers/00000.safetensors ...   one file per decoder layer, original tensor names
        head.safetensors   model.norm.weight (+ lm_head.weight unless the embeddings are tied)

A node receives the same files (only those of its span) and checks them with
``dllmd.models.received``; the client store is written by ``dllmctl.model_import``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dllmd.net.identity import verify_signature

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
PARTIAL_PREFIX = ".partial-"


class ModelStoreError(ValueError):
    """A model that is missing, malformed or fails verification; the message says what to do."""


@dataclass
class Manifest:
    name: str
    family: str
    dtype: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    source: str
    created: float
    importer: str
    files: dict[str, dict] = field(default_factory=dict)  # path -> {"sha256", "bytes"}
    layers: list[dict] = field(default_factory=list)  # {"index", "file", "params", "bytes"}
    embed: dict = field(default_factory=dict)  # {"file", "params", "bytes"}
    head: dict = field(default_factory=dict)  # {"files", "params", "bytes"}

    def canonical(self) -> bytes:
        """The exact bytes that are signed and stored (sorted keys, no spaces)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Manifest":
        try:
            return cls(**json.loads(blob))
        except (ValueError, TypeError) as exc:
            raise ModelStoreError(f"manifest is malformed: {exc}") from None

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    @property
    def params(self) -> int:
        return sum(layer["params"] for layer in self.layers) + self.embed.get("params", 0) + self.head.get("params", 0)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if not name or name.startswith(".") or "/" in name or "\\" in name or len(name) > 128:
            raise ModelStoreError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-'")
        return self.root / name

    def list(self) -> list[Manifest]:
        if not self.root.exists():
            return []
        out = []
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(".") or not (directory / MANIFEST).exists():
                continue  # partial imports and stray files are not models
            try:
                out.append(self.get(directory.name))
            except ModelStoreError:
                continue
        return out

    def get(self, name: str) -> Manifest:
        try:
            return Manifest.from_bytes((self.path(name) / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise ModelStoreError(f"no model {name!r} in {self.root}; import one with 'dllmctl model import' "
                                  f"or 'dllmctl model pull'") from None

    def remove(self, name: str) -> None:
        directory = self.path(name)
        if not (directory / MANIFEST).exists():
            raise ModelStoreError(f"no model {name!r} in {self.root}")
        # Rename first so a crash mid-delete never leaves something that looks like a model.
        doomed = self.root / f"{PARTIAL_PREFIX}rm-{name}"
        directory.rename(doomed)
        shutil.rmtree(doomed)

    def verify(self, name: str, trusted_keys: set[str] | None = None) -> Manifest:
        """Signature valid (by a trusted key if given), every file present with its sha256, nothing extra."""
        directory = self.path(name)
        blob = (directory / MANIFEST).read_bytes() if (directory / MANIFEST).exists() else b""
        manifest = self.get(name)
        try:
            signature = bytes.fromhex((directory / SIGNATURE).read_text().strip())
        except (FileNotFoundError, ValueError):
            raise ModelStoreError(f"{name}: manifest.sig is missing or not hex") from None
        if blob != manifest.canonical() or not verify_signature(manifest.importer, blob, signature):
            raise ModelStoreError(f"{name}: the manifest's signature does not verify; the model was altered")
        if trusted_keys is not None and manifest.importer not in trusted_keys:
            raise ModelStoreError(f"{name}: signed by {manifest.importer[:16]}..., which is not trusted here")
        present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
        for rel in sorted(set(manifest.files) - present):
            raise ModelStoreError(f"{name}: {rel} is missing")
        for rel in sorted(present - set(manifest.files)):
            raise ModelStoreError(f"{name}: {rel} is not in the manifest")
        for rel, meta in sorted(manifest.files.items()):
            if sha256_file(directory / rel) != meta["sha256"]:
                raise ModelStoreError(f"{name}: {rel} does not match its sha256; re-import the model")
        return manifest

    def clean_partials(self) -> None:
        if self.root.exists():
            for directory in self.root.glob(f"{PARTIAL_PREFIX}*"):
                shutil.rmtree(directory, ignore_errors=True)
