"""The model store: one directory per model, laid out so one layer span can be read alone.

    <root>/<name>/
        manifest.json      Manifest (below), exactly the canonical JSON bytes that were signed
        manifest.sig       Ed25519 signature (hex) over manifest.json by the importer's key
        config.json, generation_config.json (if any), tokenizer files with the chat template
        embed.safetensors  the token embeddings
        layers/00000.safetensors ...   one file per decoder layer, original tensor names
        head.safetensors   the final norm (+ lm_head.weight unless the embeddings are tied; a tied
                           head reads embed.safetensors instead of keeping a second copy)

The client writes it (``dllmctl.model_import``, through :meth:`ModelStore.staging` and
:meth:`ModelStore.publish`); a daemon keeps the same files (only those of its spans) and checks them
the same way before it loads a span. Directories whose names start with ``.`` are never models: they are
imports in progress, or leftovers of interrupted ones.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from dllmd.models.dtypes import WEIGHT_DTYPES
from dllmd.models.quantization import Quantization, QuantizationError, parse_quantization
from dllmd.storage import recover_directories, remove_directory, replace_directory, sha256_file
from dllmd.storage.signed import Signer, canonical_json, json_object, read_signature, signed_by, write_signed

if TYPE_CHECKING:
    import torch

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
# A model's tokenizer, as transformers saves it (what the client keeps, and sends nodes that tokenize data).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
PARTIAL_PREFIX = ".partial-"
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")
STALE_PARTIAL_AGE_S = 60  # a younger partial directory may belong to an import that is just starting


class ModelStoreError(ValueError):
    """A model that is missing, malformed or fails verification; the message says what to do."""


class ModelNotFound(ModelStoreError):
    """No model of that name in the store."""


class ModelVerificationError(ModelStoreError):
    """A signature, a signer or a file hash does not check out: the model must not be loaded."""


def check_model_name(name: str) -> str:
    """``name`` if it is a safe directory name (letters, digits, '.', '_', '-'; not starting with '.')."""
    if not isinstance(name, str) or not SAFE_NAME.match(name) or name.startswith("."):
        raise ModelStoreError(f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                              f"not starting with '.'")
    return name


def check_relative_path(path: str) -> str:
    """``path`` if it names a model file inside the model directory: safe components, none starting with
    '.' (no '..', no staging names), not absolute, and not the manifest or its signature."""
    if (not isinstance(path, str) or len(path) > 256 or path in (MANIFEST, SIGNATURE)
            or any(not SAFE_NAME.match(part) or part.startswith(".") for part in path.split("/"))):
        raise ModelStoreError(f"unsafe file name in manifest: {path!r}")
    return path


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, data: Mapping) -> "FileEntry":
        """Parse ``{"sha256": hex, "bytes": n}``; raises :class:`ModelStoreError` (or KeyError / TypeError)."""
        return cls(_sha256_hex(data["sha256"]), _count(data["bytes"]))


@dataclass(frozen=True)
class LayerEntry:
    index: int
    file: str
    params: int
    bytes: int


@dataclass(frozen=True)
class EmbedEntry:
    file: str
    params: int
    bytes: int


@dataclass(frozen=True)
class HeadEntry:
    files: tuple[str, ...]
    params: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What a stored model is, which file holds what, and every file's sha256; signed by its importer."""

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
    files: dict[str, FileEntry]
    layers: tuple[LayerEntry, ...]
    embed: EmbedEntry
    head: HeadEntry
    # Decoder-layer projections stored quantized (dllmd.models.quantized); None: full precision in
    # ``dtype``. Left out of the signed encoding when None, so manifests from before it still verify.
    quantization: Quantization | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.quantization is None:
            del data["quantization"]
        return data

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed and stored: sorted keys, no spaces, ASCII."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping) -> "Manifest":
        """Parse and check a manifest; any malformed field raises :class:`ModelStoreError` naming it."""
        try:
            manifest = cls(
                name=check_model_name(_typed(data["name"], str)), family=_typed(data["family"], str),
                dtype=_dtype(data["dtype"]), num_layers=_count(data["num_layers"]),
                hidden_size=_count(data["hidden_size"]), vocab_size=_count(data["vocab_size"]),
                tied_embeddings=_typed(data["tied_embeddings"], bool), source=_typed(data["source"], str),
                created=float(_typed(data["created"], (int, float))), importer=_typed(data["importer"], str),
                files={check_relative_path(rel): FileEntry.from_dict(meta)
                       for rel, meta in _typed(data["files"], dict).items()},
                layers=tuple(LayerEntry(_count(e["index"]), _typed(e["file"], str), _count(e["params"]),
                                        _count(e["bytes"])) for e in _typed(data["layers"], (list, tuple))),
                embed=EmbedEntry(_typed(data["embed"]["file"], str), _count(data["embed"]["params"]),
                                 _count(data["embed"]["bytes"])),
                head=HeadEntry(tuple(_typed(f, str) for f in _typed(data["head"]["files"], (list, tuple))),
                               _count(data["head"]["params"]), _count(data["head"]["bytes"])),
                quantization=parse_quantization(data.get("quantization")))
        except KeyError as exc:
            raise ModelStoreError(f"manifest is malformed: field {exc} is missing") from None
        except (TypeError, AttributeError, ValueError) as exc:
            raise ModelStoreError(f"manifest is malformed: {exc}") from None
        manifest._check_consistency()
        return manifest

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Manifest":
        """Parse and check a manifest's bytes (any JSON encoding: whether it is the signed one is
        :func:`verify_manifest`'s question)."""
        return cls.from_dict(json_object(blob, "manifest", ModelStoreError))

    def _check_consistency(self) -> None:
        if [layer.index for layer in self.layers] != list(range(self.num_layers)):
            raise ModelStoreError(f"manifest is malformed: layers must be listed as 0..{self.num_layers - 1}")
        for rel in [layer.file for layer in self.layers] + [self.embed.file, *self.head.files]:
            if rel not in self.files:
                raise ModelStoreError(f"manifest is malformed: {rel!r} is referenced but not listed in files")

    @property
    def total_bytes(self) -> int:
        """Bytes of every file the model consists of (manifest and signature aside)."""
        return sum(entry.bytes for entry in self.files.values())

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers) + self.embed.params + self.head.params

    def check_span(self, start: int, end: int, embed: bool, head: bool) -> None:
        """Raise :class:`ModelStoreError` unless layers ``[start, end)`` are inside the model, embeddings
        only come with a span starting at 0 and the head only with one ending at the last layer."""
        if not 0 <= start <= end <= self.num_layers:
            raise ModelStoreError(f"layer span [{start}, {end}) is outside {self.name}'s {self.num_layers} layers")
        if embed and start != 0:
            raise ModelStoreError(f"only a span starting at layer 0 can hold the embeddings (got start={start})")
        if head and end != self.num_layers:
            raise ModelStoreError(f"only a span ending at layer {self.num_layers} can hold the head (got end={end})")

    def span_files(self, start: int, end: int, embed: bool, head: bool) -> list[str]:
        """Files a node running layers ``[start, end)`` (+ embeddings / norm and head) needs, config first."""
        self.check_span(start, end, embed, head)
        files = ["config.json", *(self.layers[i].file for i in range(start, end))]
        if embed or (head and self.tied_embeddings):
            files.append(self.embed.file)
        if head:
            files.extend(self.head.files)
        return list(dict.fromkeys(files))

    def files_for_tensors(self, names: Iterable[str]) -> list[str]:
        """The files that may hold these tensors: a layer's own file, else the embedding and head files."""
        files = []
        for name in names:
            match = LAYER_TENSOR.match(name)
            if match and int(match.group(1)) < self.num_layers:
                files.append(self.layers[int(match.group(1))].file)
            else:
                files.extend([self.embed.file, *self.head.files])
        return list(dict.fromkeys(files))


