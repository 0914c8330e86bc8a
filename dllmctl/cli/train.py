"""``dllmctl train`` and ``dllmctl jobs`` (``dllmctl metrics`` is :mod:`dllmctl.cli.metrics`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import (JsonOpt, err, fail, human_bytes, load_user, local_model, locate_job, maybe_number,
                                out, print_json, select_nodes)

if TYPE_CHECKING:
    from dllmctl.cluster.registry import NodeEntry

# The training client (zmq, keys, the protocol) is imported in the commands: 'dllmctl --help' loads this module.
jobs_app = typer.Typer(help="Training jobs: list, show, stop, resume.", no_args_is_help=True)

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
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Global gradient norm clip (0: none; not applied under "
                                                           "--dp-clip).")] = 1.0,
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
    balance: Annotated[str, typer.Option(help="Planned stages balance compute (the smallest bubble) or memory "
                                              "(the smallest share of any node's memory).")] = "compute",
    shard_copies: Annotated[int, typer.Option(min=1, max=16, help="Spare copies of each shard, on disk on other "
                                                                 "nodes: the job survives that many nodes lost "
                                                                 "at once.")] = 2,
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
    dp_clip: Annotated[float, typer.Option(help="Differential privacy: clip each example's gradient (DP-SGD, "
                                                "--parallelism data) or each client's update (federated) to this "
                                                "L2 norm (0: off).")] = 0.0,
    dp_noise_multiplier: Annotated[float, typer.Option(help="DP: each step's summed gradient (each round's "
                                                            "summed update) gets Gaussian noise of std this x "
                                                            "--dp-clip.")] = 0.0,
    dp_delta: Annotated[float, typer.Option(help="DP: the delta epsilon is counted at (keep it well below "
                                                 "1 / the dataset's rows, or clients).")] = 1e-5,
    dp_epsilon_budget: Annotated[float, typer.Option(help="DP: end the job (done, with a checkpoint) before a "
                                                          "step or round would spend more epsilon than this (0: no "
                                                          "budget).")] = 0.0,
    sync_every: Annotated[int, typer.Option(min=0, max=1_000_000, help="DiLoCo: each node takes this many AdamW "
                                                                       "steps on its own rows, then the nodes average "
                                                                       "how far they moved (0: sync every step).")] = 0,
    outer_lr: Annotated[float, typer.Option(help="DiLoCo: the outer Nesterov step's learning rate.")] = 0.7,
    outer_momentum: Annotated[float, typer.Option(help="DiLoCo: the outer step's momentum.")] = 0.9,
    compress: Annotated[str, typer.Option(help="What the all-reduce sends: none, fp16, int8 (blockwise) or "
                                               "powersgd:RANK, with error feedback (every step's gradient, or "
                                               "DiLoCo's pseudo-gradient).")] = "none",
    overlap: Annotated[bool, typer.Option("--overlap", help="All-reduce gradient buckets during the last "
                                                             "micro-batch's backward (uncompressed, zmq ring).")] = False,
    overlap_bucket_mb: Annotated[float, typer.Option(min=0.001, max=16384.0, help="--overlap: gradient MB per "
                                                                                  "bucket.")] = 25.0,
    eval_text: Annotated[Optional[Path], typer.Option(help="A held-out UTF-8 text whose loss the job scores at "
                                                           "every checkpoint and at the end (metrics: heldout_loss).",
                                                      exists=True, dir_okay=False, readable=True)] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(help="Hold out this fraction of every shard's rows (0-0.5, "
                                                                "drawn with --seed), never trained on; metrics: "
                                                                "eval_loss, eval_perplexity, eval_accuracy.")] = None,
    eval_data: Annotated[Optional[str], typer.Option(help="Score every row of this other sharded dataset instead "
                                                          "(on the job's nodes).")] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, max=100_000_000, help="Evaluate every this many steps "
                                                                                   "(default: at every checkpoint) "
                                                                                   "and at the end.")] = None,
    alert_command: Annotated[Optional[str], typer.Option(help="While following: run this command (no shell) on each "
                                                              "alert of the job, the alert's JSON on its stdin.")] = None,
    alert_webhook: Annotated[Optional[str], typer.Option(help="While following: POST each alert's JSON here.")] = None,
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
    from dllmctl.training.jobs import (TrainError, check_parallelism, eval_options, federated_dataset,
                                       federated_options, job_spec, pipeline_options, submit)

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
    heldout = _heldout_tokens(directory, eval_text) if eval_text is not None else {}
    sink = _alert_sink(alert_command, alert_webhook)
    try:
        heldout.update(eval_options(eval_fraction, eval_data, eval_every, model, parallelism,
                                    heldout=bool(heldout)))
        if parallelism == "federated":
            pipeline = federated_options(targets, rounds, local_steps, clients_per_round, min_clients, round_timeout,
                                         strategy, server_lr, server_momentum, proximal_mu, update_clip,
                                         secure_aggregation, dp_clip)
        else:
            pipeline = asyncio.run(pipeline_options(user, targets, directory, dataset, parallelism, dp, pp, schedule,
                                                    micro_batch_size, batch_size, layers, recompute, balance))
        spec = job_spec(model, dataset, targets, batch_size=batch_size, micro_batch_size=micro_batch_size,
                        epochs=epochs or (0 if max_steps else 1), max_steps=max_steps or 0, lr=lr,
                        warmup_steps=warmup_steps, grad_clip=grad_clip, weight_decay=weight_decay,
                        checkpoint_every=checkpoint_every, seed=seed, dtype=dtype, plaintext=plaintext, backend=backend,
                        shard_copies=shard_copies, dp_clip=dp_clip, dp_noise_multiplier=dp_noise_multiplier, dp_delta=dp_delta,
                        dp_epsilon_budget=dp_epsilon_budget, sync_every=sync_every, outer_lr=outer_lr,
                        outer_momentum=outer_momentum, compress=compress, overlap=overlap,
                        overlap_bucket_bytes=max(1024, int(overlap_bucket_mb * 2**20)), **heldout, **pipeline)
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
    final = _follow(user, targets[0], result["job"], as_json, sink)
    if as_json:
        print_json(final)


def _heldout_tokens(model_dir: Path, text: Path) -> dict:
    """The JobSpec fields of a held-out text: its first token ids and the window they are scored in."""
    from dllmctl.training.jobs import TrainError, heldout_fields

    try:
        return heldout_fields(model_dir, text.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, TrainError) as exc:
        fail(f"cannot use {text} as the held-out text: {exc}")


def _alert_sink(command: Optional[str], webhook: Optional[str]):
    """This user's own delivery of a job's alerts (None: none asked for); refused if it cannot run."""
    if not command and not webhook:
        return None
    from dllmd.alerts import AlertError, AlertSettings, AlertSink

    try:
        return AlertSink.of(AlertSettings(command=command or "", webhook=webhook or ""))
    except AlertError as exc:
        fail(str(exc).replace("alerts.command", "--alert-command").replace("alerts.webhook", "--alert-webhook"))


def _follow(user, coordinator: NodeEntry, job: str, as_json: bool, sink=None) -> dict:
    """A progress bar with loss and tokens/s until the job ends; Ctrl+C only stops watching. With a
    ``sink``, every alert of the job is delivered to it as it appears."""
    import asyncio

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.alerts import AlertFollower
    from dllmctl.training.jobs import job_call

    follower = AlertFollower(sink) if sink is not None else None
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
                    bar.update(task, loss=maybe_number(row["loss"], ".4f"), speed=f"{row['tokens_per_s']:.0f}")
                bar.update(task, total=status["total_steps"], completed=status["step"])
                if follower is not None:
                    events = asyncio.run(job_call(user, coordinator, S.JOBS_SHOW, {"job": job}))["events"]
                    for alert in follower.feed(events):
                        err.print(f"[yellow]alert {alert.code}[/yellow]: {alert.message}")
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
        out.print(f"last step {last['step']}: loss {maybe_number(last['loss'], '.4f')}, {last['tokens_per_s']:.0f} "
                  f"tokens/s, compute {last['compute_s']:.2f} s, communication {last['comm_s']:.2f} s")
        if "heldout_loss" in last:
            out.print(f"held-out loss {last['heldout_loss']:.4f}")
        evaluated = _last_eval(shown)
        if evaluated:
            out.print(f"held-out rows after step {evaluated['step']}: loss {evaluated['eval_loss']:.4f}, perplexity "
                      f"{evaluated['eval_perplexity']:.2f}, next-token accuracy {evaluated['eval_accuracy']:.1%} "
                      f"({evaluated['eval_tokens']} tokens)")
        if "bubble" in last:
            out.print(f"pipeline bubble {last['bubble']:.0%} (theory {last['bubble_theoretical']:.0%} for this "
                      f"schedule's micro-batches), {human_bytes(last['bytes_between_stages'])} between stages")
    federation = shown.get("federation")
    if federation:
        out.print(f"federated ({federation['strategy']}{', secure aggregation' if federation['secure_aggregation'] else ''}"
                  f"): round {federation['round']}/{federation['rounds']}, {federation['stragglers']} straggler(s), "
                  f"{federation['dropouts']} dropout(s), {federation['failed_rounds']} round(s) retried")
        table = Table("client", "rows", "rounds", "last round", "loss there")
        for c in federation["clients"]:
            table.add_row(c["node"], str(c["rows"]), str(c["rounds"]), "-" if c["last_round"] is None else
                          str(c["last_round"]), "-" if c["last_loss"] is None else f"{c['last_loss']:.4f}")
        out.print(table)
    privacy = shown.get("privacy")
    if privacy:
        budget = f", budget {privacy['epsilon_budget']:g}" if privacy["epsilon_budget"] else ""
        out.print(f"differential privacy: epsilon {privacy['epsilon']:.4g} spent at delta {privacy['delta']:g} "
                  f"after {privacy['steps']} steps{budget} (clip {privacy['clip']:g}, noise multiplier "
                  f"{privacy['noise_multiplier']:g}, sample rate {privacy['sample_rate']:.4g})")
    if shown.get("stages"):
        table = Table("node", "replica", "stage", "layers", "memory (est.)", "compute s", "busy", "activations")
        for n in shown["stages"]:
            table.add_row(n["node"] + ("" if n["live"] else " (lost)"), str(n["replica"]), str(n["stage"]),
                          f"{n['start']}-{n['end'] - 1}", human_bytes(n["memory_needed"]),
                          f"{n['compute_s']:.2f}" if n["compute_s"] is not None else "-",
                          f"{n['busy']:.0%}" if n["busy"] is not None else "-",
                          human_bytes(n["activation_bytes"]))
        out.print(table)
    from dllmd.alerts import Alert

    for event in shown.get("events", []):
        alert = Alert.from_event(event)
        message = (f"[{'red' if alert.severity == 'critical' else 'yellow'}]{alert.severity}[/]: {alert.message}"
                   if alert else event["message"])
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(event['time']))} {event['kind']}: {message}")


def _last_eval(shown: dict) -> dict | None:
    """The latest held-out evaluation a job reports (``jobs show``'s ``last_eval``, or its last step)."""
    row = shown.get("last_eval") or shown.get("last_metrics") or {}
    return row if "eval_loss" in row else None


@jobs_app.command("show")
def jobs_show(job: str, as_json: JsonOpt = False) -> None:
    """A job's state, last metrics, events and checkpoints."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = locate_job(job)
    shown = asyncio.run(job_call(user, node, S.JOBS_SHOW, {"job": job}))
    if as_json:
        print_json({**shown, "coordinator": node.name})
        return
    _print_job(shown)


@jobs_app.command("watch")
def jobs_watch(job: str,
               alert_command: Annotated[Optional[str], typer.Option(help="Run this command (no shell) on each alert, "
                                                                        "the alert's JSON on its stdin.")] = None,
               alert_webhook: Annotated[Optional[str], typer.Option(help="POST each alert's JSON here.")] = None,
               as_json: JsonOpt = False) -> None:
    """Follow a job's alerts until it ends (NDJSON with --json), delivering each with your own command or
    webhook; alerts raised before watching started are delivered too."""
    import asyncio

    from dllmd.alerts import AlertSink
    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.alerts import AlertFollower
    from dllmctl.training.jobs import job_call

    follower = AlertFollower(_alert_sink(alert_command, alert_webhook) or AlertSink())
    user, node = locate_job(job)
    try:
        while True:
            shown = asyncio.run(job_call(user, node, S.JOBS_SHOW, {"job": job}))
            for alert in follower.feed(shown["events"]):
                print(alert.to_json(), flush=True) if as_json else out.print(
                    f"{time.strftime('%H:%M:%S', time.localtime(alert.time))} {alert.code} ({alert.severity})"
                    f"{' ' + alert.node if alert.node else ''}: {alert.message}")
            if shown["state"] not in ("running", "stopping", "queued"):
                break
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        raise typer.Exit(0)
    except CallError as exc:
        fail(f"lost contact with the coordinator: {exc}")


@jobs_app.command("stop")
def jobs_stop(job: str, as_json: JsonOpt = False) -> None:
    """Stop after the current step, with a checkpoint (resume later)."""
    import asyncio

    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    user, node = locate_job(job)
    result = asyncio.run(job_call(user, node, S.JOBS_STOP, {"job": job}))
    print_json(result) if as_json else out.print(f"{job}: {result['state']}")


@jobs_app.command("resume")
def jobs_resume(job: str, follow: Annotated[bool, typer.Option("--follow/--detach")] = False,
                replace: Annotated[Optional[str], typer.Option(
                    help="Move stages onto other nodes: OLD=NEW[,OLD=NEW] (pipeline and hybrid jobs; the same "
                         "layers, from the checkpoint's parts).")] = None,
                as_json: JsonOpt = False) -> None:
    """Continue a stopped, interrupted or failed job from its latest checkpoint (a data-parallel job goes
    on without nodes that are gone)."""
    import asyncio

    from dllmd.net.client import CallError
    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import TrainError, job_call, prepare_replacements

    user, node = locate_job(job)
    registered = {n.name: n for n in _nodes(None)}
    try:
        pairs = []
        for pair in filter(None, (p.strip() for p in (replace or "").split(","))):
            old, sep, new = pair.partition("=")
            if not sep or new.strip() not in registered:
                fail(f"--replace takes OLD=NEW pairs of node names, NEW a registered node; got {pair!r}")
            pairs.append((old.strip(), registered[new.strip()]))
        moves = []
        if pairs:
            shown = asyncio.run(job_call(user, node, S.JOBS_SHOW, {"job": job}))
            directory, _ = local_model(shown["spec"]["model"])
            moves = asyncio.run(prepare_replacements(user, shown["spec"], directory, pairs))
        current = [{"name": n.name, "address": n.address, "public_key": n.public_key} for n in registered.values()]
        result = asyncio.run(job_call(user, node, S.JOBS_RESUME, {"job": job, "nodes": current, "replace": moves},
                                      timeout=900))
    except (CallError, TrainError) as exc:
        fail(str(exc))
    if follow:
        final = _follow(user, node, job, as_json)
        if as_json:
            print_json(final)
        return
    print_json(result) if as_json else out.print(f"{job}: resumed from step {result['from_step']}")
