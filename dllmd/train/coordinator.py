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
import logging
import secrets
import time

import torch

from dllmd.failpoints import failpoint
from dllmd.models.dtypes import TRAIN_DTYPES
from dllmd.net.client import CallError, RpcClient
from dllmd.net.keys import Role
from dllmd.net.schema import to_wire
from dllmd.net.server import Call, HandlerError, Operation, RpcServer, allow
from dllmd.net.wire import ErrorCode
from dllmd.train import schedule
from dllmd.net.messages import training as S
from dllmd.train.checkpoint import CheckpointError, Checkpoints
from dllmd.train.jobs import JobError, JobStore

log = logging.getLogger("dllmd.coordinator")

STEP_TIMEOUT_S = 3600.0
PREPARE_TIMEOUT_S = 600.0
PING_TIMEOUT_S = 3.0
MAX_FAILED_ATTEMPTS = 3  # failed steps in a row with no node lost: give up (something else is wrong)
STATE_MESSAGE_BYTES = 64 * 1024 * 1024
STATE_MESSAGE_TENSORS = 48  # a message carries at most 64 tensors
READ_CHUNK = 4 * 1024 * 1024


class JobFailed(RuntimeError):
    pass


class Coordinator:
    def __init__(self, service):
        self.service = service
        self.store = JobStore(service.home / "jobs.sqlite")
        interrupted = self.store.mark_interrupted()
        if interrupted:
            log.warning("jobs interrupted by the last stop (resume them with 'dllmctl jobs resume'): %s",
                        ", ".join(interrupted))
        self.tasks: dict[str, asyncio.Task] = {}
        self.stopping: set[str] = set()
        self.ring_ports: dict[str, dict[str, int]] = {}  # job -> node key -> its ring socket's port

    def checkpoints(self, job: str) -> Checkpoints:
        return Checkpoints(self.service.home / "jobs" / job / "checkpoints", self.service.identity)

    def register(self, server: RpcServer) -> None:
        admin, readers = allow(Role.ADMIN), allow(Role.ADMIN, Role.CLIENT)
        for op, handler, roles in (
                (S.JOBS_SUBMIT, self._submit, admin), (S.JOBS_LIST, self._list, readers),
                (S.JOBS_SHOW, self._show, readers), (S.JOBS_STOP, self._stop, admin),
                (S.JOBS_RESUME, self._resume, admin), (S.JOBS_METRICS, self._metrics, readers),
                (S.CHECKPOINTS_LIST, self._checkpoints, readers), (S.CHECKPOINTS_READ, self._read_checkpoint, admin)):
            server.register(Operation(op, self._guard(handler), roles))

    @staticmethod
    def _guard(handler):
        async def run(call: Call):
            try:
                return await handler(call.args, call.tensors)
            except (JobError, CheckpointError, JobFailed) as exc:
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
        if spec.batch_size % spec.micro_batch_size:
            raise JobError(f"--batch-size {spec.batch_size} is not divisible by --micro-batch-size "
                           f"{spec.micro_batch_size}")
        outside = [s.node for s in spec.shards if s.id not in keys and s.rows]
        if outside:
            raise JobError(f"dataset {spec.dataset} has shards on {', '.join(outside)}, which are not in the job: "
                           f"add them with --nodes or re-shard onto the job's nodes")
        rows = {s.id: s.rows for s in spec.shards}
        if schedule.steps_per_epoch(rows, spec.batch_size) < 1:
            raise JobError(f"dataset {spec.dataset} has {sum(rows.values())} sequences, fewer than one global batch "
                           f"of {spec.batch_size}: lower --batch-size or --seq-len when sharding")
        if not spec.epochs and not spec.max_steps:
            raise JobError("give --epochs or --max-steps")
        return schedule.total_steps(rows, spec.batch_size, spec.epochs or None, spec.max_steps or None)

    async def _submit(self, spec: S.JobSpec, _tensors) -> dict:
        total = self._validate(spec)
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
        return S.JobDetail(**_summary(job), spec=job["spec"],
                           events=[S.Event(**e) for e in self.store.events(a.job)],
                           last_metrics=last[-1] if last else None,
                           checkpoints=[S.CheckpointInfo(**store.describe(s)) for s in store.steps()])

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
        latest = self.checkpoints(a.job).latest()
        await self._prepare(a.job, spec, spec.nodes)
        self.store.rewind(a.job, latest or 0)
        self.store.event(a.job, "resumed", f"from step {latest or 0}")
        self._start(a.job, spec, resume_from=latest)
        return S.Resumed(a.job, "running", latest or 0)

    async def _metrics(self, a: S.MetricsArgs, _tensors) -> S.Metrics:
        job = self.store.get(a.job)
        return S.Metrics(job=a.job, state=job["state"], step=job["step"], total_steps=job["total_steps"],
                         metrics=self.store.metrics(a.job, a.after_step, a.limit))

    async def _checkpoints(self, a: S.JobArgs, _tensors) -> S.CheckpointList:
        self.store.get(a.job)
        store = self.checkpoints(a.job)
        return S.CheckpointList(a.job, [S.CheckpointInfo(**store.describe(s)) for s in store.steps()])

    async def _read_checkpoint(self, a: S.CheckpointReadArgs,
                               _tensors) -> tuple[S.CheckpointChunk, list[torch.Tensor]]:
        """A chunk of one checkpoint file (export), with the manifest's signed bytes and signature to check
        it against."""
        self.store.get(a.job)
        store = self.checkpoints(a.job)
        manifest, blob, signature = store.signed_manifest(a.step)
        if a.file not in manifest.files:
            raise JobError(f"a checkpoint has no file {a.file!r}; files: {', '.join(manifest.files)}")
        with open(store.path(a.step) / a.file, "rb") as f:
            f.seek(a.offset)
            chunk = f.read(READ_CHUNK)
        return (S.CheckpointChunk(manifest=blob, signature=signature, size=manifest.files[a.file].bytes),
                [torch.frombuffer(bytearray(chunk), dtype=torch.int8) if chunk else torch.zeros(0, dtype=torch.int8)])

    # --- running a job -------------------------------------------------------------------------

    def _start(self, job: str, spec: S.JobSpec, resume_from: int | None) -> None:
        self.stopping.discard(job)
        task = asyncio.ensure_future(self._run(job, spec, resume_from))
        self.tasks[job] = task
        task.add_done_callback(lambda _: self.tasks.pop(job, None))

    async def _prepare(self, job: str, spec: S.JobSpec, nodes: list[S.NodeRef]) -> None:
        args = {"job": job, "model": spec.model, "dataset": spec.dataset, "dtype": spec.dtype,
                "micro_batch_size": spec.micro_batch_size, "lr": spec.lr, "grad_clip": spec.grad_clip,
                "weight_decay": spec.weight_decay, "plaintext": spec.plaintext, "backend": spec.backend}
        results = await asyncio.gather(*(self.service.call(n, "train.prepare", args, timeout=PREPARE_TIMEOUT_S)
                                         for n in nodes), return_exceptions=True)
        failures = [f"{n.name}: {r}" for n, r in zip(nodes, results) if isinstance(r, BaseException)]
        if failures:
            await self._release(job, nodes)
            raise JobError("cannot start: " + "; ".join(failures))
        self.ring_ports[job] = {n.public_key: r[0]["ring_port"] for n, r in zip(nodes, results)}

    async def _release(self, job: str, nodes: list[S.NodeRef]) -> None:
        async def one(node):
            try:
                await self.service.call(node, "train.release", {"job": job}, timeout=10)
            except CallError:
                pass
        await asyncio.gather(*(one(n) for n in nodes))

    async def _run(self, job: str, spec: S.JobSpec, resume_from: int | None) -> None:
        run = _Run(self, job, spec)
        try:
            await run.execute(resume_from)
        except asyncio.CancelledError:
            self.store.set_state(job, "interrupted", "the coordinator daemon stopped; resume with 'dllmctl jobs resume'")
            raise
        except (JobFailed, CallError, CheckpointError, ValueError, OSError) as exc:
            log.error("job %s failed: %s", job, exc)
            self.store.event(job, "failed", str(exc))
            self.store.set_state(job, "failed", str(exc))
        except Exception as exc:  # a bug: record it rather than leave the job "running" forever
            log.exception("job %s crashed", job)
            self.store.set_state(job, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            await asyncio.shield(self._release(job, run.live))
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
        client: RpcClient = self.service.peers.get(node.address, node.public_key)
        try:
            await client.call("ping", timeout=PING_TIMEOUT_S)
            return True
        except CallError:
            return False


class _Run:
    """One execution of a job, from its first (or resumed) step to done, stopped or failed."""

    def __init__(self, coordinator: Coordinator, job: str, spec: S.JobSpec):
        self.c, self.job, self.spec = coordinator, job, spec
        self.store = coordinator.store
        self.live: list[S.NodeRef] = list(spec.nodes)
        self.rows = {s.id: s.rows for s in spec.shards if s.rows}
        self.shard_ids = sorted(self.rows)
        self.owner = {s: s for s in self.shard_ids}  # shard -> the node computing its rows
        self.holders = {s: {s} for s in self.shard_ids}  # shard -> nodes holding its rows
        self.generation = 0
        self.total = schedule.total_steps(self.rows, spec.batch_size, spec.epochs or None, spec.max_steps or None)

    def node(self, key: str) -> S.NodeRef:
        return next(n for n in self.live if n.public_key == key)

    async def call_all(self, op: str, args: dict, timeout: float = 60.0) -> list[dict]:
        results = await asyncio.gather(*(self.c.service.call(n, op, args, timeout=timeout) for n in self.live))
        return [r for r, _ in results]

    async def execute(self, resume_from: int | None) -> None:
        self.store.set_state(self.job, "running")
        step = 0
        if resume_from is not None:
            step = await self.load_checkpoint(resume_from)
        await self.form_ring()
        failed_attempts, metrics = 0, None
        while step < self.total:
            if self.job in self.c.stopping:
                break
            failpoint("jobs.step", step)
            started = time.perf_counter()
            lr = schedule.learning_rate(step, self.spec.lr, self.spec.warmup_steps, self.total)
            results = await self.compute(step)
            if results is None:
                failed_attempts += 1
                if failed_attempts >= MAX_FAILED_ATTEMPTS:
                    raise JobFailed(f"step {step} failed {failed_attempts} times with every node alive")
                continue
            failed_attempts = 0
            applied = await asyncio.gather(*(self.c.service.call(n, "train.apply", {"job": self.job, "step": step,
                                                                                   "lr": lr}, timeout=600)
                                             for n in self.live), return_exceptions=True)
            lost = [n for n, r in zip(self.live, applied) if isinstance(r, BaseException)]
            if lost:  # they died between step and apply: the survivors applied; carry on without them
                await self.recover(lost)
            metrics = self.step_metrics(step, lr, results, time.perf_counter() - started)
            self.store.record_step(self.job, step, metrics)
            step += 1
            if self.spec.checkpoint_every and step % self.spec.checkpoint_every == 0 and step < self.total:
                await self.checkpoint(step, metrics)
        await self.checkpoint(step, metrics)
        if step >= self.total:
            self.store.set_state(self.job, "done")
            self.store.event(self.job, "done", f"{step} steps")
        else:
            self.store.set_state(self.job, "stopped")
            self.store.event(self.job, "stopped", f"after step {step}; resume with 'dllmctl jobs resume {self.job}'")

    async def form_ring(self) -> None:
        """Number the live nodes, tell each its neighbours, and make sure each shard has a spare copy."""
        self.generation += 1
        ports = self.c.ring_ports[self.job]
        members = [{"name": n.name, "public_key": n.public_key,
                    "address": f"{n.address.rsplit(':', 1)[0]}:{ports[n.public_key]}"} for n in self.live]
        await asyncio.gather(*(self.c.service.call(n, "train.ring", {"job": self.job, "generation": self.generation,
                                                                     "rank": rank, "members": members})
                               for rank, n in enumerate(self.live)))
        if len(self.live) < 2:
            return
        keys = [n.public_key for n in self.live]
        copies = []
        for shard in self.shard_ids:
            holders = self.holders[shard] & set(keys)
            if len(holders) >= 2:
                continue
            owner = self.owner[shard]
            spare = keys[(keys.index(owner) + 1) % len(keys)]  # the owner's ring successor
            copies.append((shard, owner, spare))
        await asyncio.gather(*(self.c.service.call(self.node(spare), "train.backup",
                                                   {"job": self.job, "shard": shard,
                                                    "holder": to_wire(self.node(owner))}, timeout=PREPARE_TIMEOUT_S)
                               for shard, owner, spare in copies))
        for shard, _, spare in copies:
            self.holders[shard].add(spare)

    async def compute(self, step: int) -> list[dict] | None:
        """Run ``train.step`` everywhere; on a failure, clean up and return None (the step is retried)."""
        batch = schedule.batch(self.rows, self.spec.batch_size, self.spec.seed, step)
        number = {s: i for i, s in enumerate(self.shard_ids)}
        per_node: dict[str, list[list[int]]] = {n.public_key: [] for n in self.live}
        for row in batch:
            per_node[self.owner[row.shard]].append([number[row.shard], row.index])
        tasks = {n.public_key: asyncio.ensure_future(self.c.service.call(
            n, "train.step", {"job": self.job, "step": step, "shards": self.shard_ids},
            [torch.tensor(per_node[n.public_key], dtype=torch.int64).reshape(-1, 2)], timeout=STEP_TIMEOUT_S))
            for n in self.live}
        done, pending = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
        if not pending and all(t.exception() is None for t in done):
            return [tasks[n.public_key].result()[0] for n in self.live]
        first = next(t.exception() for t in done if t.exception() is not None)
        log.warning("job %s step %d failed: %s", self.job, step, first)
        alive = await asyncio.gather(*(self.c.alive(n) for n in self.live))
        dead = [n for n, ok in zip(self.live, alive) if not ok]
        survivors = [n for n, ok in zip(self.live, alive) if ok]
        await asyncio.gather(*(self.c.service.call(n, "train.reset", {"job": self.job}, timeout=10) for n in survivors),
                             return_exceptions=True)
        await asyncio.wait(list(tasks.values()), timeout=30)
        for task in tasks.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # seen
        if dead:
            await self.recover(dead)
        else:
            self.store.event(self.job, "step_failed", f"step {step}: {first}; retrying")
            await self.form_ring()
        return None

    async def recover(self, dead: list[S.NodeRef]) -> None:
        """Drop dead nodes, move their shards to nodes holding copies, re-form the ring."""
        gone = {n.public_key for n in dead}
        self.live = [n for n in self.live if n.public_key not in gone]
        for node in dead:
            self.store.event(self.job, "node_lost", f"{node.name} stopped answering; continuing without it")
        if not self.live or self.live[0].public_key != self.c.service.identity.public_key:
            raise JobFailed("the coordinator's own replica is gone")
        keys = [n.public_key for n in self.live]
        for shard in self.shard_ids:
            self.holders[shard] &= set(keys)
            if self.owner[shard] in gone:
                if not self.holders[shard]:
                    raise JobFailed(f"shard {shard[:12]}... is lost: no live node holds a copy")
                new = min(self.holders[shard], key=keys.index)
                self.store.event(self.job, "shard_moved", f"shard of {_name(self.spec, shard)} now computed by "
                                                          f"{self.node(new).name}")
                self.owner[shard] = new
        await self.form_ring()

    def step_metrics(self, step: int, lr: float, results: list[dict], seconds: float) -> dict:
        first = results[0]
        return {"loss": first["loss"], "lr": lr, "grad_norm": first["grad_norm"], "tokens": first["tokens"],
                "step_s": seconds, "tokens_per_s": first["tokens"] / seconds if seconds else None,
                "compute_s": max(r["compute_s"] for r in results), "comm_s": max(r["comm_s"] for r in results),
                "nodes": {n.name: {"rows": r["rows"], "compute_s": r["compute_s"], "comm_s": r["comm_s"]}
                          for n, r in zip(self.live, results)}}

    async def checkpoint(self, step: int, metrics: dict | None) -> None:
        worker = self.c.service.workers[self.job]
        names = worker.state_names()
        tensors = {n: worker.state_tensor(n) for n in names}
        config = self.c.service.models.config_path(self.spec.model).read_bytes()
        per_epoch = schedule.steps_per_epoch(self.rows, self.spec.batch_size)
        state = {"job": self.job, "optimizer_step": worker.optimizer_step(), "seed": self.spec.seed,
                 "epoch": step // per_epoch, "step_in_epoch": step % per_epoch, "spec": to_wire(self.spec),
                 "metrics": metrics or {}, "torch_rng": torch.get_rng_state().numpy().tobytes().hex(),
                 "owners": {_name(self.spec, s): self.node(o).name for s, o in self.owner.items()}}
        described = await asyncio.to_thread(self.c.checkpoints(self.job).write, step, tensors, config, state)
        self.store.event(self.job, "checkpoint", f"step {step} ({described['bytes']} bytes)")

    async def load_checkpoint(self, step: int) -> int:
        tensors, state = await asyncio.to_thread(self.c.checkpoints(self.job).read, step)
        torch.set_rng_state(torch.frombuffer(bytearray(bytes.fromhex(state["torch_rng"])), dtype=torch.uint8))
        names = list(tensors)
        batches, size, current = [], 0, []
        for name in names:
            current.append(name)
            size += tensors[name].numel() * tensors[name].element_size()
            if size >= STATE_MESSAGE_BYTES or len(current) >= STATE_MESSAGE_TENSORS:
                batches.append(current)
                current, size = [], 0
        if current:
            batches.append(current)

        async def send(node: S.NodeRef) -> None:
            for batch in batches:
                await self.c.service.call(node, "train.load_state",
                                          {"job": self.job, "names": batch, "optimizer_step": state["optimizer_step"]},
                                          [tensors[n] for n in batch], timeout=600)

        await asyncio.gather(*(send(n) for n in self.live))
        return step


def _name(spec: S.JobSpec, shard: str) -> str:
    return next((s.node for s in spec.shards if s.id == shard), shard[:12])


def _spec(data: dict) -> S.JobSpec:
    from dllmd.net.schema import parse_args
    return parse_args(S.JobSpec, data)


def _summary(job: dict) -> dict:
    spec = job["spec"]
    return {"job": job["job"], "state": job["state"], "model": spec["model"], "dataset": spec["dataset"],
            "nodes": [n["name"] for n in spec["nodes"]], "step": job["step"], "total_steps": job["total_steps"],
            "created": job["created"], "updated": job["updated"], "error": job["error"]}

