"""``dllmctl shard-data`` and ``dllmctl data list|show|rm``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import (JsonOpt, err, fail, human_bytes, load_registry, load_user, local_model, out, print_json,
                                split_names)
from dllmd.data.errors import STRATEGIES

if TYPE_CHECKING:
    from dllmctl.data.records import DatasetRecords

app = typer.Typer(help="Datasets sharded onto the nodes: list, show, remove.", no_args_is_help=True)


def records() -> DatasetRecords:
    """This client's dataset records (imported here, like all that only commands need: 'dllmctl --help'
    loads this module)."""
    from dllmctl.data.records import dataset_records

    return dataset_records()


def shard_data_command(
    data_uri: Annotated[str, typer.Argument(help="A directory (code repository), a .jsonl or a text file; "
                                                 "file:// URIs too. With --local-only: a path on every node.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model whose tokenizer to use.")],
    strategy: Annotated[str, typer.Option(help=f"Placement: {', '.join(STRATEGIES)}.")] = "round_robin",
    nodes: Annotated[Optional[str], typer.Option(help="Comma-separated node names (default: all registered).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Dataset name (default: from the path).")] = None,
    seq_len: Annotated[int, typer.Option(min=8, max=1_048_576, help="Tokens per packed sequence.")] = 2048,
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Copies of each sample (dht only).")] = 1,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    field: Annotated[str, typer.Option(help="The text field of JSONL records.")] = "text",
    include: Annotated[Optional[str], typer.Option(help="Comma-separated globs of files to read (directories).")] = None,
    exclude: Annotated[Optional[str], typer.Option(help="Comma-separated gitignore-style patterns to skip.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first malformed record.")] = False,
    local_only: Annotated[bool, typer.Option("--local-only", help="Each node shards DATA_URI on its own disk; "
                                                                  "the data never leaves it.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Place every piece anew rather than keep pieces on "
                                                        "their nodes (still sends only what they lack).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize, pack and place training data on the nodes (all or nothing). Run again on a changed
    source, it updates the shards: unchanged pieces stay put and only what changed is sent."""
    from dllmd.data import DataError
    from dllmd.net.client import CallError
    from dllmctl.cli.common import RichShardProgress
    from dllmctl.cluster.registry import RegistryError
    from dllmctl.data.push import PushError
    from dllmctl.data.sharding import ShardRequest, dataset_name, shard_and_push

    user, registry = load_user(), load_registry()
    directory, _ = local_model(model)
    try:
        targets = registry.select(split_names(nodes) or None)
        request = ShardRequest(uri=data_uri, model=model, model_dir=directory, strategy=strategy,
                               name=dataset_name(data_uri, name), seq_len=seq_len, replicas=replicas, seed=seed,
                               field=field, include=split_names(include) or None, exclude=split_names(exclude), strict=strict,
                               local_only=local_only, fresh=fresh)
    except (RegistryError, DataError) as exc:
        fail(str(exc))
    progress = RichShardProgress(transient=as_json)
    try:
        report = shard_and_push(user, targets, request, progress)
    except (DataError, PushError, CallError, OSError) as exc:
        error = str(exc)
    else:
        error = None
    finally:
        progress.stop()
    if error:
        fail(error)
    records().save(report)
    if as_json:
        print_json(report)
        return
    _print_report(report)


def _print_report(report: dict) -> None:
    table = Table("node", "samples", "tokens", "sequences", "bytes", "kept", "received", "dropped", "sent", "sha256")
    for row in report["nodes"]:
        table.add_row(row["node"], str(row["samples"]), str(row["tokens"]), str(row["sequences"]),
                      human_bytes(row["bytes"]), *(str(row.get(k, "-")) for k in ("kept", "received", "dropped")),
                      human_bytes(row.get("sent_bytes")), row["sha256"][:16] + "...")
    out.print(table)
    out.print(f"{report['dataset']}: {report['strategy']}, seq_len {report['seq_len']}, skew {report['skew']:.3f}"
              + (f", {report['tokens_per_second']:.0f} tokens/s" if report.get("tokens_per_second") else ""))
    if "changes" in report:
        changes = report["changes"]
        out.print(f"{report['samples']} samples in {report['pieces']} pieces: " + ", ".join(
            f"{changes[k]} {k}" for k in ("added", "removed", "edited", "moved", "unchanged"))
            + f"; sent {human_bytes(report['bytes_sent'])} of {human_bytes(sum(r['bytes'] for r in report['nodes']))}")
    if report["skipped"]:
        kinds: dict[str, int] = {}
        for item in report["skipped"]:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        first = report["skipped"][0]
        err.print(f"[yellow]skipped {len(report['skipped'])} item(s): "
                  + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                  + f" (e.g. {first['where']}: {first['reason']})[/yellow]")


@app.command("list")
def list_datasets(as_json: JsonOpt = False) -> None:
    """Datasets this client sharded onto the nodes."""
    rows = records().list()
    if as_json:
        print_json([{k: v for k, v in r.items() if k != "skipped"} for r in rows])
        return
    if not rows:
        out.print("no datasets; try 'dllmctl shard-data DIR --model M'")
        return
    table = Table("dataset", "strategy", "model", "nodes", "samples", "tokens", "skew", "source")
    for r in rows:
        if "error" in r:
            table.add_row(r["dataset"], "[red]" + r["error"] + "[/red]", "", "", "", "", "", "")
            continue
        table.add_row(r["dataset"], r["strategy"], r["model"], str(len(r["nodes"])), str(r["samples"]),
                      str(sum(n["tokens"] for n in r["nodes"])), f"{r['skew']:.3f}", r["source"])
    out.print(table)


@app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    """One dataset: which node holds which shard."""
    report = _record(name)
    if as_json:
        print_json(report)
    else:
        _print_report(report)


@app.command("rm")
def rm(name: str, as_json: JsonOpt = False) -> None:
    """Remove a dataset's shards from its nodes and forget it."""
    import asyncio

    from dllmctl.data.push import remove_everywhere

    report = _record(name)
    registry = load_registry()
    holders = [registry.nodes[row["node"]] for row in report["nodes"] if row["node"] in registry.nodes]
    outcome = asyncio.run(remove_everywhere(load_user(), holders, name))
    records().remove(name)
    if as_json:
        print_json({"removed": name, "nodes": outcome})
    else:
        for node, what in outcome.items():
            out.print(f"{node}: {what}")


def _record(name: str) -> dict:
    from dllmd.data import DataError

    try:
        return records().load(name)
    except DataError as exc:
        fail(str(exc))
