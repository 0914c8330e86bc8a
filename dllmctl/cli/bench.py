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
from dllmctl.cli.common import JsonOpt, err, fail, human_bytes, load_registry, load_user, out, print_json
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


@app.command("infer")
def infer(
    model: Annotated[str, typer.Option("--model", "-m", help="A deployed model.")],
    new_tokens: Annotated[int, typer.Option(min=2, max=4096)] = 64,
    compare_local: Annotated[bool, typer.Option("--compare-local", help="Also run transformers' generate here.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Decode tokens/s, time to first token, per-token split into stage compute and transfer."""
    import json as _json

    from dllmctl.bench import infer as infer_bench
    from dllmctl.cli.deploy import model_dir
    from dllmctl.inference import RouteError

    user, registry = load_user(), load_registry()
    directory = model_dir(model)
    num_layers = _json.loads((directory / "config.json").read_text())["num_hidden_layers"]
    with err.status("benchmarking..."):
        try:
            report = infer_bench.run(user, registry.select(None), directory, model, num_layers, new_tokens, compare_local)
        except (CallError, RouteError) as exc:
            fail(str(exc))
    if as_json:
        print_json({k: v for k, v in report.items()})
        return
    d = report["distributed"]
    table = Table("figure", "distributed", "local generate", "ratio")
    local = report.get("local", {})
    table.add_row("decode tokens/s", f"{d['tokens_per_second']:.2f}", f"{local.get('tokens_per_second', '-')}",
                  f"{report.get('ratio_tokens_per_second', '-')}")
    table.add_row("time to first token ms", f"{d['time_to_first_token_ms']:.1f}", f"{local.get('time_to_first_token_ms', '-')}", "")
    table.add_row("per-token ms (median)", f"{d['per_token_ms']:.2f}", "", "")
    table.add_row("compute ms per stage", ", ".join(f"{c:.2f}" for c in d["compute_ms_per_stage"]), "", "")
    table.add_row("transfer + overhead ms", f"{d['transfer_and_overhead_ms']:.2f} ({d['overhead_ms_per_message']:.3f}/message)", "", "")
    table.add_row("bytes per token per hop", ", ".join(map(str, d["bytes_per_token_per_hop"])), "", "")
    for name, rss in d["node_rss_bytes"].items():
        share = report.get("node_rss_share_of_local_model", {}).get(name)
        table.add_row(f"RSS {name}", human_bytes(rss), human_bytes(local.get("process_rss_bytes")) if local else "",
                      f"{share}" if share is not None else "")
    out.print(table)
    if "tokens_identical" in report:
        out.print("tokens identical to local generate: " + ("[green]yes[/green]" if report["tokens_identical"] else "[red]no[/red]"))
