"""``dllmctl train``, ``dllmctl jobs``, ``dllmctl metrics`` and ``dllmctl checkpoints``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import JsonOpt, err, fail, human_bytes, load_user, local_model, out, print_json, select_nodes

if TYPE_CHECKING:
    from dllmctl.cluster.registry import NodeEntry

# The training client (zmq, keys, the protocol) is imported in the commands: 'dllmctl --help' loads this module.
jobs_app = typer.Typer(help="Training jobs: list, show, stop, resume.", no_args_is_help=True)
checkpoints_app = typer.Typer(help="Checkpoints of a job: list, show, export.", no_args_is_help=True)

FOLLOW_POLL_S = 1.0


def _nodes(names: Optional[str]) -> list[NodeEntry]:
    return select_nodes(names)


def train_command(
    model: Annotated[str, typer.Option("--model", "-m", help="A model in the local store.")],
    data: Annotated[str, typer.Option("--data", "-d", help="A dataset placed with 'dllmctl shard-data'.")],
    parallelism: Annotated[str, typer.Option(help="data (a replica per node), model (a pipeline of stages), hybrid "
                                                  "(--dp replicas of a --pp stage pipeline), federated "
                                                  "(rounds of local training on each node's own data).")] = "data",
    nodes: Annotated[Optional[str], typer.Option(
        help="Comma-separated node names; the first coordinates (default: the nodes holding the dataset).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, max=100_000)] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, max=100_000_000, help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1_000_000, help="Sequences per global step.")] = 8,
    micro_batch_size: Annotated[int, typer.Option(min=1, max=65536,
                                                  help="Sequences per forward/backward pass.")] = 1,
    lr: Annotated[float, typer.Option(min=0.0, max=10.0)] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 0,
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Global gradient norm clip (0: none).")] = 1.0,
    weight_decay: Annotated[float, typer.Option(min=0.0, max=10.0)] = 0.0,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Steps between checkpoints (0: on stop and at the end).")] = 0,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    dtype: Annotated[str, typer.Option(help="float32, or bfloat16 (autocast; fp32 master weights).")] = "float32",
    backend: Annotated[str, typer.Option(help="zmq (encrypted ring) or torch (torch.distributed).")] = "zmq",
    plaintext: Annotated[bool, typer.Option("--plaintext", help="Unencrypted ring: trusted links only (the nodes "
                                                                 "must allow it in node.toml).")] = False,
    schedule: Annotated[str, typer.Option(help="Pipeline schedule: 1f1b (a stage holds at most as many micro-batches "
                                               "as there are stages) or gpipe (all of them).")] = "1f1b",
    pp: Annotated[Optional[int], typer.Option("--pp", min=2, max=256, help="Pipeline stages (model: default every "
                                                                            "node; hybrid).")] = None,
    dp: Annotated[Optional[int], typer.Option("--dp", min=1, max=256, help="Replicas of the pipeline (hybrid).")] = None,
    stage_layers: Annotated[Optional[str], typer.Option(help="Layers per stage, e.g. 3,2 (default: planned from "
                                                              "the nodes' free memory and speed).")] = None,
    recompute: Annotated[bool, typer.Option("--recompute", help="Pipeline stages keep only their inputs and run the "
                                                                 "forward again in the backward (less memory).")] = False,
    rounds: Annotated[Optional[int], typer.Option(min=1, max=10_000_000, help="Federated: rounds to run.")] = None,
    local_steps: Annotated[int, typer.Option(min=1, max=1_000_000, help="Federated: each client's AdamW steps "
                                                                        "per round.")] = 1,
    clients_per_round: Annotated[Optional[str], typer.Option(help="Federated: clients sampled per round, a count "
                                                                  "(3) or a fraction (0.5, 50%); default all.")] = None,
    min_clients: Annotated[int, typer.Option(min=1, max=256, help="Federated: a round closes with at least this "
                                                                  "many updates, else it is tried again.")] = 1,
    round_timeout: Annotated[float, typer.Option(min=0.1, max=86400.0, help="Federated: seconds a round waits "
                                                                            "for its clients.")] = 600.0,
    strategy: Annotated[str, typer.Option(help="Federated: fedavg, fedavgm (server momentum) or fedadam.")] = "fedavg",
    server_lr: Annotated[float, typer.Option(min=0.0, max=100.0, help="Federated: the server's step on the mean "
                                                                       "update.")] = 1.0,
    server_momentum: Annotated[float, typer.Option(min=0.0, max=0.9999, help="Federated: fedavgm's momentum, "
                                                                              "fedadam's beta1.")] = 0.9,
    proximal_mu: Annotated[float, typer.Option(min=0.0, help="Federated: FedProx's mu (0: plain local steps).")] = 0.0,
    update_clip: Annotated[float, typer.Option(min=0.0, help="Federated: L2 bound on each client's update "
                                                             "(0: none).")] = 0.0,
    secure_aggregation: Annotated[bool, typer.Option("--secure-aggregation", help="Federated: the coordinator "
                                                     "learns only the sum of each round's updates.")] = False,
    follow: Annotated[bool, typer.Option("--follow/--detach", help="Show progress until the job ends "
                                                                   "(Ctrl+C detaches; the job goes on).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a model on a sharded dataset: data parallelism over an encrypted ring all-reduce, or a
    pipeline of layer stages over the nodes' encrypted connections (model, hybrid)."""
    import asyncio

    from dllmd.data import DataError
    from dllmd.net.client import CallError
    from dllmctl.data.records import dataset_records
    from dllmctl.training.jobs import (TrainError, check_parallelism, federated_dataset, federated_options, job_spec,
                                       pipeline_options, submit)

    try:
        check_parallelism(parallelism)
        if parallelism == "federated":
            if not nodes:
                raise TrainError("a federated job needs --nodes (the first coordinates; every node with rows of "
                                 "the dataset is a client)")
            dataset = federated_dataset(data, model)
        else:
            dataset = dataset_records().load(data)
    except (TrainError, DataError) as exc:
        fail(str(exc))
    directory, _ = local_model(model)
    targets = _nodes(nodes or ",".join(row["node"] for row in dataset["nodes"]))
    if epochs is not None and max_steps is not None:
        fail("give --epochs or --max-steps, not both")
    try:
        layers = [int(n) for n in stage_layers.split(",")] if stage_layers else None
    except ValueError:
        fail(f"--stage-layers takes layer counts separated by commas, e.g. 3,2; got {stage_layers!r}")
    user = load_user()
    try:
        if parallelism == "federated":
            pipeline = federated_options(targets, rounds, local_steps, clients_per_round, min_clients, round_timeout,
                                         strategy, server_lr, server_momentum, proximal_mu, update_clip,
                                         secure_aggregation)
        else:
            pipeline = asyncio.run(pipeline_options(user, targets, directory, dataset, parallelism, dp, pp, schedule,
                                                    micro_batch_size, batch_size, layers, recompute))
        spec = job_spec(model, dataset, targets, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        epochs=epochs or (0 if max_steps else 1), max_steps=max_steps or 0, lr=lr,
                        warmup_steps=warmup_steps, grad_clip=grad_clip, weight_decay=weight_decay,
                        checkpoint_every=checkpoint_every, seed=seed, dtype=dtype, plaintext=plaintext, backend=backend,
                        **pipeline)
    except TrainError as exc:
        fail(str(exc))
    try:
        with err.status("starting...") as status:
            result = asyncio.run(submit(user, targets, directory, spec, stage=lambda s: status.update(s + "...")))
    except (TrainError, CallError, OSError) as exc:
        fail(str(exc))
    if not follow:
        if as_json:
            print_json(result)
        else:
            out.print(f"job {result['job']} started: {result['total_steps']} steps, coordinated by "
                      f"{result['coordinator']}; follow it with 'dllmctl metrics {result['job']} --follow'")
        return
    err.print(f"job {result['job']} started ({result['total_steps']} steps); Ctrl+C detaches, the job goes on")
    final = _follow(user, targets[0], result["job"], as_json)
    if as_json:
        print_json(final)


