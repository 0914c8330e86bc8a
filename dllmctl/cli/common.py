"""What every dllmctl command shares: consoles, errors, JSON output, the user's identity, and the
tables and progress bars that more than one command shows.

Only light imports at the top, here and in every ``dllmctl.cli`` module: each command (``dllmctl
--help`` too) loads them all, so what only a command's body needs (keys, the network, the model
store, ``rich.progress``) is imported in that body, or here where a progress bar is built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from dllmctl.data.progress import ShardProgress
from dllmctl.paths import cluster_file, identity_path

if TYPE_CHECKING:
    from dllmd.net.identity import Identity
    from dllmctl.cluster.registry import NodeEntry, Registry

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
NodesOpt = Annotated[Optional[str], typer.Option("--nodes", help="Comma-separated node names (default: all registered).")]
ReplicasOpt = Annotated[int, typer.Option(min=1, max=16, help="Hold every layer on this many nodes.")]
ThroughputOpt = Annotated[bool, typer.Option("--throughput", help=(
    "Plan for aggregate tokens/s: as many replica chains as raise it (at least --replicas), each of nodes that "
    "suit one another, nodes that would slow a chain left idle. Default: exactly --replicas chains over every "
    "node."))]
LayoutOpt = Annotated[str, typer.Option("--parallelism", help=(
    "pipeline: each node holds whole layers; tensor: a tensor-parallel group (--tp members) holds a slice of "
    "every layer on each member; hybrid: a chain of such groups."))]
TpOpt = Annotated[Optional[int], typer.Option("--tp", min=1, max=64, help=(
    "Members per tensor-parallel group (default: every free node for tensor, 2 for hybrid)."))]
DtypeOpt = Annotated[str, typer.Option(help="Load spans as float32, bfloat16 or float16 (default: as imported).")]
ActivationsOpt = Annotated[str, typer.Option(help=(
    "How hidden states travel between stages: fp32 (as computed: exact), fp16 (half the bytes) or int8 "
    "(blockwise, about a quarter)."))]
ActivationBlockOpt = Annotated[int, typer.Option(min=1, max=65536, help="int8: values per scale (must divide the "
                                                                        "hidden size).")]
PrivateOpt = Annotated[bool, typer.Option("--private", help=(
    "Private mode: this machine runs the embeddings, the first --private-layers layers and the head, so the "
    "nodes see hidden states only, never a token id (needs a layout deployed with --private)."))]
PrivateLayersOpt = Annotated[int, typer.Option("--private-layers", min=1, help=(
    "With --private: decoder layers run here before anything leaves this machine (K >= 1: raw embeddings "
    "would give the prompt away)."))]

STATUS_STYLE = {"up": "green", "down": "red", "unauthorized": "yellow", "key-mismatch": "yellow", "error": "red"}


def fail(message: str) -> NoReturn:
    """Print a one-line error (no traceback) and exit 1."""
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(1)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def load_user() -> Identity:
    from dllmd.net.identity import Identity, InvalidKey

    try:
        return Identity.load(identity_path())
    except InvalidKey as exc:
        fail(f"{exc}" if identity_path().exists() else "no user identity yet; run 'dllmctl init' first")


def load_registry() -> Registry:
    from dllmctl.cluster.registry import Registry, RegistryError

    try:
        return Registry(cluster_file())
    except RegistryError as exc:
        fail(str(exc))


def split_names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def select_nodes(names: str | None, registry: Registry | None = None) -> list[NodeEntry]:
    """The registered nodes named in a comma-separated list (all when it is empty)."""
    from dllmctl.cluster.registry import RegistryError

    try:
        return (registry or load_registry()).select(split_names(names) or None)
    except RegistryError as exc:
        fail(str(exc))


def locate_job(job: str) -> tuple[Identity, NodeEntry]:
    """The user and the registered node that coordinates ``job``, or a one-line error."""
    import asyncio

    from dllmctl.training.jobs import TrainError, find_coordinator

    user = load_user()
    try:
        return user, asyncio.run(find_coordinator(user, select_nodes(None), job))
    except TrainError as exc:
        fail(str(exc))


def local_model(name: str) -> tuple[Path, Any]:
    """The directory and manifest of a model in the local store, or a one-line error."""
    from dllmd.models.store import ModelStoreError
    from dllmctl.models import local_model as find

    try:
        return find(name)
    except ModelStoreError as exc:
        fail(str(exc))


def maybe_number(value: float | None, spec: str) -> str:
    """A metric that can be missing (the loss of a DP step whose Poisson batch was empty), formatted."""
    return "-" if value is None else format(value, spec)


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def layers_text(start: int, end: int) -> str:
    """Layers ``[start, end)`` as tables show them: inclusive."""
    return f"{start}-{end - 1}"


# --- tables more than one command shows ------------------------------------------------------------

def hardware_summary(hw: dict | None) -> str:
    if not hw:
        return "-"
    parts = [f"{hw['cpu_cores']} cores",
             f"RAM {human_bytes(hw['ram_available'])}/{human_bytes(hw['ram_total'])}"]
    for gpu in hw.get("gpus", []):
        parts.append(f"{gpu['name']} {human_bytes(gpu['memory_free'])}/{human_bytes(gpu['memory_total'])}")
    parts.append(f"{hw['matmul_gflops']:.0f} GFLOP/s")
    if hw.get("stream_gbps"):
        parts.append(f"{hw['stream_gbps']:.0f} GB/s streamed")
    return ", ".join(parts)


def serving_summary(serving: list[dict]) -> str:
    if not serving:
        return "-"
    return "; ".join(f"{s.get('model')} [{s.get('start')}-{s.get('end')})" for s in serving)


def memory_summary(row: dict) -> str:
    """What dllm holds on the node (weights and reserved KV caches) against its owner's cap."""
    if row["status"] != "up":
        return "-"
    cap = (row.get("limits") or {}).get("memory_bytes", 0)
    used = human_bytes(row.get("memory_used_bytes") or 0)
    return f"{used} of {human_bytes(cap)} cap" if cap else f"{used}, no cap"


