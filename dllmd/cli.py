"""``dllmd``: set up a node's home and run the daemon."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from dllmd import __version__
from dllmd.config import DEFAULT_LISTEN, ConfigError, NodeConfig, resolve_home, validate_endpoint, validate_name
from dllmd.net.identity import Identity, InvalidKey
from dllmd.net.keys import AuthorizedKeys, Role

app = typer.Typer(help="dllmd: the dllm node daemon.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="Node home (default: $DLLMD_HOME, $STATE_DIRECTORY, ~/.local/state/dllmd).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str) -> NoReturn:
    """Print a one-line error (no traceback) and exit 1, as dllmctl's commands do."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def _emit(data: dict | list, as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        out.print(text, highlight=False)


def _load_identity(home: Path) -> Identity:
    try:
        return Identity.load(home / "identity")
    except InvalidKey as exc:
        fail(str(exc))


def _id_doc(home: Path, identity: Identity, config: NodeConfig) -> dict:
    return {"node_id": identity.node_id, "name": config.name, "public_key": identity.public_key,
            "address": config.listen, "home": str(home)}


AdvertiseOpt = Annotated[Optional[str], typer.Option(
    "--advertise", help="With a join: the host the cluster reaches this daemon at (needed where it listens on 0.0.0.0).")]


@app.command()
def init(
    home: HomeOpt = None,
    listen: Annotated[str, typer.Option(help="ZeroMQ endpoint to bind; port 0 picks a free one.")] = DEFAULT_LISTEN,
    name: Annotated[Optional[str], typer.Option(help="Node name (default: the host name).")] = None,
    join_code: Annotated[Optional[str], typer.Option("--join", help="Then join a cluster with this invite code "
                                                                    "('dllmctl nodes invite' prints one).")] = None,
    advertise: AdvertiseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the node's home, node.toml and Ed25519 identity. Never overwrites an identity."""
    import socket

    code = _decode_code(join_code) if join_code else None  # a bad code changes nothing, not even the home
    home = resolve_home(home)
    if (home / "identity").exists():
        fail(f"{home} already holds an identity; refusing to overwrite it (use another --home)")
    try:
        config = NodeConfig(name=validate_name(name or socket.gethostname().split(".")[0]), listen=validate_endpoint(listen))
        if code is not None:  # a join it could not finish (no reachable host, a free port) creates nothing
            from dllmd.pairing.join import daemon_endpoint

            daemon_endpoint(home, config, advertise)
    except ConfigError as exc:
        fail(str(exc))
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = Identity.generate()
    identity.save(home / "identity")
    config.save(home)
    if code is not None:
        _join(home, code, advertise, as_json)
        return
    _emit(_id_doc(home, identity, config), as_json,
          f"node [bold]{config.name}[/bold] ({identity.node_id})\npublic key  {identity.public_key}\n"
          f"address     {config.listen}\nhome        {home}")


@app.command()
def join(
    code: Annotated[str, typer.Argument(help="The invite code 'dllmctl nodes invite' printed.")],
    home: HomeOpt = None,
    advertise: AdvertiseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Join a cluster with a one-time invite code: trust its admin (and, as a peer, its nodes) and be
    authorized on every node. Works whether the daemon runs or not (a running one applies it at once)."""
    parsed = _decode_code(code)
    _join(resolve_home(home), parsed, advertise, as_json)


def _decode_code(text: str):
    from dllmd.pairing.code import InviteCodeError
    from dllmd.pairing.join import decode_code

    try:
        return decode_code(text)
    except InviteCodeError as exc:
        fail(str(exc))


def _join(home: Path, code, advertise: Optional[str], as_json: bool) -> None:
    from dllmd.pairing.channel import PairingFailed
    from dllmd.pairing.join import daemon_endpoint, join as run_join

    try:
        config = NodeConfig.load(home)
        endpoint = daemon_endpoint(home, config, advertise)
    except ConfigError as exc:
        fail(str(exc))
    identity = _load_identity(home)
    try:
        with err.status(f"joining through {code.address}..."):
            outcome = asyncio.run(run_join(code, home, identity, config.name, endpoint))
    except PairingFailed as exc:
        left = f" ({exc.attempts_left} attempt(s) left)" if exc.attempts_left > 0 else ""
        fail(f"the pairing failed ({exc.code}): {exc.message}{left}; nothing was trusted here")
    result = outcome.result
    doc = {"node_id": identity.node_id, "name": config.name, "endpoint": endpoint, "role": outcome.role,
           "admin_key": outcome.admin_key, "trusted": outcome.trusted, "registered_as": result.registered_as,
           "authorized_on": result.authorized_on, "failed": [{"node": f.node, "error": f.error} for f in result.failed]}
    lines = [f"joined as [bold]{outcome.role}[/bold] ({endpoint})",
             f"trusts the admin {outcome.admin_key[:12]} and {len(outcome.trusted) - 1} node(s) as peers",
             f"authorized on {', '.join(result.authorized_on) or 'no node'}"]
    lines += [f"[yellow]not authorized on {f.node}: {f.error}[/yellow]" for f in result.failed]
    if result.registered_as:
        lines.append(f"registered as {result.registered_as}")
    _emit(doc, as_json, "\n".join(lines))


@app.command()
def start(home: HomeOpt = None, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run the daemon in the foreground (SIGTERM/SIGINT stop it cleanly)."""
    from dllmd import failpoints, hardware
    from dllmd.net import tap

    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        failpoints.load()
        tap.load()
    except failpoints.FailpointError as exc:
        raise fail(str(exc))
    home = resolve_home(home)
    try:
        # Before the daemon's modules are imported: importing some of them starts CUDA, which then
        # sees every GPU whatever [limits] says.
        hardware.restrict_gpus(NodeConfig.load(home).limits.gpus)
    except (ConfigError, hardware.GpuLimitError) as exc:
        fail(str(exc))
    from dllmd.node import Daemon, StartupError

    try:
        daemon = Daemon(home)
    except (ConfigError, InvalidKey) as exc:
        fail(str(exc))

    async def main() -> None:
        await daemon.run()

    try:
        asyncio.run(main())
    except StartupError as exc:
        fail(str(exc))


@app.command()
def authorize(
    public_key: Annotated[str, typer.Argument(help="The 64-hex-character public key to allow.")],
    role: Annotated[Role, typer.Option(help="admin, client, peer or federation (another organization's coordinator: federated rounds on the datasets federated_datasets lists, nothing else).")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    models: Annotated[Optional[str], typer.Option(help="Comma-separated models this key may run here "
                                                        "(default: every model the node serves).")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Allow a key to talk to this node. A running daemon applies it at once."""
    keys = AuthorizedKeys(resolve_home(home) / "authorized_keys.toml")
    try:
        entry = keys.authorize(public_key, role, name, [m.strip() for m in models.split(",")] if models else None)
    except InvalidKey as exc:
        fail(str(exc))
    _emit({"public_key": entry.public_key, "role": entry.role.value, "name": entry.name,
           "models": None if entry.models is None else list(entry.models)}, as_json,
          f"authorized {entry.public_key} as {entry.role.value}"
          + (f" for {', '.join(entry.models) or 'no model'}" if entry.models is not None else ""))


@app.command()
def revoke(public_key: str, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Remove a key. A running daemon stops answering it at once."""
    keys = AuthorizedKeys(resolve_home(home) / "authorized_keys.toml")
    try:
        removed = keys.revoke(public_key)
    except InvalidKey as exc:
        fail(str(exc))
    if not removed:
        fail(f"{public_key} is not authorized on this node")
    _emit({"revoked": public_key}, as_json, f"revoked {public_key}")


@app.command("keys")
def list_keys(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List the keys allowed to talk to this node."""
    keys = AuthorizedKeys(resolve_home(home) / "authorized_keys.toml")
    try:
        entries = keys.all()
    except InvalidKey as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps([{"public_key": e.public_key, "role": e.role.value, "name": e.name} for e in entries], indent=2))
        return
    table = Table("public key", "role", "name")
    for e in entries:
        table.add_row(e.public_key, e.role.value, e.name)
    out.print(table)


@app.command("id")
def show_id(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Print this node's id, public key and address."""
    home = resolve_home(home)
    try:
        config = NodeConfig.load(home)
    except ConfigError as exc:
        fail(str(exc))
    identity = _load_identity(home)
    doc = _id_doc(home, identity, config)
    _emit(doc, as_json, "\n".join(f"{k:<11} {v}" for k, v in doc.items()))


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


def main() -> None:
    from dllmd.process_exit import run_and_exit

    run_and_exit(app)
