"""``dllmctl deploy`` / ``undeploy``: put a model's layer spans on the nodes of a plan."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from dllmctl.cli.common import JsonOpt, err, fail, human_bytes, load_registry, load_user, out, print_json
from dllmctl.cluster import RegistryError
from dllmctl.deploy import SpanAssignment, bytes_to_send, deploy, undeploy
from dllmctl.paths import model_store_root
from dllmd.net.client import CallError


def model_dir(name: str) -> Path:
    path = model_store_root() / name
    if not (path / "manifest.json").exists():
        fail(f"no model {name!r} in the local store; import it with 'dllmctl model import' or 'dllmctl model pull'")
    return path


def read_plan(path: Path, model: str) -> list[SpanAssignment]:
    try:
        doc = json.loads(path.read_text())
        if doc.get("model") not in (None, model):
            fail(f"{path} is a plan for {doc['model']!r}, not {model!r}")
        return [SpanAssignment(s["node"], int(s["start"]), int(s["end"]), bool(s["embed"]), bool(s["head"]))
                for s in doc["spans"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"cannot read plan {path}: {exc}")


def deploy_command(
    model: Annotated[str, typer.Argument(help="Model name in the local store.")],
    plan: Annotated[Optional[Path], typer.Option("--plan", help="Plan JSON from 'dllmctl plan --json'.")] = None,
    dtype: Annotated[str, typer.Option(help="Load as float32, bfloat16 or float16 (default: as imported).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Send each node the tensors of its span (encrypted, resumable) and load them."""
    from dllmctl.cli.plan import make_plan  # the planner asks the nodes for their memory

    user, registry = load_user(), load_registry()
    directory = model_dir(model)
    manifest = json.loads((directory / "manifest.json").read_text())
    spans = read_plan(plan, model) if plan else make_plan(user, registry, model, manifest, None, 1)
    try:
        nodes = {n.name: n for n in registry.select(sorted({s.node for s in spans}))}
    except RegistryError as exc:
        fail(str(exc))
    totals = {s.node: bytes_to_send(manifest, s) for s in spans}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=as_json) as progress:
        tasks = {s.node: progress.add_task(f"{s.node} [{s.start}-{s.end})", total=totals[s.node]) for s in spans}
        try:
            reports = asyncio.run(deploy(user, nodes, directory, spans,
                                         lambda node, n: progress.advance(tasks[node], n), dtype))
        except CallError as exc:
            fail(f"deploy failed: {exc}")
    if as_json:
        print_json(reports)
        return
    table = Table("node", "layers", "embed", "head", "sent", "params", "node RSS", "device")
    for r in reports:
        table.add_row(r["node"], f"{r['start']}-{r['end'] - 1}", "yes" if r["embed"] else "", "yes" if r["head"] else "",
                      human_bytes(r["bytes_sent"]), human_bytes(r["param_bytes"]), human_bytes(r["rss_bytes"]), r["device"])
    out.print(table)


def undeploy_command(
    model: str,
    remove_files: Annotated[bool, typer.Option("--remove-files", help="Also delete the files from the nodes.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop serving a model on every registered node."""
    user, registry = load_user(), load_registry()
    outcome = asyncio.run(undeploy(user, registry.select(None), model, remove_files))
    if as_json:
        print_json(outcome)
        return
    for node, what in outcome.items():
        out.print(f"{node}: {what}")
