"""``dllmctl cluster``: a local N-node cluster on this machine, for trying dllm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import STATUS_STYLE, JsonOpt, err, fail, load_registry, load_user, out, print_json

# What only a command needs (psutil, zmq, keys) is imported in it: 'dllmctl --help' loads this module.
app = typer.Typer(help="Start, inspect and stop a local cluster of daemons.", no_args_is_help=True)

DirOpt = Annotated[Optional[Path], typer.Option(
    "--dir", help="Where the daemons' homes live (default: the last 'cluster up' used, else the dllm data dir).")]


@app.command("up")
def up(
    local: Annotated[int, typer.Option("--local", help="Number of daemons to start on 127.0.0.1.", min=1, max=64)],
    directory: DirOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="The daemons log at debug level.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start N daemons, trust them with each other and with you, and register them."""
    from dllmctl.cluster import local as local_cluster
    from dllmctl.cluster.registry import RegistryError

    user = load_user()
    registry = load_registry()
    try:
        with err.status("starting daemons...") as status:
            target = (directory or local_cluster.default_dir()).expanduser().resolve()
            nodes = local_cluster.up(local, target, user, registry, progress=lambda m: status.update(m),
                                     remember=True, verbose=verbose)
    except (local_cluster.LocalClusterError, RegistryError) as exc:
        fail(str(exc))
    if as_json:
        print_json([{"name": n.name, "address": n.address, "pid": n.pid, "public_key": n.public_key, "home": n.home}
                    for n in nodes])
        return
    for n in nodes:
        out.print(f"[green]up[/green] {n.name} pid {n.pid} {n.address}")
    out.print("see them with 'dllmctl nodes list'; stop them with 'dllmctl cluster down'")


@app.command("status")
def status(directory: DirOpt = None, as_json: JsonOpt = False,
           timeout: Annotated[float, typer.Option(min=0.1, max=120)] = 3.0) -> None:
    """The local cluster's daemons: pid, whether the process runs, and whether it answers."""
    import asyncio

    from dllmctl.cluster import local as local_cluster
    from dllmctl.cluster.live import query_nodes
    from dllmctl.cluster.registry import NodeEntry

    user = load_user()
    try:
        nodes = local_cluster.load_state(local_cluster.resolve_dir(directory))
    except local_cluster.LocalClusterError as exc:
        fail(str(exc))
    rows = asyncio.run(query_nodes(user, [NodeEntry(n.name, n.address, n.public_key) for n in nodes], timeout))
    result = [{"name": n.name, "pid": n.pid, "running": n.process() is not None, "address": n.address,
               "status": r["status"], "latency_ms": r["latency_ms"], "home": n.home} for n, r in zip(nodes, rows)]
    if as_json:
        print_json(result)
        return
    if not result:
        out.print("no local cluster is running; start one with 'dllmctl cluster up --local 3'")
        return
    table = Table("name", "pid", "process", "address", "status", "latency ms")
    for r in result:
        style = STATUS_STYLE.get(r["status"], "")
        table.add_row(r["name"], str(r["pid"]), "running" if r["running"] else "[red]gone[/red]", r["address"],
                      f"[{style}]{r['status']}[/{style}]", "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}")
    out.print(table)


@app.command("down")
def down(directory: DirOpt = None, as_json: JsonOpt = False) -> None:
    """Stop exactly the daemons 'cluster up' started, and unregister them."""
    from dllmctl.cluster import local as local_cluster

    registry = load_registry()
    try:
        stopped = local_cluster.down(local_cluster.resolve_dir(directory), registry)
    except local_cluster.LocalClusterError as exc:
        fail(str(exc))
    if as_json:
        print_json({"stopped": stopped})
    else:
        out.print(f"stopped {len(stopped)} daemon(s)" + (f": {', '.join(stopped)}" if stopped else ""))


@app.command("restart")
def restart(name: str, directory: DirOpt = None, as_json: JsonOpt = False) -> None:
    """Start one stopped (or crashed) daemon of the local cluster again."""
    from dllmctl.cluster import local as local_cluster
    from dllmctl.cluster.registry import RegistryError

    registry = load_registry()
    try:
        node = local_cluster.restart(local_cluster.resolve_dir(directory), name, registry)
    except (local_cluster.LocalClusterError, RegistryError) as exc:
        fail(str(exc))
    if as_json:
        print_json({"name": node.name, "pid": node.pid, "address": node.address})
    else:
        out.print(f"restarted {node.name} pid {node.pid} {node.address}")
