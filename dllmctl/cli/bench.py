"""``dllmctl bench``: measured figures against a baseline taken in the same run."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.table import Table

from dllmctl import local_cluster
from dllmctl.bench import ping as ping_bench
from dllmctl.cli.common import JsonOpt, err, fail, load_registry, load_user, out, print_json
from dllmctl.cluster import NodeEntry, Registry, RegistryError
from dllmd.net.client import CallError
from dllmd.net.identity import Identity

app = typer.Typer(help="Benchmarks (figures and ratios against a same-run baseline).", no_args_is_help=True)


@contextmanager
def target_node(user: Identity, name: str | None) -> Iterator[NodeEntry]:
    """The named node, the first registered one, or else a temporary local daemon (stopped after)."""
    registry = load_registry()
    if name or registry.nodes:
        try:
            yield registry.select([name] if name else None)[0]
        except RegistryError as exc:
            fail(str(exc))
        return
    with tempfile.TemporaryDirectory(prefix="dllm-bench-") as tmp:
        scratch = Registry(Path(tmp) / "cluster.toml")
        err.print("no nodes registered: starting a temporary local daemon")
        node = local_cluster.up(1, Path(tmp), user, scratch)[0]
        try:
            yield NodeEntry(node.name, node.address, node.public_key)
        finally:
            local_cluster.down(Path(tmp), scratch)


@app.command("ping")
def ping(
    node: Annotated[Optional[str], typer.Option(help="Registered node to measure (default: the first).")] = None,
    count: Annotated[int, typer.Option(min=10, max=1_000_000)] = 2000,
    as_json: JsonOpt = False,
) -> None:
    """Median round trip of a small message and of a [1, 1, 576] fp32 tensor echo, encrypted."""
    user = load_user()
    with target_node(user, node) as entry:
        try:
            result = ping_bench.run(user, entry, count=count)
        except CallError as exc:
            fail(str(exc))
    if as_json:
        print_json(result)
        return
    table = Table("round trip", "median us", "p90 us", "p99 us", "raw zmq median us", "ratio")
    for key in ("ping", "tensor_echo"):
        m, b = result["encrypted"][key], result["baseline_raw_zmq"][key]
        table.add_row(key, f"{m['median_us']:.1f}", f"{m['p90_us']:.1f}", f"{m['p99_us']:.1f}",
                      f"{b['median_us']:.1f}", f"{result['ratio_median'][key]:.2f}x")
    out.print(table)
    verdict = "[green]meets[/green]" if result["meets_target"] else "[red]misses[/red]"
    out.print(f"tensor echo {verdict} the {result['target_tensor_echo_median_us']} us target ({result['node']}, {count} calls)")
