"""A job's coordinator, running inside one of its daemons (the job's first node), so the job outlives
the terminal that submitted it.

Per step: send every worker its rows of the global batch (``train.step``: compute and all-reduce),
and only when all of them succeeded, ``train.apply``. A failed step is cleaned up instead: the
coordinator pings the workers, drops those that are gone, resets the others' ring (their half-done
step is discarded), moves each lost shard to a survivor holding a copy, re-forms the ring with a
new generation and runs the same step again. Every shard is copied to one other worker at the start
(``train.backup``), so one lost node never loses data.

Checkpoints are taken from the coordinator's own replica (identical to every other) every K steps,
on stop and at the end; ``jobs resume`` loads the latest into fresh replicas and rewinds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

import torch

from dllmd.alerts import AlertSink
from dllmd.models.dtypes import TRAIN_DTYPES
from dllmd.net.chunked import int8_tensor
from dllmd.net.client import CallError, RpcClient
from dllmd.net.schema import to_wire
from dllmd.train.service import TRAINING_DIAL
from dllmd.net.server import Call, HandlerError, Operation, RpcServer
from dllmd.net.wire import ErrorCode
from dllmd.train import schedule
from dllmd.net.messages import training as S
from dllmd.train.checkpoint import CheckpointError, Checkpoints, NoRoomForCheckpoint
from dllmd.train import admission
from dllmd.train.diloco.run import DiLoCoRun, outer_steps
from dllmd.train.federated.run import FederatedRun, federation_status, prepare_federated, release_clients
from dllmd.train.federated.weights import GlobalModel
from dllmd.train.heldout import HeldOut
from dllmd.train.jobs import JobError, JobFailed, JobInterrupted, JobStore
from dllmd.train.lowcomm import LowCommSettings
from dllmd.train.pipeline.parts import PartCheckpoints
from dllmd.train.pipeline.run import PipelineRun
from dllmd.train.privacy.job import JobPrivacy
from dllmd.train.privacy.settings import PrivacyError, PrivacySettings
from dllmd.train.run import PREPARE_TIMEOUT_S, DataParallelRun

log = logging.getLogger("dllmd.coordinator")

PING_TIMEOUT_S = 3.0
METRICS_REPLY_BYTES = 48 * 1024  # a reply's header is at most 64 KiB (dllmd.net.wire)
HIDDEN_SPEC = ("dp_seed", "eval_tokens")  # not shown by jobs.show: a secret, and a held-out text's token ids


class Coordinator:
    def __init__(self, service):
        self.service = service
        self.store = JobStore(service.home / "jobs.sqlite", service.metrics)
        interrupted = self.store.mark_interrupted()
        if interrupted:
            log.warning("jobs interrupted by the last stop (resume them with 'dllmctl jobs resume'): %s",
                        ", ".join(interrupted))
        self.tasks: dict[str, asyncio.Task] = {}
        self.stopping: set[str] = set()
        self.ring_ports: dict[str, dict[str, int]] = {}  # job -> node key -> its ring socket's port
        self.tied_ports: dict[str, dict[str, int]] = {}  # pipeline jobs: node key -> its tied ring's port
        self.memory_needed: dict[str, dict[str, int]] = {}  # job -> node key -> its estimate at prepare
        self.spares: dict[str, dict[str, list[str]]] = {}  # job -> node key -> shards it keeps spares of
        self.absent: dict[str, list[S.NodeRef]] = {}  # a resumed data-parallel job: nodes that did not answer
        self.federated_models: dict[str, GlobalModel] = {}  # federated jobs: the global weights
        self.alert_sink = AlertSink.of(service.config.alerts)  # this node owner's [alerts], for every job here

    def checkpoints(self, job: str) -> Checkpoints | PartCheckpoints:
        """A job's complete checkpoints: whole (data parallelism) or one part per stage (pipelines)."""
        spec = self.store.get(job)["spec"]
        if spec.get("parallelism", "data") in ("data", "federated"):
            return Checkpoints(self.service.home / "jobs" / job / "checkpoints", self.service.identity)
        return PartCheckpoints(self.service.home, job, len(spec["stages"]), self.service.identity,
                               [n["public_key"] for n in spec["nodes"] + spec.get("retired", [])])

    def register(self, server: RpcServer) -> None:
        for op, handler in ((S.JOBS_SUBMIT, self._submit), (S.JOBS_LIST, self._list), (S.JOBS_SHOW, self._show),
                            (S.JOBS_STOP, self._stop), (S.JOBS_RESUME, self._resume), (S.JOBS_METRICS, self._metrics),
                            (S.CHECKPOINTS_LIST, self._checkpoints), (S.CHECKPOINTS_READ, self._read_checkpoint)):
            server.register(Operation(op, self._guard(handler)))

    @staticmethod
    def _guard(handler):
        async def run(call: Call):
            try:
                return await handler(call.args, call.tensors)
            except (JobError, CheckpointError, JobFailed, JobInterrupted) as exc:
                raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        return run

    # --- client operations ---------------------------------------------------------------------

    def _validate(self, spec: S.JobSpec) -> int:
        """Refuse a job that cannot run, before anything starts; returns its total steps."""
        if spec.backend not in S.BACKENDS:
            raise JobError(f"backend must be one of {', '.join(S.BACKENDS)}, not {spec.backend!r}")
        if spec.backend == "torch" and spec.plaintext:
            raise JobError("--plaintext is a setting of the zmq ring; torch.distributed never encrypts")
        if spec.dtype not in TRAIN_DTYPES:
            raise JobError(f"dtype must be {' or '.join(TRAIN_DTYPES)}, not {spec.dtype!r}")
        if not spec.nodes:
            raise JobError("a job needs at least one node")
        if spec.nodes[0].public_key != self.service.identity.public_key:
            raise JobError("the coordinator must be the job's first node")
        keys = [n.public_key for n in spec.nodes]
        if len(set(keys)) != len(keys):
            raise JobError("a node appears twice in the job")
        if spec.parallelism == "federated":
            return self._validate_federated(spec)
        if spec.batch_size % spec.micro_batch_size:
            raise JobError(f"--batch-size {spec.batch_size} is not divisible by --micro-batch-size "
                           f"{spec.micro_batch_size}")
        outside = [s.node for s in spec.shards if s.id not in keys and s.rows]
        if outside:
            raise JobError(f"dataset {spec.dataset} has shards on {', '.join(outside)}, which are not in the job: "
                           f"add them with --nodes or re-shard onto the job's nodes")
        self._validate_heldout(spec, keys)
        rows = HeldOut(spec).train_counts
        if schedule.steps_per_epoch(rows, spec.batch_size) < 1:
            raise JobError(f"dataset {spec.dataset} has {sum(rows.values())} sequences to train on, fewer than one "
                           f"global batch of {spec.batch_size}: lower --batch-size (or --eval-fraction), or "
                           f"--seq-len when sharding")
        if not spec.epochs and not spec.max_steps:
            raise JobError("give --epochs or --max-steps")
        if spec.parallelism not in S.PARALLELISMS_BUILT:
            raise JobError(f"parallelism must be one of {', '.join(S.PARALLELISMS_BUILT)}, not {spec.parallelism!r}")
        self._validate_privacy(spec)
        lowcomm = admission.check_communication(spec)
        if spec.parallelism != "data":
            admission.check_stages(spec, self._model_config(spec))
        total = schedule.total_steps(rows, spec.batch_size, spec.epochs or None, spec.max_steps or None)
        return outer_steps(total, lowcomm.sync_every) if lowcomm.diloco else total

    def _validate_federated(self, spec: S.JobSpec) -> int:
        """Rounds that can run; every client's key authorized here (no outbound call to a stranger)."""
        if spec.backend != "zmq" or spec.plaintext:
            raise JobError("federated rounds run over the encrypted peer connections: --backend zmq, no --plaintext")
        if spec.rounds < 1:
            raise JobError("a federated job needs --rounds")
        if spec.strategy not in S.STRATEGIES:
            raise JobError(f"strategy must be one of {', '.join(S.STRATEGIES)}, not {spec.strategy!r}")
        per_round = spec.clients_per_round or len(spec.nodes)
        if per_round > len(spec.nodes):
            raise JobError(f"--clients-per-round {per_round} is more than the job's {len(spec.nodes)} nodes")
        if spec.min_clients > per_round:
            raise JobError(f"--min-clients {spec.min_clients} is more than the {per_round} clients of a round")
        admission.check_communication(spec)
        self._validate_heldout(spec, [n.public_key for n in spec.nodes])
        if spec.secure_aggregation and (per_round < 3 or not (spec.update_clip or spec.dp_clip)):
            raise JobError("--secure-aggregation needs at least 3 clients a round (with two, each would learn the "
                           "other's update from the sum) and --update-clip (it bounds the fixed-point range)")
        self._validate_privacy(spec)
        if PrivacySettings.of(spec).enabled and spec.update_clip and spec.update_clip != spec.dp_clip:
            raise JobError("under differential privacy each client's update is clipped to --dp-clip; leave "
                           "--update-clip out")
        strangers = [n.name for n in spec.nodes[1:] if self.service.keys.by_public_key(n.public_key) is None]
        if strangers:
            raise JobError(f"node(s) {', '.join(strangers)} are not authorized on the coordinator "
                           f"{self.service.config.name}: authorize their keys (role peer or federation) first")
        return spec.rounds

    def _validate_heldout(self, spec: S.JobSpec, keys: list[str]) -> None:
        """Held-out data that can be scored where it lies: on the job's nodes, by a model they hold."""
        if len(spec.eval_tokens) == 1:
            raise JobError("the held-out text must hold at least 2 tokens to score one")
        if not (spec.eval_tokens or spec.eval_fraction or spec.eval_dataset or spec.eval_every):
            return
        admission.check_heldout(spec, self._model_config(spec) if spec.eval_tokens else {})
        outside = [s.node for s in spec.eval_shards if s.id not in keys and s.rows]
        if outside:
            raise JobError(f"--eval-data {spec.eval_dataset} has shards on {', '.join(outside)}, which are not in "
                           f"the job: a shard is scored on the node holding it")
        if spec.eval_dataset and spec.parallelism != "federated" and not any(s.rows for s in spec.eval_shards):
            raise JobError(f"--eval-data {spec.eval_dataset} has no rows on the job's nodes")

    @staticmethod
    def _validate_privacy(spec: S.JobSpec) -> None:
        """DP settings that are differential privacy, on a job DP-SGD is built for, with a budget that
        allows a step."""
        try:
            PrivacySettings.of(spec).check(spec.parallelism, spec.dtype)
        except PrivacyError as exc:
            raise JobError(str(exc)) from None
        privacy = JobPrivacy.of(spec)
        refusal = privacy.over_budget(0) if privacy else None
        if refusal:
            raise JobError(f"--dp-epsilon-budget allows no step: {refusal}; raise the budget or "
                           f"--dp-noise-multiplier, or lower --batch-size")

    def _model_config(self, spec: S.JobSpec) -> dict:
        try:
            return json.loads(self.service.models.config_path(spec.model).read_text())
        except FileNotFoundError:
            raise JobError(f"model {spec.model!r} has not been sent to the coordinator") from None

    async def _submit(self, spec: S.JobSpec, _tensors) -> dict:
        total = self._validate(spec)
        if PrivacySettings.of(spec).enabled:  # secret, and never the client's choice: settings.py says why
            spec.dp_seed = secrets.randbits(63)
        job = time.strftime("job-%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        await self._prepare(job, spec, spec.nodes)  # refuses (and cleans up) before the job exists
        self.store.create(job, to_wire(spec), total)
        self._start(job, spec, resume_from=None)
        return S.Submitted(job=job, total_steps=total, coordinator=self.service.config.name)

    async def _list(self, _a, _tensors) -> S.JobList:
        return S.JobList([S.JobSummary(**_summary(j)) for j in self.store.list()])

    async def _show(self, a: S.JobArgs, _tensors) -> S.JobDetail:
        job = self.store.get(a.job)
        last = self.store.metrics(a.job, after_step=job["step"] - 2)
        store = self.checkpoints(a.job)
        spec = _spec(job["spec"])
        privacy = JobPrivacy.of(spec)
        return S.JobDetail(**_summary(job), spec={k: v for k, v in job["spec"].items() if k not in HIDDEN_SPEC},
                           events=[S.Event(**e) for e in self.store.events(a.job)],
                           last_metrics=last[-1] if last else None,
                           checkpoints=[S.CheckpointInfo(**store.describe(s)) for s in store.steps()],
                           parallelism=spec.parallelism,
                           stages=self._stage_nodes(a.job, spec, last[-1] if last else None),
                           federation=federation_status(self.store, job) if spec.parallelism == "federated" else None,
                           privacy=privacy.spent(job["step"]) if privacy else None,
                           last_eval=self.store.last_with(a.job, "eval_loss"))

    def _stage_nodes(self, job: str, spec: S.JobSpec, last: dict | None) -> list[S.StageNode]:
        """A pipeline job's nodes, each with its stage, layers, memory estimate and latest step."""
        if spec.parallelism in ("data", "federated"):
            return []
        computed = (last or {}).get("nodes", {})
        memory = self.memory_needed.get(job, {})
        rows = []
        for i, node in enumerate(spec.nodes):
            replica, stage = divmod(i, len(spec.stages))
            step = computed.get(node.name)
            busy = 1 - step["bubble"] if step else None
            rows.append(S.StageNode(node=node.name, replica=replica, stage=stage, start=spec.stages[stage].start,
                                    end=spec.stages[stage].end, live=step is not None,
                                    memory_needed=memory.get(node.public_key),
                                    compute_s=step["compute_s"] if step else None, busy=busy,
                                    activation_bytes=step["activation_bytes"] if step else None))
        return rows

    async def _stop(self, a: S.JobArgs, _tensors) -> S.JobState:
        job = self.store.get(a.job)
        if a.job not in self.tasks:
            return S.JobState(a.job, job["state"])
        self.stopping.add(a.job)
        self.store.set_state(a.job, "stopping")
        return S.JobState(a.job, "stopping")

    async def _resume(self, a: S.ResumeArgs, _tensors) -> S.Resumed:
        job = self.store.get(a.job)
        if a.job in self.tasks:
            raise JobError(f"job {a.job} is already running")
        if job["state"] == "done":
            raise JobError(f"job {a.job} is done; nothing to resume")
        spec = _spec(job["spec"])
        moved = {n.public_key: n.address for n in a.nodes}
        for node in spec.nodes:
            node.address = moved.get(node.public_key, node.address)
        moves = self._replace_nodes(a.job, spec, a.replace) if a.replace else []
        latest = self.checkpoints(a.job).latest()
        nodes = spec.nodes
        if spec.parallelism == "data":
            # A data-parallel job goes on without nodes that are gone: their shards come from spares.
            alive = await asyncio.gather(*(self.alive(n) for n in spec.nodes))
            nodes = [n for n, ok in zip(spec.nodes, alive) if ok]
            self.absent[a.job] = [n for n, ok in zip(spec.nodes, alive) if not ok]
        await self._prepare(a.job, spec, nodes)
        if moves:  # saved once every node, the new ones too, took its part
            self.store.update_spec(a.job, to_wire(spec))
            for message in moves:
                self.store.event(a.job, "stage_moved", message)
        self.store.rewind(a.job, latest or 0)
        self.store.event(a.job, "resumed", f"from step {latest or 0}")
        self._start(a.job, spec, resume_from=latest)
        return S.Resumed(a.job, "running", latest or 0)

    def _replace_nodes(self, job: str, spec: S.JobSpec, replace: list[S.Replacement]) -> list[str]:
        """Move stages of a pipeline or hybrid job onto other nodes in ``spec`` (the same layers: each new
        node loads its stage's checkpoint part from the coordinator's copy), the moved-away nodes kept as
        ``retired``: the parts they signed stay trusted. What moved, said for the job's events."""
        if spec.parallelism not in ("model", "hybrid"):
            raise JobError("--replace moves pipeline stages; a data-parallel job resumes without the nodes that "
                           "are gone (their shards come from spares)")
        keys, moves = [n.public_key for n in spec.nodes], []
        for r in replace:
            if r.old not in keys:
                raise JobError(f"{r.old[:16]}... is not a node of job {job}")
            if r.new.public_key in keys:
                raise JobError(f"{r.new.name} is already a node of job {job}")
            index = keys.index(r.old)
            if index == 0:
                raise JobError("the coordinator's own stage cannot move: resume the job from its node")
            if not self.service.keys.authorized_as(r.new.public_key, TRAINING_DIAL):
                raise JobError(f"{r.new.name}'s key is not authorized on node {self.service.config.name} as peer")
            old = spec.nodes[index]
            spec.retired.append(old)
            spec.nodes[index] = r.new
            keys[index] = r.new.public_key
            stage = spec.stages[index % len(spec.stages)]
            moves.append(f"stage {index % len(spec.stages)} (layers {stage.start}-{stage.end - 1}) moved from "
                         f"{old.name} to {r.new.name}")
        return moves

    async def _metrics(self, a: S.MetricsArgs, _tensors) -> S.Metrics:
        """Up to ``limit`` rows after ``after_step``, as many as fit one reply's header (``more``: ask again)."""
        job = self.store.get(a.job)
        rows, size = [], 0
        for row in self.store.metrics(a.job, a.after_step, a.limit):
            size += len(json.dumps(row))  # msgpack is no larger than JSON for these rows
            if rows and size > METRICS_REPLY_BYTES:
                break
            rows.append(row)
        more = len(rows) < len(self.store.metrics(a.job, a.after_step, len(rows) + 1))
        return S.Metrics(job=a.job, state=job["state"], step=job["step"], total_steps=job["total_steps"],
                         metrics=rows, more=more)

    async def _checkpoints(self, a: S.JobArgs, _tensors) -> S.CheckpointList:
        self.store.get(a.job)
        store = self.checkpoints(a.job)
        return S.CheckpointList(a.job, [S.CheckpointInfo(**store.describe(s)) for s in store.steps()])

    async def _read_checkpoint(self, a: S.CheckpointReadArgs,
                               _tensors) -> tuple[S.CheckpointChunk, list[torch.Tensor]]:
        """A chunk of one checkpoint file (export), with the manifest's signed bytes and signature to check
        it against."""
        store = self.checkpoints(a.job)
        if isinstance(store, PartCheckpoints):
            reply, chunk = store.read_chunk(a.step, a.file, a.offset, a.stage)
        elif a.stage >= 0:
            raise JobError(f"job {a.job} is data-parallel: its checkpoints have no parts")
        else:
            reply, chunk = store.read_chunk(a.step, a.file, a.offset)
        return reply, [int8_tensor(chunk)]

    # --- running a job -------------------------------------------------------------------------

    def _start(self, job: str, spec: S.JobSpec, resume_from: int | None) -> None:
        self.stopping.discard(job)
        task = asyncio.ensure_future(self._run(job, spec, resume_from))
        self.tasks[job] = task
        task.add_done_callback(lambda _: self.tasks.pop(job, None))

    async def _prepare(self, job: str, spec: S.JobSpec, nodes: list[S.NodeRef]) -> None:
        if spec.parallelism == "federated":
            self.federated_models[job] = await prepare_federated(self, job, spec)
            return
        args = {"job": job, "model": spec.model, "dataset": spec.dataset, "dtype": spec.dtype,
                "micro_batch_size": spec.micro_batch_size, "lr": spec.lr, "grad_clip": spec.grad_clip,
                "weight_decay": spec.weight_decay, "plaintext": spec.plaintext, "backend": spec.backend,
                "eval_dataset": spec.eval_dataset}
        privacy = JobPrivacy.of(spec)
        if privacy:
            args["privacy"] = to_wire(privacy.plan())
        lowcomm = LowCommSettings.of(spec)
        if lowcomm.enabled:
            args["comm"] = to_wire(lowcomm.plan(spec.seed))
        results = await asyncio.gather(*(self.service.call(n, "train.prepare", {**args, "stage": _stage(spec, i)},
                                                           timeout=PREPARE_TIMEOUT_S)
                                         for i, n in enumerate(nodes)), return_exceptions=True)
        failures = [f"{n.name}: {r}" for n, r in zip(nodes, results) if isinstance(r, BaseException)]
        if failures:
            await self._release(job, nodes)
            raise JobError("cannot start: " + "; ".join(failures))
        self.ring_ports[job] = {n.public_key: r[0]["ring_port"] for n, r in zip(nodes, results)}
        self.tied_ports[job] = {n.public_key: r[0].get("tied_port", 0) for n, r in zip(nodes, results)}
        self.memory_needed[job] = {n.public_key: r[0]["memory_needed"] for n, r in zip(nodes, results)}
        self.spares[job] = {n.public_key: list(r[0].get("spares", [])) for n, r in zip(nodes, results)}

    async def _release(self, job: str, nodes: list[S.NodeRef], keep_spares: bool = False) -> None:
        if job in self.federated_models:
            self.federated_models.pop(job)
            await release_clients(self.service, job, nodes)
            return
        async def one(node):
            try:
                await self.service.call(node, "train.release", {"job": job, "keep_spares": keep_spares}, timeout=10)
            except CallError:
                pass
        await asyncio.gather(*(one(n) for n in nodes))

    async def _run(self, job: str, spec: S.JobSpec, resume_from: int | None) -> None:
        runs = {"data": DiLoCoRun if spec.sync_every else DataParallelRun, "federated": FederatedRun}
        run = runs.get(spec.parallelism, PipelineRun)(self, job, spec)
        try:
            await run.execute(resume_from)
        except asyncio.CancelledError:
            self.store.set_state(job, "interrupted", "the coordinator daemon stopped; resume with 'dllmctl jobs resume'")
            raise
        except (JobInterrupted, NoRoomForCheckpoint) as exc:  # resumable from the last checkpoint
            log.error("job %s interrupted: %s", job, exc)
            self.store.event(job, "interrupted", str(exc))
            self.store.set_state(job, "interrupted", str(exc))
        except (JobFailed, CallError, CheckpointError, ValueError, OSError) as exc:
            log.error("job %s failed: %s", job, exc)
            self.store.event(job, "failed", str(exc))
            self.store.set_state(job, "failed", str(exc))
        except Exception as exc:  # a bug: record it rather than leave the job "running" forever
            log.exception("job %s crashed", job)
            self.store.set_state(job, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            resumable = self.store.get(job)["state"] == "interrupted"  # its spares stay for the resume
            await asyncio.shield(self._release(job, run.live, keep_spares=resumable))
            self.stopping.discard(job)

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        self.store.close()

    async def alive(self, node: S.NodeRef) -> bool:
        if node.public_key == self.service.identity.public_key:
            return True
        try:
            client: RpcClient = self.service.dial(node, "ping")
            await client.call("ping", timeout=PING_TIMEOUT_S)
            return True
        except CallError:
            return False


def _stage(spec: S.JobSpec, index: int) -> dict | None:
    """Node ``index``'s stage plan in a pipeline job (nodes are replica-major), or None (data parallelism)."""
    if spec.parallelism == "data":
        return None
    count = len(spec.stages)
    replica, stage = divmod(index, count)
    span = spec.stages[stage]
    return {"index": stage, "count": count, "replica": replica, "start": span.start, "end": span.end,
            "schedule": spec.schedule, "recompute": spec.recompute,
            "micro_batches": max(1, -(-spec.batch_size // spec.micro_batch_size))}


def _spec(data: dict) -> S.JobSpec:
    from dllmd.net.schema import parse_args
    return parse_args(S.JobSpec, data)


def _summary(job: dict) -> dict:
    spec = job["spec"]
    return {"job": job["job"], "state": job["state"], "model": spec["model"], "dataset": spec["dataset"],
            "nodes": [n["name"] for n in spec["nodes"]], "step": job["step"], "total_steps": job["total_steps"],
            "created": job["created"], "updated": job["updated"], "error": job["error"]}

