"""A federated client's operations (``fed.*``), served to the job's coordinator.

The coordinator may be another organization's node, authorized here with the ``federation`` role:
it reaches only these operations, and only for datasets the owner listed in ``federated_datasets``
(node.toml). The client builds the architecture from the coordinator's config.json (after counting
its parameters on the meta device and checking its memory), receives the global weights each
round, trains on its own rows and keeps its update until the coordinator fetches it. Nothing sent
back is a token: row counts, losses, norms and the update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import psutil
import torch

from dllmd import hardware
from dllmd.failpoints import failpoint
from dllmd.net.keys import Role
from dllmd.net.messages import federated as F
from dllmd.net.server import Call, HandlerError, Operation, RpcServer
from dllmd.net.wire import ErrorCode
from dllmd.train.federated.secagg import Advertisement, FixedPoint, SecAggClient, SecAggError
from dllmd.train.federated.client import ClientModel, LocalResult, LocalRound, parameter_count
from dllmd.net.messages.training import Evaluated
from dllmd.train.federated.weights import layout_digest, load_flat
from dllmd.train.heldout import score_rows, split
from dllmd.train.model import TrainModelError
from dllmd.train.worker import ShardRows

log = logging.getLogger("dllmd.federated")

CHUNK_ELEMENTS = 8 * 1024 * 1024  # 32 MiB of fp32 per message, each way


@dataclass
class FederatedClient:
    """One job's client on this node."""

    job: str
    dataset: str
    shard_key: str
    shard: ShardRows
    model: ClientModel
    spec: F.FedPrepareArgs
    heldout: ShardRows | None = None  # rows scored by fed.evaluate, never trained on, never sent
    global_weights: torch.Tensor | None = None
    loaded: tuple[int, int] = (-1, 0)  # (round, elements received) of the global weights
    result: tuple[int, LocalResult] | None = None  # (round, its result) until the next round
    secure: bool = False  # this round's update leaves only masked
    update_bound: float = 0.0  # its elements' bound (the round's update clip): the fixed-point range
    secagg: SecAggClient | None = None  # this round's secure-aggregation state
    masked: torch.Tensor | None = None  # int32 view of the masked update, once masked
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.global_weights = self.result = self.secagg = self.masked = None

    def trained(self, round: int) -> LocalResult:
        if self.result is None or self.result[0] != round:
            raise ValueError(f"round {round} was not trained here")
        return self.result[1]

    def secure_round(self, round: int) -> SecAggClient:
        self.trained(round)
        if self.secagg is None or self.secagg.round.config.round != round:
            raise ValueError(f"round {round} has no secure aggregation under way here")
        return self.secagg