def _follow(user, coordinator: NodeEntry, job: str, as_json: bool) -> dict:
    """A progress bar with loss and tokens/s until the job ends; Ctrl+C only stops watching."""
    import asyncio

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                   TimeElapsedColumn(), console=err, transient=as_json)
    task = bar.add_task(job, total=None, loss="-", speed="-")
    after = -1
    try:
        with bar:
            while True:
                status = asyncio.run(job_call(user, coordinator, S.JOBS_METRICS, {"job": job, "after_step": after}))
                for row in status["metrics"]:
                    after = row["step"]
                    bar.update(task, loss=f"{row['loss']:.4f}", speed=f"{row['tokens_per_s']:.0f}")
                bar.update(task, total=status["total_steps"], completed=status["step"])
                if status["state"] in ("done", "stopped", "failed", "interrupted"):
                    break
                time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        err.print(f"detached; job {job} goes on ('dllmctl jobs show {job}')")
        raise typer.Exit(0)
    except CallError as exc:
        fail(f"lost contact with the coordinator: {exc}")
    shown = asyncio.run(job_call(user, coordinator, S.JOBS_SHOW, {"job": job}))
    if not as_json:
        _print_job(shown)
    if shown["state"] == "failed":
        if as_json:
            print_json(shown)
        raise typer.Exit(1)
    return shown