def print_nodes(rows: list[dict]) -> None:
    table = Table("name", "id", "address", "status", "latency ms", "hardware", "dllm memory", "serving")
    for r in rows:
        style = STATUS_STYLE.get(r["status"], "")
        table.add_row(r["name"], r["id"], r["address"], f"[{style}]{r['status']}[/{style}]",
                      "-" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}",
                      hardware_summary(r["hardware"]), memory_summary(r), serving_summary(r["serving"]))
    out.print(table)


def print_layout(doc: dict) -> None:
    grouped = any(s.get("tensor_slice") for s in doc["spans"])
    columns = ["node", "layers", "embed", "head", "weights", "expected ms/token"]
    if grouped:
        columns[1:1] = ["group", "rank", "KV heads", "MLP columns", "vocab rows"]
    table = Table(*columns)
    for s in doc["spans"]:
        row = [s["node"], layers_text(s["start"], s["end"]), "yes" if s["embed"] else "", "yes" if s["head"] else "",
               human_bytes(s["bytes"]), f"{s['expected_ms']:.2f}" if "expected_ms" in s else ""]
        if grouped:
            t = s.get("tensor_slice")
            row[1:1] = ([t["group"], str(t["rank"]), f"{t['kv_lo']}-{t['kv_hi'] - 1}", f"{t['mlp_lo']}-{t['mlp_hi'] - 1}",
                         f"{t['vocab_lo']}-{t['vocab_hi'] - 1}" if t["vocab_hi"] else ""] if t else [""] * 5)
        table.add_row(*row)
    out.print(table)
    if "throughput" in doc:
        print_throughput(doc["replicas"], doc["throughput"])


def print_throughput(chains: int, estimate: dict, how: str = "") -> None:
    """A throughput plan's footer: its chains and its modelled rate's share of the bound."""
    out.print(f"{chains} chain(s), modelled at {estimate['fraction_of_bound'] or 0:.0%} of the tokens/s the nodes' "
              f"total compute allows" + (f" ({how})" if how else ""))


def print_deployed(reports: list[dict]) -> None:
    table = Table("node", "layers", "embed", "head", "sent", "params", "node RSS", "device")
    for r in reports:
        table.add_row(r["node"], layers_text(r["start"], r["end"]), "yes" if r["embed"] else "",
                      "yes" if r["head"] else "", human_bytes(r["bytes_sent"]), human_bytes(r["param_bytes"]),
                      human_bytes(r["rss_bytes"]), r["device"])
    out.print(table)


def print_generation_footer(result) -> None:
    """After streamed text: tokens, time and route, then any failovers (on stderr)."""
    generation = result.generation
    route = generation.routes[-1]
    rate = result.completion_tokens / generation.seconds if generation.seconds else 0
    cached = (f", {generation.cached_tokens}/{result.prompt_tokens} prompt tokens cached"
              if generation.cached_tokens else "")
    err.print(f"[dim]{result.completion_tokens} tokens in {generation.seconds:.2f}s ({rate:.1f} tok/s; first after "
              f"{generation.time_to_first_token_s * 1000:.0f} ms{cached}; seed {result.seed}) via "
              + " -> ".join(f"{s['node']}[{s['start']}-{s['end']})" for s in route) + "[/dim]")
    for failover in generation.failovers:
        err.print(f"[yellow]failover at token {failover['step']}: {failover['error']}[/yellow]")


# --- progress (on stderr) -------------------------------------------------------------------------

def transfer_progress(transient: bool):
    """Bytes per node, as deploys and rebalances show them (a rich ``Progress``)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=err, transient=transient)


class StageProgress:
    """A bar per named stage (``progress(stage, done, total)``), shown once the first report comes,
    so that an early error prints alone. ``stop()`` when the work ends."""

    def __init__(self, transient: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=transient)
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.tasks:
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def stop(self) -> None:
        if self.tasks:  # stopping a display that never started prints a blank line
            self.bar.stop()


def _amount_column():
    """A column of counts for items (files, samples, shards), sizes for bytes."""
    from rich.progress import DownloadColumn, MofNCompleteColumn, ProgressColumn

    class Amount(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self.count, self.size = MofNCompleteColumn(), DownloadColumn()

        def render(self, task):
            return (self.size if task.fields.get("unit") == "bytes" else self.count).render(task)

    return Amount()


class RichShardProgress(ShardProgress):
    """One line per stage on stderr; a stage is marked complete when the next one starts."""

    def __init__(self, transient: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<16}"), BarColumn(), _amount_column(), TimeElapsedColumn(),
                            console=err, transient=transient)
        self.tasks: dict[str, int] = {}  # stage -> rich task id
        self.current: int | None = None
        self.started = False

    def stage(self, what: str, total: int | None = None, unit: str = "items") -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        if self.current is not None and not what.startswith("push "):
            task = self.bar.tasks[self.current]  # stages run one after another (pushes concurrently)
            self.bar.update(self.current, total=task.completed if task.total is None else task.total,
                            completed=task.completed if task.total is None else task.total)
        self.tasks[what] = self.bar.add_task(what, total=total, unit=unit)
        if not what.startswith("push "):
            self.current = self.tasks[what]

    def advance(self, what: str, amount: int) -> None:
        if what in self.tasks:
            self.bar.advance(self.tasks[what], amount)

    def stop(self) -> None:
        if self.started:
            self.bar.stop()
