"""Training on a node: the worker operations a coordinator drives (``train.*``), and the
coordinator's own (``jobs.*``, ``checkpoints.*``) for the client.

Every worker operation is a method taking its parsed args and tensors, so the coordinator calls its
own node's worker directly (no loopback connection, no key of its own to authorize) and every
other worker over its encrypted channel, through :meth:`TrainingService.call`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil
import torch

from dllmd import hardware
from dllmd.config import NodeConfig, bind_host
from dllmd.data.shards import ShardError, ShardStore, read_shard
from dllmd.models.received import ModelFileError, ReceivedModels
from dllmd.models.dtypes import TRAIN_DTYPES
from dllmd.net.client import CallError, PeerNotAuthorized
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.pool import ConnectionPool
from dllmd.net.schema import Op, parse_args, parse_reply, to_wire
from dllmd.net.server import Call, HandlerError, Operation, RpcServer
from dllmd.net.wire import ErrorCode
from dllmd.net.messages import training as S
from dllmd.observe.metrics import NodeMetrics
from dllmd.train.footprint import LOGITS_BYTES_PER_VOCAB, layer_activation_bytes
from dllmd.train.model import TrainModelError
from dllmd.train.optim import OptimConfig
from dllmd.train.collective import RingCollective, TorchCollective
from dllmd.train.diloco.worker import DiLoCoWorker
from dllmd.train.pipeline.links import LinkError
from dllmd.train.ring import RingError, RingMember, RingSocket
from dllmd.train.worker import ShardRows, TrainWorker, WorkerSpec

log = logging.getLogger("dllmd.train")

ROWS_MESSAGE_BYTES = 32 * 1024 * 1024
TRAINING_DIAL = frozenset({Role.PEER, Role.ADMIN})  # whom this node sends training traffic to
FEDERATED_DIAL = frozenset({Role.PEER, Role.ADMIN, Role.FEDERATION})
MAX_BACKUP_ROWS = 2**31
MAX_SEQ_LEN = 1 << 20
PROBE_TIMEOUT_S = 3.0  # a job member that does not answer a ping in this long is cut off from this node
IDLE_REPLICA_TTL_S = 15 * 60  # a running job calls every worker at least once per step
SWEEP_INTERVAL_S = 60
Handler = Callable[[Any, list[torch.Tensor]], Awaitable[Any]]
# What a worker operation raises when the request cannot be honoured (not a bug): answered as bad_args.
REFUSALS = (TrainModelError, ModelFileError, ShardError, RingError, LinkError, ValueError, KeyError)


def replica_bytes(params: int, micro_batch: int, seq_len: int, config: dict, private: bool = False,
                  comm: S.CommPlan | None = None) -> int:
    """A rough peak for one AdamW replica: fp32 weights, gradients, two moments, the flat all-reduce
    buffer and its copy, plus activations of one micro-batch (and its logits); DP-SGD also holds
    every example's gradient of a micro-batch, and the step's noise; DiLoCo the outer weights and
    their momentum; error feedback a residual and the next one."""
    layers, vocab = int(config.get("num_hidden_layers") or 0), int(config.get("vocab_size") or 0)
    activations = micro_batch * seq_len * (layer_activation_bytes(config) * layers + vocab * LOGITS_BYTES_PER_VOCAB)
    copies = 6 + (micro_batch + 1 if private else 0)
    if comm is not None:
        copies += (2 if comm.sync_every else 0) + (2 if comm.compress != "none" else 0)
    return params * 4 * copies + activations


class TrainingService:
    def __init__(self, home: Path, config: NodeConfig, identity: Identity, keys: AuthorizedKeys, peers: ConnectionPool,
                 metrics: NodeMetrics | None = None):
        self.home, self.config, self.identity, self.keys = home, config, identity, keys
        self.metrics = metrics or NodeMetrics()  # the coordinator's job store reports steps and events to it
        self.peers = peers
        self.models = ReceivedModels(home / "models")
        self.shards = ShardStore(home / "datasets")
        self.workers: dict[str, TrainWorker] = {}
        self._sweeper: asyncio.Task | None = None
        self.handlers: dict[str, tuple[Op, Handler]] = {op.name: (op, handler) for op, handler in (
            (S.TRAIN_PREPARE, self.prepare), (S.TRAIN_RING, self.form_ring), (S.TRAIN_BACKUP, self.backup),
            (S.TRAIN_ROWS, self.rows), (S.TRAIN_STEP, self.step), (S.TRAIN_APPLY, self.apply),
            (S.TRAIN_RESET, self.reset), (S.TRAIN_PROBE, self.probe), (S.TRAIN_STATE, self.state), (S.TRAIN_LOAD_STATE, self.load_state),
            (S.TRAIN_RELEASE, self.release), (S.TRAIN_EVALUATE, self.evaluate))}
        from dllmd.train.pipeline.ops import StageOps  # pipeline stages: their own operations
        self.stages = StageOps(self)
        self.handlers.update({op.name: (op, handler) for op, handler in self.stages.handlers()})
        from dllmd.train.diloco.ops import DiLoCoOps  # DiLoCo workers: inner steps, syncs, outer steps
        self.handlers.update({op.name: (op, handler) for op, handler in DiLoCoOps(self).handlers()})
        from dllmd.train.federated.ops import FederatedClientOps  # federated clients: their own operations and roles
        self.federated = FederatedClientOps(self)
        self.handlers.update({op.name: (op, handler) for op, handler in self.federated.local_handlers()})
        from dllmd.train.coordinator import Coordinator  # it calls back into this service
        self.coordinator = Coordinator(self)

    def register(self, server: RpcServer) -> None:
        # Workers obey other daemons (the coordinator, ring peers) and admins: dllmd/net/roles.py.
        federated = {op.name for op, _ in self.federated.handlers}
        for op, handler in self.handlers.values():
            if op.name not in federated:
                server.register(Operation(op, self._rpc(handler)))
        self.stages.register(server)
        self.federated.register(server)
        self.coordinator.register(server)

    @staticmethod
    def _rpc(handler: Handler):
        async def run(call: Call):
            try:
                return await handler(call.args, call.tensors)
            except PeerNotAuthorized as exc:
                raise HandlerError(ErrorCode.FORBIDDEN, str(exc)) from None
            except REFUSALS as exc:
                raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        return run

    def dial(self, node: S.NodeRef, op: str):
        """The connection to ``node`` for ``op``, once its key is known to be one this node may send that
        to: a peer (or an admin's node) for training, also the federation role for federated rounds."""
        roles = FEDERATED_DIAL if op.startswith("fed.") or op == "ping" else TRAINING_DIAL
        if not self.keys.authorized_as(node.public_key, roles):
            raise PeerNotAuthorized(f"{node.name}'s key is not authorized on node {self.config.name} as "
                                    f"{' or '.join(sorted(r.value for r in roles))}; nothing was sent to it")
        return self.peers.get(node.address, node.public_key)

    async def call(self, node: S.NodeRef, op: str, args: dict, tensors: list[torch.Tensor] | None = None,
                   timeout: float = 60.0) -> tuple[dict, list[torch.Tensor]]:
        """A worker operation on ``node``: in-process when it is this node, else over its channel."""
        if node.public_key == self.identity.public_key:
            declared, handler = self.handlers[op]
            try:
                outcome = await handler(parse_args(declared.args, args), list(tensors or []))
            except REFUSALS as exc:
                raise CallError(str(exc)) from None
            result, out = outcome if isinstance(outcome, tuple) else (outcome, [])
            return (result if isinstance(result, dict) else to_wire(result)), out  # as a remote reply reads
        return await self.dial(node, op).call(op, args, tensors or [], timeout=timeout)

    async def invoke(self, node: S.NodeRef, op: Op, args: dict, tensors: list[torch.Tensor] | None = None,
                     timeout: float = 60.0) -> tuple[Any, list[torch.Tensor]]:
        """:meth:`call` with the reply checked against ``op``'s reply type."""
        result, out = await self.call(node, op.name, args, tensors, timeout)
        return parse_reply(op.reply, result), out

    def _worker(self, job: str) -> TrainWorker:
        worker = self.workers.get(job)
        if worker is None:
            raise ValueError(f"job {job} has no replica on this node (it was released or never prepared)")
        worker.last_used = time.monotonic()
        return worker

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Free replicas nobody drives any more (their coordinator died and the job was not resumed)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            self.federated.sweep(IDLE_REPLICA_TTL_S)
            for job, worker in list(self.workers.items()):
                if now - worker.last_used > IDLE_REPLICA_TTL_S and not worker.lock.locked():
                    log.warning("releasing the replica of job %s: no coordinator call for %d s", job,
                                IDLE_REPLICA_TTL_S)
                    self.workers.pop(job).close()

    # --- worker operations -----------------------------------------------------------------------

    async def prepare(self, a: S.WorkerPrepareArgs, _tensors) -> dict:
        """Load a replica of the model and this node's shard of the dataset; bind a ring socket."""
        spares = self.spares_directory(a.job)  # checks the job id before anything is loaded
        if a.job in self.workers:
            self.workers.pop(a.job).close(keep_spares=True)
        if a.plaintext and not self.config.allow_plaintext_ring:
            raise ValueError(f"node {self.config.name} does not allow a plaintext ring (allow_plaintext_ring = "
                             f"false in its node.toml)")
        if a.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype must be {' or '.join(TRAIN_DTYPES)}, not {a.dtype!r}")
        if a.privacy is not None and (a.stage is not None or a.dtype != "float32" or not a.privacy.clip
                                      or not a.privacy.noise_multiplier):
            raise ValueError("DP-SGD runs on data-parallel float32 replicas, with a clip and noise above 0")
        if a.comm is not None and (a.stage is not None or a.privacy is not None
                                   or (a.backend != "zmq" and (a.comm.compress != "none" or a.comm.overlap))):
            raise ValueError("--sync-every, --compress and --overlap run on data-parallel replicas without DP "
                             "(compression and overlap on the zmq ring)")
        config_path = self.models.config_path(a.model)
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"model {a.model!r} has not been sent to node {self.config.name}") from None
        layers = int(config["num_hidden_layers"])
        admins = [k.public_key for k in self.keys.all() if k.role == Role.ADMIN]
        shard = await asyncio.to_thread(self._own_shard, a.dataset)
        if a.stage is not None:
            return await self.stages.prepare(a, config_path, shard, admins)
        manifest, files = await asyncio.to_thread(self.models.verified_span, a.model, 0, layers, True, True, admins)
        seq_len = shard.tokens.shape[1] if shard else 2048
        need = replica_bytes(manifest.params, a.micro_batch_size, seq_len, config, private=a.privacy is not None,
                             comm=a.comm)
        device = hardware.best_device()
        free = hardware.gpus()[0]["memory_free"] if device.type == "cuda" else psutil.virtual_memory().available
        if need > free:
            raise ValueError(f"node {self.config.name} has {free / 2**30:.1f} GiB free but a replica of {a.model} "
                             f"with AdamW needs about {need / 2**30:.1f} GiB: use fewer or smaller nodes, a "
                             f"smaller --micro-batch-size or a smaller model")
        host = bind_host(self.config.listen)
        if a.backend == "torch":
            collective = TorchCollective(host)
        else:
            collective = RingCollective(RingSocket(self.identity, host, self.config.ring_port, plaintext=a.plaintext,
                                                   authorized=self.keys.admits))
        spec = WorkerSpec(job=a.job, model=a.model, dataset=a.dataset, dtype=a.dtype,
                          micro_batch_size=a.micro_batch_size,
                          optim=OptimConfig(lr=a.lr, grad_clip=a.grad_clip, weight_decay=a.weight_decay),
                          plaintext=a.plaintext, backend=a.backend, privacy=a.privacy, comm=a.comm)
        kind = DiLoCoWorker if a.comm is not None and a.comm.sync_every else TrainWorker
        try:
            worker = await asyncio.to_thread(kind.build, spec, config_path.parent, files, device, collective)
        except Exception:
            collective.close()
            raise
        worker.shards.directory = spares
        held = await asyncio.to_thread(worker.shards.adopt)
        if shard is not None:
            worker.shards[self.identity.public_key] = shard
        eval_shard = await asyncio.to_thread(self._own_shard, a.eval_dataset) if a.eval_dataset else None
        if eval_shard is not None:
            worker.eval_shards[self.identity.public_key] = eval_shard
        self.workers[a.job] = worker
        # Only the port: peers reach the ring at the host they already know this node by.
        return {"ring_port": collective.port, "spares": held,
                "rows": int(shard.tokens.shape[0]) if shard else 0, "seq_len": seq_len, "device": str(device),
                "params": sum(p.numel() for p in worker.model.parameters()), "memory_needed": need}

    def spares_directory(self, job: str) -> Path:
        """Where this node keeps its spare copies of a job's other shards (:mod:`dllmd.train.spares`);
        the job id (a peer's word) must be a plain name: the directory is removed with the job."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", job) or ".." in job:
            raise ValueError(f"a job id is letters, digits, '-', '_' and '.', not {job[:64]!r}")
        return self.home / "jobs" / job / "spares"

    def _own_shard(self, dataset: str) -> ShardRows | None:
        try:
            path = self.shards.shard_path(dataset)
        except ShardError:
            return None
        tokens, meta = read_shard(path)
        return ShardRows(tokens, int(meta["tokens"]))

    def ring_members(self, members: list[S.NodeRef]) -> list[RingMember]:
        """A ring's members, each of the others checked to be a key this node may connect its ring to."""
        for m in members:
            if m.public_key != self.identity.public_key and not self.keys.authorized_as(m.public_key, TRAINING_DIAL):
                raise PeerNotAuthorized(f"ring member {m.name}'s key is not authorized on node {self.config.name} as "
                                        f"peer; the ring was not formed")
        return [RingMember(m.public_key, m.address) for m in members]

    async def form_ring(self, a: S.RingArgs, _tensors) -> dict:
        members = self.ring_members(a.members)
        await self._worker(a.job).form_ring(a.generation, a.rank, members)
        return {"rank": a.rank, "size": len(members)}

    async def probe(self, a: S.ProbeArgs, _tensors) -> S.Probed:
        """Ping each of ``members`` (only keys this node may dial); the ones that do not answer."""
        others = [m for m in a.members if m.public_key != self.identity.public_key]

        async def answers(node: S.NodeRef) -> bool:
            try:
                await self.dial(node, "ping").call("ping", timeout=PROBE_TIMEOUT_S)
                return True
            except CallError:
                return False

        reached = await asyncio.gather(*(answers(m) for m in others))
        return S.Probed([m.public_key for m, ok in zip(others, reached) if not ok])

    async def backup(self, a: S.BackupArgs, _tensors) -> dict:
        """Copy a shard's rows from the node holding them, so this node can take the shard over."""
        worker = self._worker(a.job)
        if a.shard in worker.shards:
            return {"rows": worker.shards.row_count(a.shard)}
        first, _ = await self.call(a.holder, "train.rows", {"job": a.job, "shard": a.shard, "start": 0, "count": 1})
        total, seq_len, valid = _bounded_rows(first, a.holder.name)
        per_message = max(1, ROWS_MESSAGE_BYTES // (4 * seq_len))
        parts = []
        for start in range(0, total, per_message):
            result, tensors = await self.call(a.holder, "train.rows", {"job": a.job, "shard": a.shard, "start": start,
                                                                       "count": min(per_message, total - start)})
            if len(tensors) != 1 or tensors[0].dtype != torch.int32 or tensors[0].shape[1:] != (seq_len,):
                raise ValueError(f"{a.holder.name} sent malformed rows of shard {a.shard[:12]}")
            parts.append(tensors[0])
        rows = torch.cat(parts) if parts else torch.zeros(0, seq_len, dtype=torch.int32)
        if rows.shape[0] != total:
            raise ValueError(f"got {rows.shape[0]} rows of shard {a.shard[:12]} from {a.holder.name}, expected {total}")
        await asyncio.to_thread(worker.shards.keep_spare, a.shard, ShardRows(rows, valid))
        return {"rows": total}

    async def rows(self, a: S.RowsArgs, _tensors) -> tuple[dict, list[torch.Tensor]]:
        shard = self._worker(a.job).shards.get(a.shard)
        if shard is None:
            raise ValueError(f"this node does not hold shard {a.shard[:12]} of job {a.job}")
        tokens = shard.tokens[a.start:a.start + a.count].contiguous()
        return ({"total": int(shard.tokens.shape[0]), "seq_len": int(shard.tokens.shape[1]),
                 "valid_tokens": shard.valid_tokens}, [tokens])

    async def step(self, a: S.StepArgs, tensors: list[torch.Tensor]) -> dict:
        worker = self._worker(a.job)
        if not isinstance(worker, TrainWorker):
            raise ValueError(f"job {a.job} runs a pipeline stage on this node: its steps are train.stage_step")
        if isinstance(worker, DiLoCoWorker):
            raise ValueError(f"job {a.job} runs DiLoCo: its steps are train.inner, then train.sync")
        return await worker.step(a.step, self.step_rows(worker.shards, a.step, a.shards, tensors))

    @staticmethod
    def step_rows(held: dict[str, ShardRows], step: int, shards: list[str],
                  tensors: list[torch.Tensor]) -> list[tuple[str, int]]:
        """A step's rows as (shard, row) pairs, from its int64 ``[rows, 2]`` tensor of (shard number in
        ``shards``, row index); refused unless ``held`` (the worker's shards) holds every one."""
        if len(tensors) != 1 or tensors[0].dtype != torch.int64 or tensors[0].dim() != 2 or tensors[0].shape[1] != 2:
            raise ValueError("a step carries one int64 [rows, 2] tensor of (shard number, row index)")
        rows = []
        for shard_number, index in tensors[0].tolist():
            if not 0 <= shard_number < len(shards) or shards[shard_number] not in held:
                raise ValueError(f"step {step} names a shard this node does not hold")
            shard = held[shards[shard_number]]
            if not 0 <= index < shard.tokens.shape[0]:
                raise ValueError(f"row {index} is outside shard {shards[shard_number][:12]}")
            rows.append((shards[shard_number], index))
        return rows

    async def apply(self, a: S.ApplyArgs, _tensors) -> dict:
        return await self._worker(a.job).apply(a.step, a.lr)

    async def evaluate(self, a: S.EvaluateArgs, tensors: list[torch.Tensor]) -> S.Evaluated:
        """Score held-out rows with this replica's current weights (forward only; nothing is kept)."""
        worker = self._worker(a.job)
        if not isinstance(worker, TrainWorker):
            raise ValueError(f"job {a.job} runs a pipeline stage on this node: it evaluates with train.stage_evaluate")
        shards = worker.eval_shards if a.eval_data else worker.shards
        rows = self.step_rows(shards, -1, a.shards, tensors)
        sums = await worker.evaluate(shards, rows)
        return S.Evaluated(sums.nll, sums.tokens, sums.correct)

    async def reset(self, a: S.JobArgs, _tensors) -> dict:
        worker = self.workers.get(a.job)
        if worker is not None:
            worker.reset("the coordinator reset the ring: a peer was lost")
        return {"reset": worker is not None}

    async def state(self, a: S.StateArgs, _tensors) -> tuple[dict, list[torch.Tensor]]:
        """Without names: the names of every state tensor the replicas share (``local``: of this
        worker's own, ``local.*``: error feedback, DiLoCo's inner AdamW). With names: those tensors."""
        worker = self._worker(a.job)
        shared, local = worker.state_names(), worker.local_state_names()
        if any(n not in shared and n not in local for n in a.names):
            raise ValueError("train.state names a tensor this model does not have")
        def tensor(name: str) -> torch.Tensor:
            return worker.local_state_tensor(name) if name in local else worker.state_tensor(name)

        if a.names:
            return {"names": a.names, "optimizer_step": worker.optimizer_step()}, [tensor(n) for n in a.names]
        names = local if a.local else shared
        sizes = [t.numel() * t.element_size() for t in map(tensor, names)]  # for the caller to batch by
        return {"names": names, "bytes": sizes, "optimizer_step": worker.optimizer_step()}, []

    async def load_state(self, a: S.LoadStateArgs, tensors: list[torch.Tensor]) -> dict:
        if len(tensors) != len(a.names):
            raise ValueError("train.load_state carries one tensor per name")
        worker = self._worker(a.job)
        known = set(worker.state_names())
        local = {n: t for n, t in zip(a.names, tensors) if n.startswith("local.")}
        if any(n not in known for n in a.names if n not in local):
            raise ValueError("train.load_state names a tensor this model does not have")
        if local:  # the reducer or the inner optimizer refuses what it does not keep
            await asyncio.to_thread(worker.load_local_state, local, a.optimizer_step)
        shared = {n: t for n, t in zip(a.names, tensors) if n not in local}
        if shared:
            await asyncio.to_thread(worker.load_state, shared, a.optimizer_step)
        return {"loaded": len(a.names)}

    async def release(self, a: S.ReleaseArgs, _tensors) -> dict:
        worker = self.workers.pop(a.job, None)
        if worker is not None:
            worker.close(keep_spares=a.keep_spares)
        return {"released": worker is not None}

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.coordinator.stop()
        for worker in self.workers.values():
            worker.close(keep_spares=True)  # a job resumed later may need them
        self.workers.clear()



def _bounded_rows(reply: dict, holder: str) -> tuple[int, int, int]:
    """A holder's description of a shard, checked before anything is allocated for it: a hostile peer
    must not make this node reserve memory without limit."""
    try:
        total, seq_len, valid = int(reply["total"]), int(reply["seq_len"]), int(reply["valid_tokens"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{holder} described the shard without total, seq_len and valid_tokens") from None
    if not (0 <= total <= MAX_BACKUP_ROWS and 1 <= seq_len <= MAX_SEQ_LEN and 0 <= valid <= total * seq_len):
        raise ValueError(f"{holder} described a shard of {total} rows of {seq_len} tokens: out of bounds")
    need = total * seq_len * 4
    if need > psutil.virtual_memory().available // 2:
        raise ValueError(f"{holder}'s shard needs {need / 2**30:.1f} GiB, more than half this node's free memory")
    return total, seq_len, valid