def _locate(job: str) -> tuple:
    import asyncio

    from dllmctl.training.jobs import TrainError, find_coordinator

    user = load_user()
    try:
        return user, asyncio.run(find_coordinator(user, _nodes(None), job))
    except TrainError as exc:
        fail(str(exc))


@jobs_app.command("list")
def jobs_list(as_json: JsonOpt = False) -> None:
    """Jobs on every registered node's coordinator."""
    import asyncio

    from dllmctl.training.jobs import list_jobs

    jobs, unreachable = asyncio.run(list_jobs(load_user(), _nodes(None)))
    for line in unreachable:
        err.print(f"[yellow]not asked: {line}[/yellow]")
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        out.print("no jobs; start one with 'dllmctl train --model M --data D'")
        return
    table = Table("job", "state", "model", "dataset", "nodes", "step", "coordinator")
    for j in jobs:
        table.add_row(j["job"], j["state"], j["model"], j["dataset"], ",".join(j["nodes"]),
                      f"{j['step']}/{j['total_steps']}", j["coordinator"])
    out.print(table)


def _print_job(shown: dict) -> None:
    out.print(f"{shown['job']}: [bold]{shown['state']}[/bold], step {shown['step']}/{shown['total_steps']}, "
              f"{shown['model']} on {shown['dataset']} ({', '.join(shown['nodes'])})")
    if shown.get("error"):
        out.print(f"[red]{shown['error']}[/red]")
    last = shown.get("last_metrics")
    if last:
        out.print(f"last step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, "
                  f"compute {last['compute_s']:.2f} s, communication {last['comm_s']:.2f} s")
        if "bubble" in last:
            out.print(f"pipeline bubble {last['bubble']:.0%} (theory {last['bubble_theoretical']:.0%} for this "
                      f"schedule's micro-batches), {human_bytes(last['bytes_between_stages'])} between stages")
    federation = shown.get("federation")
    if federation:
        privacy = f", epsilon {federation['epsilon']:.3g} at delta {federation['delta']:g}" \
            if federation.get("epsilon") is not None else ""
        out.print(f"federated ({federation['strategy']}{', secure aggregation' if federation['secure_aggregation'] else ''}"
                  f"): round {federation['round']}/{federation['rounds']}, {federation['stragglers']} straggler(s), "
                  f"{federation['dropouts']} dropout(s), {federation['failed_rounds']} round(s) retried{privacy}")
        table = Table("client", "rows", "rounds", "last round", "loss there")
        for c in federation["clients"]:
            table.add_row(c["node"], str(c["rows"]), str(c["rounds"]), "-" if c["last_round"] is None else
                          str(c["last_round"]), "-" if c["last_loss"] is None else f"{c['last_loss']:.4f}")
        out.print(table)
    if shown.get("stages"):
        table = Table("node", "replica", "stage", "layers", "memory (est.)", "compute s", "busy", "activations")
        for n in shown["stages"]:
            table.add_row(n["node"] + ("" if n["live"] else " (lost)"), str(n["replica"]), str(n["stage"]),
                          f"{n['start']}-{n['end'] - 1}", human_bytes(n["memory_needed"]),
                          f"{n['compute_s']:.2f}" if n["compute_s"] is not None else "-",
                          f"{n['busy']:.0%}" if n["busy"] is not None else "-",
                          human_bytes(n["activation_bytes"]))
        out.print(table)
    for event in shown.get("events", []):
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(event['time']))} {event['kind']}: {event['message']}")


