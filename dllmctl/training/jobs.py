"""``dllmctl train`` and friends, the client's side: build a job from a model and a sharded dataset,
ship the model to every node, submit the job to its coordinator (the first node), and find jobs
again later by asking the nodes (job state lives with the coordinators, not here).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Callable

from dllmd.models.store import MANIFEST, TOKENIZER_FILES, Manifest
from dllmd.net.client import BadReply, CallError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages import training as S
from dllmd.net.messages.node import PING
from dllmd.net.schema import Op, parse_args, parse_reply, to_wire
from dllmd.net.wire import WireError
from dllmd.train.lowcomm import LowCommError, LowCommSettings
from dllmd.train.privacy.settings import PrivacyError, PrivacySettings
from dllmctl.cluster.registry import NodeEntry
from dllmctl.models.deploy import Progress, ship_files

PARALLELISMS = ("data", "model", "federated", "hybrid")
SUBMIT_TIMEOUT_S = 900.0  # the coordinator loads a replica on every node before it accepts
FIND_TIMEOUT_S = 5.0
CONFIG_FILES = ("generation_config.json", *TOKENIZER_FILES)  # copied next to an exported checkpoint


class TrainError(RuntimeError):
    """A job that cannot be submitted or found; the message says why."""


def check_parallelism(parallelism: str) -> None:
    if parallelism not in PARALLELISMS:
        raise TrainError(f"--parallelism must be one of {', '.join(PARALLELISMS)}")
    if parallelism not in S.PARALLELISMS_BUILT:
        raise TrainError(f"--parallelism {parallelism} is not built yet; {', '.join(S.PARALLELISMS_BUILT)} are")


def pipeline_shape(parallelism: str, nodes: int, dp: int | None, pp: int | None) -> tuple[int, int]:
    """(replicas, stages) of a pipeline job on ``nodes`` nodes: ``--pp`` stages (default: every node
    for ``model``), ``--dp`` replicas of them (``hybrid``; default: as many as the nodes make)."""
    if parallelism == "model":
        if dp not in (None, 1):
            raise TrainError("--parallelism model runs one pipeline; for replicas of it use --parallelism hybrid")
        stages = pp or nodes
        if stages != nodes:
            raise TrainError(f"--pp {stages} needs {stages} nodes (one per stage); {nodes} given with --nodes")
        return 1, stages
    if not pp and not dp:
        raise TrainError("--parallelism hybrid needs --pp (stages per replica), --dp (replicas) or both")
    stages = pp or nodes // dp
    replicas = dp or nodes // stages
    if replicas * stages != nodes:
        raise TrainError(f"--dp {replicas} x --pp {stages} needs {replicas * stages} nodes; {nodes} given with --nodes")
    return replicas, stages


async def pipeline_options(user: Identity, nodes: list[NodeEntry], model_dir: Path, dataset: dict, parallelism: str,
                           dp: int | None, pp: int | None, schedule: str, micro_batch_size: int, batch_size: int,
                           stage_layers: list[int] | None, recompute: bool, balance: str = "compute") -> dict:
    """The :class:`JobSpec` fields of a pipeline or hybrid job (none for data parallelism): its
    replicas, stages and their layers, schedule. What ``dllmctl train`` and the MCP tool both submit."""
    if parallelism == "data":
        return {}
    replicas, stages = pipeline_shape(parallelism, len(nodes), dp, pp)
    spans = await plan_pipeline(user, nodes, model_dir, dataset, replicas, stages, schedule, micro_batch_size,
                                batch_size, stage_layers, balance)
    return {"parallelism": parallelism, "replicas": replicas, "stages": spans, "schedule": schedule,
            "recompute": recompute}


async def plan_pipeline(user: Identity, nodes: list[NodeEntry], model_dir: Path, dataset: dict, replicas: int,
                        stages: int, schedule: str, micro_batch_size: int, batch_size: int,
                        stage_layers: list[int] | None = None, balance: str = "compute") -> list[S.StageSpan]:
    """The stages' layer spans: as given (``--stage-layers``), else planned from the live nodes' free
    memory and speed for what training holds (weights, gradients, moments, in-flight activations):
    balanced by compute (``balance="compute"``, the smallest bubble) or by memory (``"memory"``: the
    smallest peak share of any node's memory)."""
    from dllmctl.cluster.live import query_nodes
    from dllmctl.placement.capacity import node_capacities
    from dllmctl.placement.layout import ModelShape, PlanError
    from dllmctl.placement.training import (BALANCES, TrainingLoad, plan_stages, plan_stages_by_memory,
                                            stages_from_counts, training_shape)
    from dllmd.train.footprint import layer_activation_bytes
    from dllmd.train.pipeline.schedule import actions, in_flight, max_in_flight

    if schedule not in S.SCHEDULES:
        raise TrainError(f"--schedule must be one of {', '.join(S.SCHEDULES)}, not {schedule!r}")
    if balance not in BALANCES:
        raise TrainError(f"--balance must be one of {', '.join(BALANCES)}, not {balance!r}")
    manifest = Manifest.from_bytes((model_dir / MANIFEST).read_bytes())
    try:
        if stage_layers:
            if len(stage_layers) != stages:
                raise PlanError(f"--stage-layers gives {len(stage_layers)} stages, the job has {stages}")
            spans = stages_from_counts(stage_layers, manifest.num_layers)
        else:
            capacity = {c.name: c for c in node_capacities(await query_nodes(user, nodes), rate="matmul")}
            down = [n.name for n in nodes if n.name not in capacity]
            if down:
                raise TrainError(f"node(s) {', '.join(down)} did not answer: nothing was started")
            config = json.loads((model_dir / "config.json").read_text())
            micro_batches = -(-batch_size // micro_batch_size)
            load = TrainingLoad(tokens_per_micro_batch=micro_batch_size * int(dataset.get("seq_len") or 2048),
                                in_flight=max_in_flight(schedule, stages, micro_batches),
                                activation_bytes_per_token=layer_activation_bytes(config),
                                vocab=int(config["vocab_size"]),
                                weight_itemsize={"float32": 4, "float16": 2, "bfloat16": 2}.get(manifest.dtype, 4))
            positions = [[capacity[n.name] for n in nodes[r * stages:(r + 1) * stages]] for r in range(replicas)]
            if balance == "memory":
                held = [in_flight(actions(schedule, s, stages, micro_batches)) for s in range(stages)]
                spans = plan_stages_by_memory(ModelShape.from_manifest(manifest), load, held, positions)
            else:
                spans = plan_stages(training_shape(ModelShape.from_manifest(manifest), load), positions)
    except PlanError as exc:
        raise TrainError(str(exc)) from None
    return [S.StageSpan(start, end) for start, end in spans]


def federated_options(nodes: list[NodeEntry], rounds: int | None, local_steps: int, clients_per_round: str | None,
                      min_clients: int, round_timeout: float, strategy: str, server_lr: float,
                      server_momentum: float, proximal_mu: float, update_clip: float,
                      secure_aggregation: bool, dp_clip: float = 0.0) -> dict:
    """The :class:`JobSpec` fields of a federated job. ``clients_per_round`` is a count (``3``) or a
    fraction of the nodes (``0.5``, ``50%``)."""
    if not rounds:
        raise TrainError("a federated job needs --rounds")
    if strategy not in S.STRATEGIES:
        raise TrainError(f"--strategy must be one of {', '.join(S.STRATEGIES)}, not {strategy!r}")
    per_round = clients_per_round_count(clients_per_round, len(nodes))
    if secure_aggregation and ((per_round or len(nodes)) < 3 or not (update_clip or dp_clip)):
        raise TrainError("--secure-aggregation needs at least 3 clients a round (with two, each would learn the "
                         "other's update from the sum) and --update-clip (it bounds the fixed-point range)")
    if min_clients > (per_round or len(nodes)):
        raise TrainError(f"--min-clients {min_clients} is more than the {per_round or len(nodes)} clients of a round")
    return {"parallelism": "federated", "rounds": rounds, "local_steps": local_steps, "clients_per_round": per_round,
            "min_clients": min_clients, "round_timeout": round_timeout, "strategy": strategy, "server_lr": server_lr,
            "server_momentum": server_momentum, "proximal_mu": proximal_mu, "update_clip": update_clip,
            "secure_aggregation": secure_aggregation}


def clients_per_round_count(text: str | None, nodes: int) -> int:
    """``--clients-per-round`` as a count of clients (0: all of them)."""
    if not text:
        return 0
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
        elif "." in text:
            fraction = float(text)
        else:
            count = int(text)
            if not 1 <= count <= nodes:
                raise TrainError(f"--clients-per-round {count} must be between 1 and the job's {nodes} nodes")
            return count
    except ValueError:
        raise TrainError(f"--clients-per-round takes a count (3) or a fraction (0.5, 50%), not {text!r}") from None
    if not 0 < fraction <= 1:
        raise TrainError(f"--clients-per-round as a fraction must be in (0, 1], not {text}")
    return max(1, round(fraction * nodes))


def federated_dataset(name: str, model: str) -> dict:
    """A federated job's dataset: each client holds its own rows (sharded on the node, perhaps by its
    own organization), so there is no record of them here; the clients report their rows."""
    return {"dataset": name, "model": model, "nodes": []}


MAX_HELDOUT_TOKENS = 12288  # JobSpec.eval_tokens' bound: the spec travels in one message header
HELDOUT_WINDOW = 256


def heldout_fields(model_dir: Path, text: str) -> dict:
    """The :class:`JobSpec` fields of a held-out text: its first token ids (by the model's tokenizer)
    and the window they are scored in (at most the model's positions)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"][:MAX_HELDOUT_TOKENS]
    if len(ids) < 2:
        raise TrainError("it holds fewer than 2 tokens")
    positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", HELDOUT_WINDOW)
    return {"eval_tokens": ids, "eval_window": min(HELDOUT_WINDOW, int(positions))}


def eval_options(fraction: float | None, dataset: str | None, every: int | None, model: str, parallelism: str,
                 heldout: bool = False) -> dict:
    """The :class:`JobSpec` fields of held-out rows (``--eval-fraction`` or ``--eval-data``, ``--eval-every``),
    checked: a fraction in (0, 0.5], a dataset that exists here (a federated one lives with its clients)
    and was tokenized for ``model``, evaluation every K >= 1 steps of held-out data."""
    if fraction is not None and not 0 < fraction <= S.EVAL_FRACTION_MAX:
        raise TrainError(f"--eval-fraction must be in (0, {S.EVAL_FRACTION_MAX}], not {fraction:g}")
    if fraction is not None and dataset:
        raise TrainError("give --eval-fraction or --eval-data, not both")
    if every is not None and (every < 1 or not (fraction or dataset or heldout)):
        raise TrainError("--eval-every K takes K >= 1 and held-out data: --eval-fraction, --eval-data or --eval-text")
    if dataset and parallelism != "federated":
        from dllmd.data import DataError
        from dllmctl.data.records import dataset_records

        try:
            record = dataset_records().load(dataset)
        except DataError as exc:
            raise TrainError(f"--eval-data: {exc}") from None
        if record.get("model") and record["model"] != model:
            raise TrainError(f"--eval-data {dataset} was tokenized for {record['model']}, not {model}")
    return {"eval_fraction": fraction or 0.0, "eval_dataset": dataset or "", "eval_every": every or 0}


def _shard_refs(dataset: dict, by_name: dict[str, NodeEntry]) -> list[S.ShardRef]:
    """A dataset record's shards on the job's nodes; one with rows elsewhere is refused."""
    shards = []
    for row in dataset["nodes"]:
        node = by_name.get(row["node"])
        if node is None and row["sequences"]:
            raise TrainError(f"dataset {dataset['dataset']} has a shard on {row['node']}, which is not among the "
                             f"job's nodes ({', '.join(by_name)}): add it with --nodes")
        if node is not None:
            shards.append(S.ShardRef(id=node.public_key, node=node.name, rows=row["sequences"], sha256=row["sha256"]))
    return shards


def job_spec(model: str, dataset: dict, nodes: list[NodeEntry], **options) -> S.JobSpec:
    """The job as the coordinator receives it: nodes (the first coordinates) and the dataset's shards
    (and ``--eval-data``'s). Differential privacy and communication settings (DiLoCo, compression,
    overlap) are checked here too, so nothing is shipped for a job that is refused."""
    by_name = {n.name: n for n in nodes}
    shards = _shard_refs(dataset, by_name)
    if dataset.get("model") and dataset["model"] != model:
        raise TrainError(f"dataset {dataset['dataset']} was tokenized for {dataset['model']}, not {model}: "
                         f"re-shard it with --model {model}")
    if options.get("eval_dataset") and options.get("parallelism", "data") != "federated":
        from dllmctl.data.records import dataset_records

        options["eval_shards"] = _shard_refs(dataset_records().load(options["eval_dataset"]), by_name)
    spec = S.JobSpec(model=model, dataset=dataset["dataset"],
                     nodes=[S.NodeRef(n.name, n.address, n.public_key) for n in nodes], shards=shards, **options)
    try:
        private = PrivacySettings.of(spec)
        private.check(spec.parallelism, spec.dtype)
        LowCommSettings.of(spec).check(spec.parallelism, spec.backend, private.enabled)
    except (PrivacyError, LowCommError) as exc:
        raise TrainError(str(exc)) from None
    return spec


async def submit(user: Identity, nodes: list[NodeEntry], model_dir: Path, spec: S.JobSpec,
                 progress: Progress = lambda *_: None, stage: Callable[[str], None] = lambda _: None) -> dict:
    """Ship the model to every node (the whole of it to a data-parallel replica, a stage's span to a
    stage; skipping what they have), then submit to the first node."""
    manifest = Manifest.from_bytes((model_dir / MANIFEST).read_bytes())
    if spec.parallelism == "federated":
        nodes = nodes[:1]  # the coordinator sends the clients the weights each round; they may not be ours
    files = [node_files(manifest, spec, i) for i in range(len(nodes))]
    clients = [RpcClient(user, n.address, n.public_key) for n in nodes]
    try:
        stage("checking nodes")
        pings = await asyncio.gather(*(c.call("ping", timeout=FIND_TIMEOUT_S) for c in clients), return_exceptions=True)
        down = [n.name for n, r in zip(nodes, pings) if isinstance(r, BaseException)]
        if down:
            raise TrainError(f"node(s) {', '.join(down)} did not answer: nothing was started")
        stage("sending the model")
        await asyncio.gather(*(ship_files(c, n.name, model_dir, f, progress) for c, n, f in zip(clients, nodes, files)))
        stage("loading replicas")
        submitted, _ = await clients[0].invoke(S.JOBS_SUBMIT, spec, timeout=SUBMIT_TIMEOUT_S)
        return to_wire(submitted)
    finally:
        for client in clients:
            client.close()


async def prepare_replacements(user: Identity, spec: dict, model_dir: Path,
                               pairs: list[tuple[str, NodeEntry]]) -> list[dict]:
    """``jobs resume --replace OLD=NEW``: send each new node the model files of the stage it takes over
    (from the local store), and the resume's ``replace`` list. OLD is a node name of the job."""
    job_spec_ = parse_args(S.JobSpec, spec)
    if job_spec_.parallelism not in ("model", "hybrid"):
        raise TrainError("--replace moves pipeline stages; a data-parallel job resumes without the nodes that "
                         "are gone")
    manifest = Manifest.from_bytes((model_dir / MANIFEST).read_bytes())
    names = [n.name for n in job_spec_.nodes]
    replace = []
    for old, new in pairs:
        if old not in names:
            raise TrainError(f"{old} is not a node of this job (its nodes: {', '.join(names)})")
        files = node_files(manifest, job_spec_, names.index(old))
        async with RpcClient(user, new.address, new.public_key) as client:
            try:
                await client.call("ping", timeout=FIND_TIMEOUT_S)
            except CallError:
                raise TrainError(f"{new.name} did not answer: nothing was moved") from None
            await ship_files(client, new.name, model_dir, files)
        replace.append({"old": job_spec_.nodes[names.index(old)].public_key,
                        "new": {"name": new.name, "address": new.address, "public_key": new.public_key}})
    return replace


def node_files(manifest: Manifest, spec: S.JobSpec, index: int) -> list[str]:
    """The model files node ``index`` of the job loads (replica-major stages in a pipeline job)."""
    if spec.parallelism in ("data", "federated"):
        return manifest.span_files(0, manifest.num_layers, True, True)
    span = spec.stages[index % len(spec.stages)]
    return manifest.span_files(span.start, span.end, span.start == 0, span.end == manifest.num_layers)


async def ask_all(user: Identity, nodes: list[NodeEntry], op: Op, args: dict) -> list[tuple[NodeEntry, dict | Exception]]:
    """``op`` on every node at once (a node that is down is given up on after a ping); the checked
    replies as maps, or the error each node gave."""
    return list(await asyncio.gather(*(_ask(user, n, op, args) for n in nodes)))


async def _ask(user: Identity, node: NodeEntry, op: Op, args: dict) -> tuple[NodeEntry, dict | Exception]:
    async with RpcClient(user, node.address, node.public_key) as client:
        try:
            await client.invoke(PING, timeout=FIND_TIMEOUT_S)
            return node, await _typed_call(client, op, args, 60.0)
        except CallError as exc:
            return node, exc


async def list_jobs(user: Identity, nodes: list[NodeEntry]) -> tuple[list[dict], list[str]]:
    """Every job on every reachable node, and the nodes that could not be asked."""
    jobs, unreachable = [], []
    for node, result in await ask_all(user, nodes, S.JOBS_LIST, {}):
        if isinstance(result, Exception):
            unreachable.append(f"{node.name}: {result}")
            continue
        jobs += [{**job, "coordinator": node.name} for job in result["jobs"]]
    return sorted(jobs, key=lambda j: j["created"]), unreachable


async def find_coordinator(user: Identity, nodes: list[NodeEntry], job: str) -> NodeEntry:
    """The node that knows ``job``: the first to say so. One node coordinates a job, so a node that is
    down (given up on only after a ping's timeout) holds up the answer only when no other knows it."""
    asks = [asyncio.ensure_future(_ask(user, n, S.JOBS_SHOW, {"job": job})) for n in nodes]
    try:
        for answered in asyncio.as_completed(asks):
            node, result = await answered
            if not isinstance(result, Exception):
                return node
    finally:
        for ask in asks:
            ask.cancel()
        await asyncio.gather(*asks, return_exceptions=True)
    raise TrainError(f"no reachable node coordinates job {job!r}; see 'dllmctl jobs list'")


async def job_call(user: Identity, node: NodeEntry, op: Op, args: dict, timeout: float = 60.0) -> dict:
    """One of the coordinator's operations (``jobs.*``, ``checkpoints.list``) on ``node``: its reply,
    checked against the op's reply type, as the map the CLI prints and the MCP views show."""
    async with RpcClient(user, node.address, node.public_key) as client:
        return await _typed_call(client, op, args, timeout)


async def job_metrics(user: Identity, node: NodeEntry, job: str, after_step: int = -1) -> dict:
    """A job's metrics reply with every row after ``after_step``, however many replies they take."""
    rows = []
    while True:
        page = await job_call(user, node, S.JOBS_METRICS, {"job": job, "after_step": after_step})
        rows += page["metrics"]
        if not page["more"] or not page["metrics"]:
            return {**page, "metrics": rows, "more": False}
        after_step = rows[-1]["step"]


async def _typed_call(client: RpcClient, op: Op, args: dict, timeout: float) -> dict:
    result, _ = await client.call(op.name, to_wire(parse_args(op.args, args)), timeout=timeout)
    try:
        return to_wire(parse_reply(op.reply, result))
    except WireError as exc:
        raise BadReply(f"{client.address} answered '{op.name}' with a {exc.message}") from None
