"""``dllmctl nodes``: register nodes and see them live."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dllmctl.cli.common import JsonOpt, err, fail, load_registry, load_user, out, print_json, print_nodes
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


@app.command("invite")
def invite(
    role: Annotated[str, typer.Option(help="peer: a daemon of this cluster (registered, trusted by the nodes as a "
                                           "peer); client: authorized for inference only.")] = "peer",
    expires: Annotated[str, typer.Option(help="How long the code is good for: 90s, 10m, 1h (at most 24h).")] = "10m",
    listen: Annotated[str, typer.Option(help="HOST:PORT of the pairing socket (port 0: a free one).")] = "0.0.0.0:7741",
    advertise: Annotated[Optional[str], typer.Option(help="The host the new machine reaches this one at "
                                                          "(default: the listen host, or this machine's LAN address).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a one-time code for a new machine ('dllmd join CODE' there) and wait for it to join."""
    import asyncio
    import json
    import time

    from dllmd.net.keys import Role
    from dllmd.units import parse_duration
    from dllmctl.cluster.invite import InviteError, PairingServer
    from dllmctl.paths import cluster_file

    if role not in (Role.PEER.value, Role.CLIENT.value):
        fail(f"--role is peer or client, got {role!r}")
    try:
        ttl = parse_duration(expires)
    except ValueError as exc:
        fail(str(exc))
    if not 1 <= ttl <= 86400:
        fail(f"--expires must be between 1s and 24h, got {expires}")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or not host:
        fail(f"--listen must look like HOST:PORT, got {listen!r}")
    user = load_user()
    load_registry()  # a broken cluster file is reported now, not when a machine joins

    async def serve():
        server = PairingServer(user, cluster_file(), Role(role), ttl, host.strip("[]"), int(port), advertise)
        code = await server.start()
        shown = {"code": code.encode(), "role": role, "address": code.address, "expires_at": code.expires_at}
        if as_json:  # one line, at once: a script reads the code while this waits
            print(json.dumps(shown), flush=True)
        else:
            out.print(f"invite code ([bold]{role}[/bold], expires {time.strftime('%H:%M:%S', time.localtime(code.expires_at))}):\n"
                      f"\n    [bold]{shown['code']}[/bold]\n\non the new machine:\n\n    dllmd join {shown['code']}\n", highlight=False, soft_wrap=True)
            out.file.flush()
        with err.status(f"waiting for a machine to join on {code.address}..."):
            return await server.wait()

    try:
        outcome = asyncio.run(serve())
    except InviteError as exc:
        fail(str(exc))
    if outcome.state != "used":
        fail({"expired": "the invite expired; nobody joined", "burnt": "the invite was burnt by wrong secrets; make a new "
              "one"}[outcome.state] + (f" (refused: {outcome.refused})" if outcome.refused else ""))
    joined, result = outcome.joined, outcome.result
    doc = {"joined": {"name": joined.name, "endpoint": joined.endpoint, "public_key": joined.public_key, "role": role},
           "registered_as": result.registered_as, "authorized_on": result.authorized_on,
           "failed": [{"node": f.node, "error": f.error} for f in result.failed], "refused": outcome.refused}
    if as_json:
        print_json(doc)
        return
    out.print(f"[green]joined[/green] {joined.name} ({joined.endpoint}) as {role}; authorized on "
              f"{', '.join(result.authorized_on) or 'no node'}" + (f", registered as {result.registered_as}" if result.registered_as else ""))
    for f in result.failed:
        out.print(f"[yellow]not authorized on {f.node}: {f.error}[/yellow]", highlight=False)


@app.command("discover")
def discover(
    timeout: Annotated[float, typer.Option(help="Seconds to listen for announcements.", min=0.5, max=60)] = 3.0,
    interface: Annotated[Optional[list[str]], typer.Option(
        "--interface", help="An address to browse on (repeat; default: every interface).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Daemons announcing themselves on the LAN (node.toml: discoverable = true), marked when registered.
    An announcement is never trusted: pair with 'dllmctl nodes invite' to add one."""
    from dataclasses import asdict

    from dllmctl.cluster.discover import discover as browse

    registry = load_registry()
    with err.status(f"listening for dllm daemons for {timeout:g}s..."):
        try:
            rows = browse(registry, timeout, interface or None)
        except (OSError, ValueError) as exc:
            fail(f"mDNS browsing failed: {exc}")
    if as_json:
        print_json([asdict(r) for r in rows])
        return
    if not rows:
        out.print("no daemon announced itself (they announce only with 'discoverable = true' in node.toml)")
        return
    from rich.table import Table

    table = Table("name", "id", "endpoint", "registered")
    for r in rows:
        table.add_row(r.name, r.node_id, r.endpoint, (r.registered_as + ("" if r.address_matches else " (other address)"))
                      if r.registered_as else "[yellow]no[/yellow]: 'dllmctl nodes invite' to pair it")
    out.print(table)


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