@jobs_app.command("show")
def jobs_show(job: str, as_json: JsonOpt = False) -> None:
    """A job's state, last metrics, events and checkpoints."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = _locate(job)
    shown = asyncio.run(job_call(user, node, S.JOBS_SHOW, {"job": job}))
    if as_json:
        print_json({**shown, "coordinator": node.name})
        return
    _print_job(shown)


@jobs_app.command("stop")
def jobs_stop(job: str, as_json: JsonOpt = False) -> None:
    """Stop after the current step, with a checkpoint (resume later)."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = _locate(job)
    result = asyncio.run(job_call(user, node, S.JOBS_STOP, {"job": job}))
    print_json(result) if as_json else out.print(f"{job}: {result['state']}")


@jobs_app.command("resume")
def jobs_resume(job: str, follow: Annotated[bool, typer.Option("--follow/--detach")] = False,
                as_json: JsonOpt = False) -> None:
    """Continue a stopped, interrupted or failed job from its latest checkpoint."""
    import asyncio

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = _locate(job)
    try:
        current = [{"name": n.name, "address": n.address, "public_key": n.public_key} for n in _nodes(None)]
        result = asyncio.run(job_call(user, node, S.JOBS_RESUME, {"job": job, "nodes": current}, timeout=900))
    except CallError as exc:
        fail(str(exc))
    if follow:
        final = _follow(user, node, job, as_json)
        if as_json:
            print_json(final)
        return
    print_json(result) if as_json else out.print(f"{job}: resumed from step {result['from_step']}")


