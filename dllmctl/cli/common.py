"""What every dllmctl command shares: consoles, errors, JSON output, the user's identity."""

from __future__ import annotations

import json
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from dllmd.net.identity import Identity, InvalidKey
from dllmctl.cluster import Registry, RegistryError
from dllmctl.paths import cluster_file, identity_path

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str) -> NoReturn:
    """Print a one-line error (no traceback) and exit 1."""
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(1)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def load_user() -> Identity:
    try:
        return Identity.load(identity_path())
    except InvalidKey as exc:
        fail(f"{exc}" if identity_path().exists() else "no user identity yet; run 'dllmctl init' first")


def load_registry() -> Registry:
    try:
        return Registry(cluster_file())
    except RegistryError as exc:
        fail(str(exc))


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
