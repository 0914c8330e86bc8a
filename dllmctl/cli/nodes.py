"""``dllmctl nodes``: register nodes and see them live."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dllmctl.cli.common import JsonOpt, fail, load_registry, load_user, out, print_json, print_nodes
from dllmctl.models import local_store
from dllmctl.placement.coverage import CoverageRun, describe_coverage, layer_coverage, uncovered

# What only a command needs (zmq, keys, the model store) is imported in it: 'dllmctl --help' loads this module.
app = typer.Typer(help="Register nodes and see them live.", no_args_is_help=True)


def coverage_by_model(rows: list[dict]) -> dict[str, list[CoverageRun]]:
    """How many nodes that are up hold each layer, per model they serve."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        if row["status"] == "up":
            for s in row["serving"]:
                ranges.setdefault(s["model"], []).append((s["start"], s["end"]))
    return {model: layer_coverage(_num_layers(model, spans), spans) for model, spans in sorted(ranges.items())}


def _num_layers(model: str, spans: list[tuple[int, int]]) -> int:
    """From the local store; a model not imported here is taken to end where its furthest span does."""
    from dllmd.models.store import ModelStoreError

    try:
        return local_store().get(model).num_layers
    except ModelStoreError:
        return max(end for _, end in spans)


def show_coverage(coverage: dict[str, list[CoverageRun]]) -> None:
    for model, runs in coverage.items():
        out.print(f"{model}: {describe_coverage(runs)}", highlight=False)
        if uncovered(runs):
            gaps = ", ".join(f"{r.start}-{r.end - 1}" for r in uncovered(runs))
            out.print(f"[yellow]warning:[/yellow] no node that is up serves layers {gaps} of {model}; "
                      f"'dllmctl rebalance {model} --apply' fills them", highlight=False)


@app.command("add")
def add(
    address: Annotated[str, typer.Argument(help="tcp://HOST:PORT the node listens on.")],
    key: Annotated[str, typer.Option("--key", help="The node's public key ('dllmd id' prints it).")],
    name: Annotated[Optional[str], typer.Option(help="Name for the node (default: node-<id>).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a node by address and public key."""
    from dllmctl.cluster.registry import RegistryError, make_entry

    registry = load_registry()
    try:
        entry = make_entry(name or "pending", address, key)
        if name is None:
            entry = make_entry(f"node-{entry.node_id}", address, key)
        registry.add(entry)
    except RegistryError as exc:
        fail(str(exc))
    registry.save()
    if as_json:
        print_json({"name": entry.name, "id": entry.node_id, "address": entry.address, "public_key": entry.public_key})
    else:
        out.print(f"registered [bold]{entry.name}[/bold] ({entry.node_id}) at {entry.address}")


@app.command("remove")
def remove(name: str, as_json: JsonOpt = False) -> None:
    """Forget a node (the node itself is not touched)."""
    from dllmctl.cluster.registry import RegistryError

    registry = load_registry()
    try:
        entry = registry.remove(name)
    except RegistryError as exc:
        fail(str(exc))
    registry.save()
    if as_json:
        print_json({"removed": entry.name})
    else:
        out.print(f"removed {entry.name}")


@app.command("list")
def list_nodes(
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each node.", min=0.1, max=120)] = 3.0,
) -> None:
    """Every registered node, asked live: status, latency, hardware, what it serves."""
    import asyncio

    from dllmctl.cluster.live import LISTED_FIELDS, query_nodes

    registry = load_registry()
    user = load_user()
    rows = asyncio.run(query_nodes(user, registry.select(None), timeout))
    if as_json:
        print_json([{k: r[k] for k in LISTED_FIELDS} for r in rows])
        return
    if not rows:
        out.print("no nodes registered; add one with 'dllmctl nodes add' or start a local cluster with 'dllmctl cluster up --local 3'")
        return
    print_nodes(rows)
    show_coverage(coverage_by_model(rows))


@app.command("coverage")
def coverage(
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each node.", min=0.1, max=120)] = 3.0,
) -> None:
    """How many live nodes hold each layer of every model they serve."""
    import asyncio

    from dllmctl.cluster.live import query_nodes

    rows = asyncio.run(query_nodes(load_user(), load_registry().select(None), timeout))
    by_model = coverage_by_model(rows)
    if as_json:
        print_json([{"model": model, "num_layers": runs[-1].end, "runs": [r.to_json() for r in runs],
                     "complete": not uncovered(runs)} for model, runs in by_model.items()])
        return
    if not by_model:
        out.print("no node that is up serves a model; deploy one with 'dllmctl deploy'")
    show_coverage(by_model)