def metrics_command(
    job: str,
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new steps (NDJSON with --json).")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write the loss curve to this PNG file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-step loss, learning rate, gradient norm, tokens/s and compute/communication time."""
    import asyncio

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = _locate(job)
    rows, after = [], -1
    try:
        while True:
            status = asyncio.run(job_call(user, node, S.JOBS_METRICS, {"job": job, "after_step": after}))
            fresh = status["metrics"]
            rows += fresh
            if fresh:
                after = fresh[-1]["step"]
            if follow:
                for row in fresh:
                    print(json.dumps(row), flush=True) if as_json else _print_metric(row)
                if status["state"] not in ("running", "stopping", "queued"):
                    break
                time.sleep(FOLLOW_POLL_S)
            elif len(fresh) < 1000:
                break
    except KeyboardInterrupt:
        raise typer.Exit(0)
    except CallError as exc:
        fail(str(exc))
    if plot is not None:
        from dllmctl.training.plot import loss_plot

        try:
            loss_plot(rows, plot, title=job)
        except OSError as exc:
            fail(f"cannot write {plot}: {exc}")
        err.print(f"wrote {plot}")
    if follow:
        return
    if as_json:
        print_json(rows)
        return
    if rows and "sampled" in rows[0]:
        out.print(_rounds_table(rows))
        return
    pipeline = bool(rows) and "bubble" in rows[0]
    columns = ["step", "loss", "lr", "grad norm", "tokens/s", "step s", "compute s", "comm s"]
    table = Table(*columns, *(["bubble", "between stages"] if pipeline else []))
    for row in rows:
        cells = [str(row["step"]), f"{row['loss']:.4f}", f"{row['lr']:.2e}", f"{row['grad_norm']:.3f}",
                 f"{row['tokens_per_s']:.0f}", f"{row['step_s']:.3f}", f"{row['compute_s']:.3f}", f"{row['comm_s']:.3f}"]
        if pipeline:
            cells += [f"{row['bubble']:.0%}", human_bytes(row["bytes_between_stages"])]
        table.add_row(*cells)
    out.print(table)


def _rounds_table(rows: list[dict]) -> Table:
    """A federated job's rounds: the global model's loss on the clients' data, theirs after training."""
    table = Table("round", "global loss", "local loss", "lr", "clients", "left out", "tokens/s", "round s")
    for row in rows:
        missing = row["stragglers"] + row["dropped"]
        table.add_row(str(row["step"]), f"{row['loss']:.4f}", f"{row['local_loss']:.4f}", f"{row['lr']:.2e}",
                      ", ".join(row["nodes"]), ", ".join(missing) or "-", f"{row['tokens_per_s']:.0f}",
                      f"{row['step_s']:.2f}")
    return table


def _print_metric(row: dict) -> None:
    if "sampled" in row:  # a federated round: each client's loss on its own data
        clients = ", ".join(f"{name} {c['loss_before']:.4f}->{c['loss_after']:.4f}" for name, c in row["nodes"].items())
        out.print(f"round {row['step']}: global loss {row['loss']:.4f} ({clients}); {row['tokens_per_s']:.0f} tok/s")
        return
    out.print(f"step {row['step']}: loss {row['loss']:.4f} lr {row['lr']:.2e} grad norm {row['grad_norm']:.3f} "
              f"{row['tokens_per_s']:.0f} tok/s (compute {row['compute_s']:.2f} s, comm {row['comm_s']:.2f} s)")


@checkpoints_app.command("list")
def checkpoints_list(job: str, as_json: JsonOpt = False) -> None:
    """A job's checkpoints."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = _locate(job)
    result = asyncio.run(job_call(user, node, S.CHECKPOINTS_LIST, {"job": job}))
    if as_json:
        print_json(result["checkpoints"])
        return
    table = Table("step", "loss", "size", "path")
    for c in result["checkpoints"]:
        table.add_row(str(c["step"]), f"{c['loss']:.4f}" if c.get("loss") is not None else "-", human_bytes(c["bytes"]),
                      c["path"])
    out.print(table)


@checkpoints_app.command("show")
def checkpoints_show(job: str, step: Annotated[Optional[int], typer.Option(help="Default: the latest.")] = None,
                     as_json: JsonOpt = False) -> None:
    """One checkpoint: its step, loss, files and where it lives."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = _locate(job)
    result = asyncio.run(job_call(user, node, S.CHECKPOINTS_LIST, {"job": job}))
    chosen = [c for c in result["checkpoints"] if step is None or c["step"] == step]
    if not chosen:
        fail(f"job {job} has no checkpoint" + (f" at step {step}" if step is not None else ""))
    checkpoint = {**chosen[-1], "coordinator": node.name}
    if as_json:
        print_json(checkpoint)
        return
    for key, value in checkpoint.items():
        out.print(f"{key}: {value}")


@checkpoints_app.command("export")
def checkpoints_export(
    job: str,
    name: Annotated[str, typer.Option(help="Name of the fine-tuned model in the local store.")],
    step: Annotated[Optional[int], typer.Option(help="Default: the latest checkpoint.")] = None,
    directory: Annotated[Optional[Path], typer.Option("--dir", help="Also keep the transformers directory here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a checkpoint as a transformers model directory and import it into the model store."""
    import asyncio
    import tempfile

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.models import local_store
    from dllmctl.models.importer import ModelImportError, import_model
    from dllmctl.training.export import export_checkpoint
    from dllmctl.training.jobs import TrainError, job_call

    user, node = _locate(job)
    shown = asyncio.run(job_call(user, node, S.JOBS_SHOW, {"job": job}))
    base, _ = local_model(shown["spec"]["model"])
    with tempfile.TemporaryDirectory(prefix="dllm-export-") as tmp:
        target = directory or Path(tmp) / "model"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            registered = {n.name: n.public_key for n in _nodes(None)}
            signers = [registered[name] for name in shown["nodes"] if name in registered]  # pinned, not told
            exported = asyncio.run(export_checkpoint(user, node, job, step, base, target, signers))
            manifest = import_model(target, local_store(), user, name, force=True)
        except (TrainError, CallError, ModelImportError, OSError) as exc:
            fail(str(exc))
    report = {**exported, "model": manifest.name, "params": manifest.params,
              "directory": str(directory) if directory else None}
    if as_json:
        print_json(report)
        return
    out.print(f"exported step {exported['step']} of {job} as model {manifest.name} "
              f"({manifest.params / 1e6:.1f}M params); deploy it with 'dllmctl deploy {manifest.name}'")
