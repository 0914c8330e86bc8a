"""A federated job's rounds, driven by its coordinator (the job's first node).

Per round: sample the round's clients (with the job's seed), send each the global weights, let each
train ``local_steps`` on its own rows (``fed.train``), close the round at ``round_timeout`` with
whoever answered (at least ``min_clients``; the others are recorded as stragglers or dropouts),
fetch the answered clients' updates one after another, take their weighted mean and apply it with
the server optimizer. The global weights live only here and in checkpoints; clients keep nothing
between rounds but their rows.

Rows never move: the clients' shards stay where ``shard-data --local-only`` put them, the
coordinator learns only each client's row count, losses and its update.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import torch

from dllmd.net.client import CallError
from dllmd.net.messages import federated as F
from dllmd.net.messages import training as S
from dllmd.net.schema import to_wire
from dllmd.train import schedule
from dllmd.train.federated.ops import CHUNK_ELEMENTS, fixed_point_bound
from dllmd.train.federated.secure import SecureSum
from dllmd.train.federated.strategy import ServerOptimizer, mean_update, plan_round
from dllmd.train.federated.weights import GlobalModel
from dllmd.train.heldout import EvalSums
from dllmd.train.jobs import JobError, JobFailed
from dllmd.train.model import load_causal_lm
from dllmd.train.run import PREPARE_TIMEOUT_S, JobRun

log = logging.getLogger("dllmd.coordinator")

CHUNK_TIMEOUT_S = 120.0
MAX_FAILED_ROUNDS = 3  # rounds in a row that closed with fewer than --min-clients: give up


async def prepare_federated(coordinator, job: str, spec: S.JobSpec) -> GlobalModel:
    """Load the global model from the coordinator's store and a client on every node; fills
    ``spec.shards`` with each client's row count (its FedAvg weight). Refuses (releasing what was
    prepared) if any node refuses."""
    service = coordinator.service
    config_path = service.models.config_path(spec.model)
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise JobError(f"model {spec.model!r} has not been sent to the coordinator") from None
    admins = [k.public_key for k in service.keys.all() if k.role.value == "admin"]
    layers = int(config["num_hidden_layers"])
    _, files = await asyncio.to_thread(service.models.verified_span, spec.model, 0, layers, True, True, admins)
    model = GlobalModel(await asyncio.to_thread(load_causal_lm, config_path.parent, files))
    args = F.FedPrepareArgs(job=job, model=spec.model, dataset=spec.dataset, config=config, layout=model.digest,
                            dtype=spec.dtype, micro_batch_size=spec.micro_batch_size, batch_size=spec.batch_size,
                            weight_decay=spec.weight_decay, grad_clip=spec.grad_clip,
                            eval_fraction=spec.eval_fraction, seed=spec.seed, eval_dataset=spec.eval_dataset)
    results = await asyncio.gather(*(service.invoke(n, F.FED_PREPARE, to_wire(args), timeout=PREPARE_TIMEOUT_S)
                                     for n in spec.nodes), return_exceptions=True)
    failures = [f"{n.name}: {r}" for n, r in zip(spec.nodes, results) if isinstance(r, BaseException)]
    if failures:
        await release_clients(service, job, spec.nodes)
        raise JobError("cannot start: " + "; ".join(failures))
    spec.shards = [S.ShardRef(id=n.public_key, node=n.name, rows=r[0].rows) for n, r in zip(spec.nodes, results)]
    coordinator.memory_needed[job] = {n.public_key: r[0].memory_needed for n, r in zip(spec.nodes, results)}
    return model


async def release_clients(service, job: str, nodes: list[S.NodeRef]) -> None:
    async def one(node):
        try:
            await service.call(node, F.FED_RELEASE.name, {"job": job}, timeout=10)
        except CallError:
            pass
    await asyncio.gather(*(one(n) for n in nodes))


class FederatedRun(JobRun):
    """One ``step`` of the shared loop is a round."""

    def __init__(self, coordinator, job: str, spec: S.JobSpec):
        super().__init__(coordinator, job, spec)
        self.total = spec.rounds
        self.model: GlobalModel = coordinator.federated_models[job]
        self.server = ServerOptimizer(spec.strategy, spec.server_lr, spec.server_momentum, self.model.weights.numel())
        self.rows = {s.id: s.rows for s in spec.shards if s.rows}  # the clients split their own rows
        self._live = list(spec.nodes)
        self.failed_rounds = 0
        self.secure = SecureSum(self)

    @property
    def live(self) -> list[S.NodeRef]:
        return self._live

    @property
    def clients(self) -> list[S.NodeRef]:
        """Live nodes with rows, in the job's order."""
        return [n for n in self._live if self.rows.get(n.public_key)]

    async def form(self) -> None:
        pass  # no collective: every exchange goes through the coordinator

    async def compute(self, round: int) -> dict | None:
        started = time.perf_counter()
        lr = schedule.learning_rate(round, self.spec.lr, self.spec.warmup_steps, self.total)
        keys = [n.public_key for n in self.clients]
        by_key = {n.public_key: n for n in self.clients}
        plan = plan_round(self.spec, self.privacy, keys, self.rows, round)
        sampled, weights = plan.sampled, plan.weights
        train = F.FedTrainArgs(job=self.job, round=round, local_steps=self.spec.local_steps, lr=lr,
                               seed=self.spec.seed, proximal_mu=self.spec.proximal_mu, update_clip=plan.update_clip,
                               secure=self.spec.secure_aggregation, noise_std=plan.client_noise_std)
        tasks = {k: asyncio.ensure_future(self._train(by_key[k], round, {**to_wire(train), "weight": weights[k]}))
                 for k in sampled}
        done, pending = await asyncio.wait(tasks.values(), timeout=self.spec.round_timeout) if tasks else ((), ())
        for task in pending:
            task.cancel()
        answered, stragglers, dropped = {}, [], []
        for key, task in tasks.items():
            if task in pending:
                stragglers.append(key)
            elif task.exception() is not None:
                dropped.append(key)
                log.warning("job %s round %d: %s dropped out: %s", self.job, round, by_key[key].name, task.exception())
            else:
                answered[key] = task.result()
        for key in stragglers:
            self.store.event(self.job, "straggler", f"round {round}: {by_key[key].name} did not answer within "
                                                    f"{self.spec.round_timeout:g} s; the round closed without it")
            self.watch.raise_alert("straggler", f"round {round}: {by_key[key].name} missed the round's "
                                                f"{self.spec.round_timeout:g} s", node=by_key[key].name, step=round)
        for key in dropped:
            self.store.event(self.job, "client_dropped", f"round {round}: {by_key[key].name}: {tasks[key].exception()}")
        await self._drop_dead([by_key[k] for k in dropped])
        computed = time.perf_counter()
        order = [k for k in sampled if k in answered]
        if not sampled:  # Poisson sampling under DP drew nobody: the round is the noise alone
            total, summed = torch.zeros(self.model.weights.numel()), []
        elif self.spec.secure_aggregation:
            total, summed = await self.secure.sum(round, order, by_key,
                                                  fixed_point_bound(plan.update_clip, plan.client_noise_std))
        else:
            total, summed = await self._sum_updates(round, order, by_key)
        for key in [k for k in answered if k not in summed and total is not None]:
            self.store.event(self.job, "client_dropped", f"round {round}: {by_key[key].name} trained but its "
                                                         f"update could not be fetched")
        if sampled and len(summed) < self.spec.min_clients:
            return await self._round_failed(round, len(summed), dropped + stragglers)
        self.failed_rounds = 0
        mean = mean_update(total, sum(weights[k] for k in summed), self.spec, self.privacy, round)
        replies = {k: answered[k] for k in summed}
        return {"round": round, "lr": lr, "mean": mean, "replies": replies, "weights": weights,
                "sampled": sampled, "stragglers": stragglers, "dropped": [k for k in sampled if k not in summed
                                                                          and k not in stragglers],
                "compute_s": computed - started, "comm_s": time.perf_counter() - computed, "by_key": by_key}

    async def _round_failed(self, round: int, answered: int, missing: list[str]) -> None:
        self.failed_rounds += 1
        self.store.event(self.job, "round_failed", f"round {round}: {answered} update(s), fewer than --min-clients "
                                                   f"{self.spec.min_clients}; trying again")
        await self._drop_dead(list(self._live))
        if self.spec.secure_aggregation and len(self.clients) < 3:
            raise JobFailed(f"{len(self.clients)} client(s) left; secure aggregation needs at least 3")
        if len(self.clients) < self.spec.min_clients:
            raise JobFailed(f"{len(self.clients)} client(s) left, fewer than --min-clients {self.spec.min_clients}")
        if self.failed_rounds >= MAX_FAILED_ROUNDS:
            raise JobFailed(f"round {round} closed with fewer than --min-clients {self.spec.min_clients} updates "
                            f"{self.failed_rounds} times")
        return None

    async def _drop_dead(self, nodes: list[S.NodeRef]) -> None:
        """Stop sampling those of ``nodes`` that no longer answer (the coordinator is never dropped)."""
        alive = await asyncio.gather(*(self.c.alive(n) for n in nodes))
        for node, ok in zip(nodes, alive):
            if not ok and node in self._live:
                self._live.remove(node)
                self.store.event(self.job, "node_lost", f"{node.name} stopped answering; continuing without it")
                self.watch.node_lost(node.name, "stopped answering; the rounds go on without it")

    async def _send_weights(self, node: S.NodeRef, round: int) -> None:
        weights = self.model.weights
        for offset in range(0, weights.numel(), CHUNK_ELEMENTS):
            chunk = weights[offset:offset + CHUNK_ELEMENTS]
            await self.c.service.call(node, F.FED_LOAD.name, {"job": self.job, "round": round, "offset": offset,
                                                              "total": weights.numel()}, [chunk],
                                      timeout=CHUNK_TIMEOUT_S)

    async def _train(self, node: S.NodeRef, round: int, args: dict) -> F.FedTrained:
        """Send ``node`` the global weights, then have it train the round."""
        await self._send_weights(node, round)
        reply, _ = await self.c.service.invoke(node, F.FED_TRAIN, args, timeout=self.spec.round_timeout + 60)
        return reply

    async def score_heldout(self, round: int) -> EvalSums | None:
        """Every live client scores its own held-out rows with the new global weights (sent to it for
        that): the rows never leave it, only their sums, which add up to the token-weighted mean."""
        async def one(node: S.NodeRef):
            await self._send_weights(node, round)
            return await self.c.service.invoke(node, F.FED_EVALUATE, {"job": self.job, "round": round},
                                               timeout=self.spec.round_timeout + 60)
        return await self.gather_sums([one(n) for n in self._live])

    async def fetch(self, node: S.NodeRef, round: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``node``'s update of ``round``, chunk by chunk: fp32 in clear, int32 residues once masked."""
        numel = self.model.weights.numel()
        update = torch.empty(numel, dtype=dtype)
        for offset in range(0, numel, CHUNK_ELEMENTS):
            result, tensors = await self.c.service.call(node, F.FED_UPDATE.name,
                                                        {"job": self.job, "round": round, "offset": offset,
                                                         "count": CHUNK_ELEMENTS}, timeout=CHUNK_TIMEOUT_S)
            end = min(offset + CHUNK_ELEMENTS, numel)
            if (result.get("total") != numel or len(tensors) != 1 or tensors[0].dtype != dtype
                    or tensors[0].shape != (end - offset,)):
                raise CallError(f"{node.name} sent a malformed update")
            update[offset:end] = tensors[0]
        if dtype.is_floating_point and not torch.isfinite(update).all():
            raise CallError(f"{node.name} sent an update that is not finite")
        return update

    async def _sum_updates(self, round: int, order: list[str], by_key) -> tuple[torch.Tensor, list[str]]:
        """The sum of the clients' updates, added one client after another in the round's order (the
        simulation adds the same floats in the same order); the next client's is fetched meanwhile."""
        total = torch.zeros(self.model.weights.numel())
        summed = []
        fetches = [asyncio.ensure_future(self.fetch(by_key[k], round)) for k in order[:1]]
        for i, key in enumerate(order):
            if i + 1 < len(order):
                fetches.append(asyncio.ensure_future(self.fetch(by_key[order[i + 1]], round)))
            try:
                update = await fetches[i]
            except CallError as exc:
                log.warning("job %s round %d: no update from %s: %s", self.job, round, by_key[key].name, exc)
                continue
            total.add_(update)
            summed.append(key)
        return total, summed

    async def apply(self, round: int, lr: float, result: dict) -> list[S.NodeRef]:
        self.server.step(self.model.weights, result.pop("mean"))
        return []

    async def recover(self, dead: list[S.NodeRef]) -> None:
        pass

    def step_metrics(self, round: int, lr: float, result: dict, seconds: float) -> dict:
        replies, weights, by_key = result["replies"], result["weights"], result["by_key"]
        share = sum(weights[k] for k in replies)
        tokens = sum(r.tokens for r in replies.values())
        numel_bytes = self.model.weights.numel() * 4  # fp32 weights down; the update up (fp32, or int32 masked)
        protocol = self.secure.protocol_bytes if self.spec.secure_aggregation else 0
        return {"loss": sum(weights[k] * r.loss_before for k, r in replies.items()) / share if share else None,
                "local_loss": sum(weights[k] * r.loss_after for k, r in replies.items()) / share if share else None,
                "lr": lr, "tokens": tokens, "step_s": seconds, "tokens_per_s": tokens / seconds if seconds else None,
                "compute_s": result["compute_s"], "comm_s": result["comm_s"],
                "sampled": [by_key[k].name for k in result["sampled"]],
                "stragglers": [by_key[k].name for k in result["stragglers"]],
                "dropped": [by_key[k].name for k in result["dropped"]],
                "bytes_per_client": {"down": numel_bytes, "up": numel_bytes,
                                     "secure_aggregation": protocol // max(1, len(result["sampled"]))},
                "nodes": {by_key[k].name: {"rows": r.rows, "tokens": r.tokens, "loss_before": r.loss_before,
                                           "loss_after": r.loss_after, "update_norm": r.update_norm,
                                           "clipped": r.clipped, "compute_s": r.compute_s, "weight": weights[k]}
                          for k, r in replies.items()}}

    async def checkpoint(self, round: int, metrics: dict | None) -> None:
        tensors = self.model.tensors()
        for slot, flat in self.server.state.items():
            tensors.update(self.model.tensors(f"optim.{slot}.", flat))
        tensors = {name: t.clone() for name, t in tensors.items()}  # views of one buffer: safetensors refuses
        config = self.c.service.models.config_path(self.spec.model).read_bytes()
        state = {**self.cursor_federated(round), "metrics": metrics or {}}
        described = await asyncio.to_thread(self.c.checkpoints(self.job).write, round, tensors, config, state)
        self.store.event(self.job, "checkpoint", f"round {round} ({described['bytes']} bytes)")

    def cursor_federated(self, round: int) -> dict:
        privacy = {"privacy": to_wire(self.privacy.spent(round))} if self.privacy else {}
        return {"job": self.job, "seed": self.spec.seed, "round": round, "spec": to_wire(self.spec),
                "strategy": self.spec.strategy, **privacy}

    async def load_checkpoint(self, round: int) -> int:
        tensors, state = await asyncio.to_thread(self.c.checkpoints(self.job).read, round)
        self.model.weights.copy_(self.model.flatten(tensors, "model."))
        self.server.load({slot: self.model.flatten(tensors, f"optim.{slot}.") for slot in self.server.state})
        return round


def federation_status(store, job: dict) -> S.FederationStatus:
    """A federated job's rounds, clients and events, as ``jobs show`` reports them."""
    spec = job["spec"]
    taken: dict[str, list[tuple[int, float]]] = {}
    rows = store.metrics(job["job"], -1, 10_000)
    for row in rows:
        for name, client in row.get("nodes", {}).items():
            taken.setdefault(name, []).append((row["step"], client["loss_before"]))
    kinds = [e["kind"] for e in store.events(job["job"])]
    clients = [S.FederatedClient(node=s["node"], rows=s["rows"], rounds=len(taken.get(s["node"], [])),
                                 last_round=taken[s["node"]][-1][0] if s["node"] in taken else None,
                                 last_loss=taken[s["node"]][-1][1] if s["node"] in taken else None)
               for s in spec.get("shards", [])]
    return S.FederationStatus(round=job["step"], rounds=spec.get("rounds", 0), strategy=spec.get("strategy", "fedavg"),
                              clients=clients, stragglers=kinds.count("straggler"),
                              dropouts=kinds.count("client_dropped"), failed_rounds=kinds.count("round_failed"),
                              secure_aggregation=bool(spec.get("secure_aggregation")))