class FederatedClientOps:
    def __init__(self, service):
        self.service = service
        self.clients: dict[str, FederatedClient] = {}
        self.handlers = ((F.FED_PREPARE, self.prepare), (F.FED_LOAD, self.load), (F.FED_TRAIN, self.train),
                         (F.FED_UPDATE, self.update), (F.FED_RELEASE, self.release), (F.FED_EVALUATE, self.evaluate),
                         (F.FED_ADVERTISE, self.advertise), (F.FED_SHARE, self.share), (F.FED_MASK, self.mask),
                         (F.FED_UNMASK, self.unmask))

    def register(self, server: RpcServer) -> None:
        for op, handler in self.handlers:
            server.register(Operation(op, self._rpc(handler)))

    def local_handlers(self):
        """(op, handler(args, tensors)) for the coordinator's calls to its own node: this node's owner."""
        return [(op, lambda a, t, h=handler: h(a, t, None)) for op, handler in self.handlers]

    @staticmethod
    def _rpc(handler):
        async def run(call: Call):
            try:
                return await handler(call.args, call.tensors, call.caller.role)
            except SecAggError as exc:
                raise HandlerError(ErrorCode.BAD_ARGS, f"secure aggregation: {exc.code}: {exc.message}") from None
            except (TrainModelError, ValueError, KeyError) as exc:
                raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        return run

    def _client(self, job: str) -> FederatedClient:
        client = self.clients.get(job)
        if client is None:
            raise ValueError(f"job {job} has no federated client on this node (released or never prepared)")
        client.last_used = time.monotonic()
        return client

    # --- operations --------------------------------------------------------------------------------

    async def prepare(self, a: F.FedPrepareArgs, _tensors, role: Role | None) -> F.FedPrepared:
        config = self.service.config
        if role == Role.FEDERATION and a.dataset not in config.federated_datasets:
            raise HandlerError(ErrorCode.FORBIDDEN, f"dataset {a.dataset!r} is not open to federation on node "
                                                    f"{config.name} (its owner lists such datasets in "
                                                    f"federated_datasets in node.toml)")
        self.release_job(a.job)
        shard = await asyncio.to_thread(self.service._own_shard, a.dataset)
        if shard is None or shard.tokens.shape[0] == 0:
            raise ValueError(f"node {config.name} holds no rows of dataset {a.dataset!r}")
        shard, heldout = await self._held_out(a, shard, role)
        model_type = a.config.get("model_type")
        params = await asyncio.to_thread(parameter_count, a.config)
        from dllmd.train.service import replica_bytes

        seq_len = int(shard.tokens.shape[1])
        need = replica_bytes(params, a.micro_batch_size, seq_len, a.config)
        device = hardware.best_device()
        free = hardware.gpus()[0]["memory_free"] if device.type == "cuda" else psutil.virtual_memory().available
        cap = config.limits.memory
        if cap:
            free = min(free, cap)
        if need > free:
            raise ValueError(f"node {config.name} has {free / 2**30:.1f} GiB free but training a {model_type} of "
                             f"{params / 1e6:.0f}M parameters needs about {need / 2**30:.1f} GiB")
        model = await asyncio.to_thread(ClientModel.from_config, a.config, device)
        if layout_digest(model.model) != a.layout:
            raise ValueError(f"node {config.name} builds {a.model} with other parameters than the coordinator "
                             f"(transformers versions differ?)")
        self.clients[a.job] = FederatedClient(a.job, a.dataset, self.service.identity.public_key, shard, model, a,
                                              heldout)
        log.info("federated job %s: %d rows of %s, %d parameters", a.job, shard.tokens.shape[0], a.dataset, params)
        return F.FedPrepared(rows=int(shard.tokens.shape[0]), seq_len=seq_len, params=model.numel,
                             memory_needed=need, device=str(device))

    async def _held_out(self, a: F.FedPrepareArgs, shard: ShardRows,
                        role: Role | None) -> tuple[ShardRows, ShardRows | None]:
        """(the rows this client trains on, those it scores): the seeded split of its shard, or its shard of
        another dataset (open to federation like the training dataset), or no held-out rows."""
        if a.eval_fraction:
            train, held = split(a.seed, self.service.identity.public_key, int(shard.tokens.shape[0]), a.eval_fraction)
            return shard.subset(train), shard.subset(held)
        if not a.eval_dataset:
            return shard, None
        if role == Role.FEDERATION and a.eval_dataset not in self.service.config.federated_datasets:
            raise HandlerError(ErrorCode.FORBIDDEN, f"dataset {a.eval_dataset!r} is not open to federation on node "
                                                    f"{self.service.config.name} (federated_datasets in node.toml)")
        return shard, await asyncio.to_thread(self.service._own_shard, a.eval_dataset)

    async def evaluate(self, a: F.FedEvaluateArgs, _tensors, _role) -> Evaluated:
        """The held-out rows' sums under the global weights of ``a.round``: only the sums leave."""
        client = self._client(a.job)
        async with client.lock:
            if client.loaded != (a.round, client.model.numel):
                raise ValueError(f"the global weights of round {a.round} have not all arrived")
            if client.heldout is None:
                return Evaluated(0.0, 0, 0)
            sums = await asyncio.to_thread(self._score, client)
        return Evaluated(sums.nll, sums.tokens, sums.correct)

    @staticmethod
    def _score(client: FederatedClient):
        load_flat(client.model.model, client.global_weights)
        rows = [("held", i) for i in range(client.heldout.tokens.shape[0])]
        return score_rows(client.model.model, {"held": client.heldout}, rows, client.spec.micro_batch_size,
                          client.spec.dtype)

    async def load(self, a: F.FedLoadArgs, tensors: list[torch.Tensor], _role) -> dict:
        client = self._client(a.job)
        if a.total != client.model.numel:
            raise ValueError(f"the global weights have {a.total} elements, this client's model {client.model.numel}")
        if len(tensors) != 1 or tensors[0].dtype != torch.float32 or tensors[0].dim() != 1:
            raise ValueError("fed.load carries one flat float32 tensor")
        chunk = tensors[0]
        if a.offset + chunk.numel() > a.total:
            raise ValueError("fed.load's chunk runs past the end of the weights")
        async with client.lock:
            round_loaded, received = client.loaded
            if a.offset == 0:
                if client.global_weights is None:
                    client.global_weights = torch.empty(a.total)
                received = 0
            elif round_loaded != a.round or received != a.offset:
                raise ValueError(f"fed.load chunks of round {a.round} arrived out of order")
            client.global_weights[a.offset:a.offset + chunk.numel()] = chunk
            client.loaded = (a.round, a.offset + chunk.numel())
        return {"received": client.loaded[1]}

    async def train(self, a: F.FedTrainArgs, _tensors, _role) -> F.FedTrained:
        client = self._client(a.job)
        async with client.lock:
            if client.loaded != (a.round, client.model.numel):
                raise ValueError(f"the global weights of round {a.round} have not all arrived")
            spec = client.spec
            args = LocalRound(round=a.round, local_steps=a.local_steps, batch_size=spec.batch_size,
                              micro_batch_size=spec.micro_batch_size, lr=a.lr, seed=a.seed,
                              weight_decay=spec.weight_decay, grad_clip=spec.grad_clip, dtype=spec.dtype,
                              proximal_mu=a.proximal_mu, update_clip=a.update_clip, weight=a.weight,
                              noise_std=a.noise_std)
            if a.secure and not a.update_clip:
                raise ValueError("secure aggregation needs an update clip: it bounds the fixed-point range")
            client.result, client.secure, client.secagg, client.masked = None, a.secure, None, None
            client.update_bound = fixed_point_bound(a.update_clip, a.noise_std)
            started = time.perf_counter()
            result = await asyncio.to_thread(self._train_round, client, args)
            client.result = (a.round, result)
            return F.FedTrained(round=a.round, rows=result.rows, tokens=result.tokens, loss_before=result.loss_before,
                                loss_after=result.loss_after, update_norm=result.update_norm, clipped=result.clipped,
                                compute_s=time.perf_counter() - started)

    @staticmethod
    def _train_round(client: FederatedClient, args: LocalRound) -> LocalResult:
        failpoint("fed.train", args.round)
        return client.model.train_round(client.shard, client.shard_key, client.global_weights, args)

    async def update(self, a: F.FedUpdateArgs, _tensors, _role) -> tuple[dict, list[torch.Tensor]]:
        """A chunk of the round's update: in clear, or under secure aggregation only once masked."""
        client = self._client(a.job)
        update = client.trained(a.round).update
        if client.secure:
            if client.masked is None:
                raise ValueError(f"round {a.round} runs secure aggregation: the update leaves only masked")
            update = client.masked
        if a.offset >= update.numel():
            raise ValueError(f"offset {a.offset} is past the update's {update.numel()} elements")
        return {"total": update.numel()}, [update[a.offset:a.offset + min(a.count, CHUNK_ELEMENTS)].clone()]

    # --- secure aggregation: the coordinator relays, the client keeps its secrets ------------------

    async def advertise(self, a: F.FedAdvertiseArgs, _tensors, _role) -> Advertisement:
        client = self._client(a.job)
        config = a.config
        me = self.service.identity.public_key
        if not client.secure or config.job != a.job or config.round != a.round:
            raise ValueError(f"round {a.round} of job {a.job} was not trained for secure aggregation")
        if me not in config.clients:
            raise ValueError("the round's configuration does not list this node")
        if config.length != client.trained(a.round).update.numel():
            raise ValueError(f"the round sums {config.length} elements, this client's update has "
                             f"{client.trained(a.round).update.numel()}")
        if config.bits != 32:
            raise ValueError("updates are summed modulo 2**32")
        client.secagg = SecAggClient(config, config.clients.index(me), self.service.identity)
        return client.secagg.advertise()

    async def share(self, a: F.FedShareArgs, _tensors, _role) -> F.FedShares:
        return F.FedShares(self._client(a.job).secure_round(a.round).share_keys(a.roster))

    async def mask(self, a: F.FedMaskArgs, _tensors, _role) -> dict:
        client = self._client(a.job)
        secagg = client.secure_round(a.round)
        secagg.receive_shares(a.shares)
        encoding = FixedPoint(client.update_bound, len(secagg.round.config.clients), secagg.round.config.bits)
        masked = await asyncio.to_thread(lambda: secagg.masked_input(encoding.encode(client.trained(a.round).update)))
        client.masked = to_int32(masked)
        return {"length": client.masked.numel()}

    async def unmask(self, a: F.FedUnmaskArgs, _tensors, _role) -> F.FedReveals:
        failpoint("fed.unmask", a.round)
        return F.FedReveals(self._client(a.job).secure_round(a.round).unmask(a.request))

    async def release(self, a: F.FedJobArgs, _tensors, _role) -> dict:
        return {"released": self.release_job(a.job)}

    def release_job(self, job: str) -> bool:
        client = self.clients.pop(job, None)
        if client is not None:
            client.close()
        return client is not None

    def sweep(self, idle_s: float) -> None:
        """Free clients nobody drives any more (their coordinator died and the job was not resumed)."""
        now = time.monotonic()
        for job, client in list(self.clients.items()):
            if now - client.last_used > idle_s and not client.lock.locked():
                log.warning("releasing federated client of job %s: no coordinator call for %d s", job, idle_s)
                self.release_job(job)



def fixed_point_bound(update_clip: float, noise_std: float) -> float:
    """The elements' range of a masked update: a clipped update's elements are within its norm bound,
    and its part of the DP noise adds at most 8 standard deviations (clamped beyond: p < 1e-15)."""
    return update_clip + 8 * noise_std


def to_int32(residues: torch.Tensor) -> torch.Tensor:
    """Residues modulo 2**32 (int64 in [0, 2**32)) as the int32 with the same bits: 4 bytes an element."""
    return residues.sub(residues.ge(2**31).long() << 32).to(torch.int32)


def from_int32(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int64).bitwise_and_(0xFFFFFFFF)