def _typed(value, kind):
    # bool is an int in Python; a count must not accept True, and a flag must not accept 1.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ModelStoreError(f"{value!r} is not a {getattr(kind, '__name__', kind)}")
    return value


def _count(value) -> int:
    if _typed(value, int) < 0:
        raise ModelStoreError(f"{value!r} is negative")
    return value


def _dtype(value) -> str:
    if value not in WEIGHT_DTYPES:
        raise ModelStoreError(f"dtype {value!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    return value


def _sha256_hex(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ModelStoreError(f"{value!r} is not a sha256 hex digest")
    return value


def verify_manifest(name: str, blob: bytes, signature: bytes, trusted_keys: Iterable[str] | None) -> Manifest:
    """The manifest of model ``name`` in ``blob``, after checking that ``blob`` is its canonical encoding,
    signed (``signature``) by its importer, and (if ``trusted_keys`` is given) that the importer is one of
    them. Raises :class:`ModelStoreError` for a malformed manifest, :class:`ModelVerificationError` for
    one that does not verify. Used by the store and by a node's received copy alike."""
    try:
        manifest = Manifest.from_bytes(blob)
    except ModelStoreError as exc:
        raise ModelStoreError(f"{name}: {exc}") from None
    if manifest.name != name:
        raise ModelStoreError(f"{name}: its manifest names {manifest.name!r}; was it renamed?")
    if not signed_by(blob, signature, manifest.importer, manifest.to_dict()):
        raise ModelVerificationError(f"{name}: the manifest's signature does not verify (or it is not in its "
                                     f"canonical form); the model was altered after import: re-import it")
    if trusted_keys is not None and manifest.importer not in set(trusted_keys):
        raise ModelVerificationError(f"{name}: signed by {manifest.importer[:16]}..., which is not a trusted "
                                     f"key here; authorize that key or import the model yourself")
    return manifest


class ModelStore:
    """``<root>/<name>/`` directories of imported models; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        """The directory of model ``name`` (validated: a name can never leave the store)."""
        return self.root / check_model_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / MANIFEST).is_file()

    def list(self) -> list[Manifest]:
        """Every model whose manifest parses, by name; partial imports and stray files are skipped."""
        if not self.root.is_dir():
            return []
        recover_directories(self.root)
        found = []
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(".") or not SAFE_NAME.match(directory.name):
                continue
            try:
                found.append(self.get(directory.name))
            except ModelStoreError:
                continue
        return found

    def get(self, name: str) -> Manifest:
        """The manifest of ``name`` as stored (parsed and checked for shape; not hashed: see :meth:`verify`)."""
        try:
            manifest = Manifest.from_bytes((self.path(name) / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise ModelNotFound(f"no model {name!r} in {self.root}; import one with 'dllmctl model import' "
                                f"or 'dllmctl model pull'") from None
        except ModelStoreError as exc:
            raise ModelStoreError(f"{name}: {exc}; remove it with 'dllmctl model rm {name}' and import it "
                                  f"again") from None
        if manifest.name != name:
            raise ModelStoreError(f"{name}: its manifest names {manifest.name!r}; was the directory renamed?")
        return manifest

    def remove(self, name: str) -> None:
        """Delete model ``name``; it disappears at once (a rename), its files a moment later."""
        if not self.exists(name):
            raise ModelNotFound(f"no model {name!r} in {self.root}")
        # A crash during the delete leaves a dot-directory, never a half model under the real name.
        remove_directory(self.path(name))

    def verify(self, name: str, trusted_keys: Iterable[str] | None = None) -> Manifest:
        """Check the whole model: signature (by one of ``trusted_keys`` if given), every file's sha256,
        no file missing or extra. Returns the manifest; raises :class:`ModelVerificationError`."""
        manifest = self._verified_manifest(name, trusted_keys)
        directory = self.path(name)
        present = set()
        for path in directory.rglob("*"):
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink():
                raise ModelVerificationError(f"{name}: {rel} is a symbolic link; model files must be plain files")
            if path.is_file() and rel not in (MANIFEST, SIGNATURE):
                present.add(rel)
        for rel in sorted(set(manifest.files) - present):
            raise ModelVerificationError(f"{name}: {rel} is missing; re-import the model")
        for rel in sorted(present - set(manifest.files)):
            raise ModelVerificationError(f"{name}: {rel} is not in the signed manifest; remove it or re-import")
        self._check_hashes(name, manifest, sorted(manifest.files))
        return manifest

    def verify_span(self, name: str, start: int, end: int, embed: bool, head: bool,
                    trusted_keys: Iterable[str] | None = None) -> Manifest:
        """Like :meth:`verify`, for only the files one span reads (what a node holding a span checks)."""
        manifest = self._verified_manifest(name, trusted_keys)
        self._check_hashes(name, manifest, manifest.span_files(start, end, embed, head))
        return manifest

    def read_tensors(self, name: str, tensor_names: Sequence[str],
                     files: Collection[str] | None = None) -> dict[str, "torch.Tensor"]:
        """The named tensors of model ``name``, read from the files the manifest assigns them (mmapped).

        Only those files are opened (and of them only ``files`` if given: the span files a node holds),
        so a span's tensors are read without touching the rest. A name that none of those files holds
        raises :class:`ModelStoreError`. Call :meth:`verify` or :meth:`verify_span` first where the files
        may not be trusted.
        """
        manifest = self.get(name)
        wanted, found = set(tensor_names), {}
        for rel in manifest.files_for_tensors(tensor_names):
            if files is not None and rel not in files:
                continue
            path = self.path(name) / rel
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    for key in wanted.intersection(keys) - found.keys():
                        found[key] = f.get_tensor(key)
                    if manifest.quantization is not None:
                        found.update(_quantized_weights(manifest.quantization, f, keys, wanted - found.keys()))
            except FileNotFoundError:
                raise ModelStoreError(f"{name}: {rel} is missing; re-import the model") from None
            except (SafetensorError, OSError) as exc:
                raise ModelStoreError(f"{name}: {rel} cannot be read ({exc}); run verify or re-import") from None
            except QuantizationError as exc:
                raise ModelStoreError(f"{name}: {rel}: {exc}") from None
        missing = sorted(wanted - found.keys())
        if missing:
            raise ModelStoreError(f"{name} has no tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                           if len(missing) > 1 else ""))
        return found

    def tensor_source(self, name: str, files: Collection[str] | None = None):
        """A ``TensorSource`` for :class:`dllmd.models.span.LayerSpan`: names -> tensors of this model
        (read from ``files`` only, if given)."""
        return lambda names: self.read_tensors(name, names, files)

    # --- writing: imports are built aside and published with one rename --------------------------

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A private directory to build model ``name`` in; it is removed unless :meth:`publish` moved it.

        The directory is locked (flock) while in use, so a concurrent import's cleanup leaves it alone.
        """
        check_model_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale_partials()
        work = self.root / f"{PARTIAL_PREFIX}{name}-{secrets.token_hex(4)}"
        work.mkdir()
        lock = os.open(work, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.close(lock)

    def publish(self, work: Path, manifest: Manifest, signer: Signer, replace: bool = False) -> Manifest:
        """Write the manifest and its signature by ``signer`` into ``work``, make every file durable, and
        move it into place (replacing a model of the same name atomically, if ``replace``)."""
        target = self.path(manifest.name)
        if target.exists() and not replace:
            raise ModelStoreError(f"a model named {manifest.name!r} is already in the store; "
                                  f"use --force to replace it or choose another --name")
        write_signed(work / MANIFEST, work / SIGNATURE, manifest.to_dict(), signer)
        try:
            replace_directory(work, target)
        except OSError as exc:
            raise ModelStoreError(f"cannot move the import into place at {target}: {exc}") from None
        return manifest

    def clean_stale_partials(self) -> list[str]:
        """Remove dot-directories left by interrupted imports or deletes; returns their names."""
        removed = []
        if not self.root.is_dir():
            return removed
        recover_directories(self.root)  # interrupted replacements and removals are not partial imports
        for directory in sorted(self.root.glob(f"{PARTIAL_PREFIX}*")):
            if not directory.is_dir() or directory.is_symlink():
                continue
            if time.time() - directory.stat().st_mtime < STALE_PARTIAL_AGE_S:
                continue
            fd = os.open(directory, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an import in progress holds it
            finally:
                os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
        return removed

    # --- checks ----------------------------------------------------------------------------------

    def _verified_manifest(self, name: str, trusted_keys: Iterable[str] | None) -> Manifest:
        directory = self.path(name)
        self.get(name)  # the store's own messages for a missing or malformed manifest
        try:
            signature = read_signature(directory / SIGNATURE)
        except (OSError, ValueError):
            raise ModelVerificationError(f"{name}: manifest.sig is missing or not hex; re-import the model") from None
        return verify_manifest(name, (directory / MANIFEST).read_bytes(), signature, trusted_keys)

    def _check_hashes(self, name: str, manifest: Manifest, files: Iterable[str]) -> None:
        directory = self.path(name)
        for rel in files:
            path = directory / rel
            if path.is_symlink() or not path.is_file():
                raise ModelVerificationError(f"{name}: {rel} is missing; re-import the model")
            entry = manifest.files[rel]
            if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
                raise ModelVerificationError(f"{name}: {rel} does not match its signed sha256 (corrupted or "
                                             f"tampered with); re-import the model")


def _quantized_weights(q: Quantization, handle, keys: set[str], wanted: set[str]) -> dict:
    """The wanted matrices this file holds as quantized parts, each as one QuantizedWeight."""
    from dllmd.models.quantized import QuantizedWeight

    weights = {}
    for name in wanted:
        parts = q.part_names(name)
        if all(part in keys for part in parts):
            weights[name] = QuantizedWeight.from_parts(q, name, {part: handle.get_tensor(part) for part in parts})
    return weights
