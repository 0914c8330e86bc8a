"""The coordinator's loop for a pipeline (``--parallelism model``) or hybrid (``hybrid``) job.

The job's nodes are D replicas of a P-stage pipeline (replica-major: node r * P + s is stage s of
replica r). Per step: every stage of every replica runs ``train.stage_step``; replica r's first stage
gets the rows of the global batch whose shard replica r owns (each shard is owned by the replica
holding it, as data-parallel workers own theirs). A stage's gradients are summed over its replicas
on one ring per stage, so every replica of a stage ends with the same sums. Only when every stage
has answered does the coordinator add their squared norms into the global gradient norm and send
``train.stage_apply``: nothing is applied anywhere unless every stage computed the step.

Failures: a replica with a dead stage is dropped (its shards move to a replica holding a copy: every
shard is copied to another replica's first stage), the rings are formed again over the survivors
and the step runs again. A stage with no replica left interrupts the job, with an event naming it;
``jobs resume`` continues from the last complete checkpoint.
"""

from __future__ import annotations

import asyncio
import math

import torch

from dllmd.net.messages import training as S
from dllmd.net.schema import to_wire
from dllmd.train.jobs import JobFailed, JobInterrupted
from dllmd.train.pipeline import schedule
from dllmd.train.run import STEP_TIMEOUT_S, JobRun, ring_member, shard_node
from dllmd.train.heldout import EvalSums, held_rows

PART_TIMEOUT_S = 1800.0


class PipelineRun(JobRun):
    def __init__(self, coordinator, job: str, spec: S.JobSpec):
        super().__init__(coordinator, job, spec)
        self.stages = len(spec.stages)
        self.replicas = [spec.nodes[r * self.stages:(r + 1) * self.stages] for r in range(spec.replicas)]
        self.alive = list(range(spec.replicas))  # replica numbers still in the job
        replica_of = {n.public_key: r for r, nodes in enumerate(self.replicas) for n in nodes}
        # shard -> the replica computing its rows: its node's, or (a node a resume moved away from) the
        # replica of a node keeping a spare of it.
        self.owner = {s: replica_of.get(s, next((replica_of[k] for k in sorted(self.holders[s]) if k in replica_of), 0))
                      for s in self.shard_ids}

    @property
    def live(self) -> list[S.NodeRef]:
        return [n for r in self.alive for n in self.replicas[r]]

    def first(self, replica: int) -> S.NodeRef:
        return self.replicas[replica][0]

    def grad_norm(self, results: dict[int, list[S.StageStepped]]) -> float:
        """The whole model's: every stage's part of it (equal in every replica), added up."""
        return math.sqrt(sum(r.squared_norm for r in results[self.alive[0]]))

    # --- forming the pipelines -------------------------------------------------------------------

    async def form(self) -> None:
        """Number the replicas' stages, link each stage to its neighbours, form one ring per stage over
        its replicas (and each replica's tied pair), and place every shard's rows where they are needed.
        Under ``--backend torch`` the rings are groups of one process group over the job's nodes
        (:mod:`dllmd.train.pipeline.torchdist`)."""
        self.generation += 1
        ports, tied_ports = self.c.ring_ports[self.job], self.c.tied_ports[self.job]
        calls = []
        if self.spec.backend == "torch":
            # One process group over the whole job, joined once: every node is told its rank in it.
            if self.generation > 1:
                raise JobInterrupted(f"a torch.distributed pipeline cannot be formed again without the nodes it "
                                     f"lost; resume it with 'dllmctl jobs resume {self.job}'")
            world = [ring_member(n, ports[n.public_key]) for n in self.live]
            calls = [(n, S.TRAIN_RING.name, {"job": self.job, "generation": self.generation, "rank": rank,
                                             "members": world}) for rank, n in enumerate(self.live)]
        for s in range(self.stages if self.spec.backend == "zmq" else 0):
            members = [ring_member(self.replicas[r][s], ports[self.replicas[r][s].public_key]) for r in self.alive]
            for rank, r in enumerate(self.alive):
                calls.append((self.replicas[r][s], S.TRAIN_RING.name,
                              {"job": self.job, "generation": self.generation, "rank": rank, "members": members}))
        for r in self.alive:
            nodes = self.replicas[r]
            ends = [nodes[0], nodes[-1]]
            tied = [ring_member(n, tied_ports[n.public_key]) for n in ends] if tied_ports.get(ends[0].public_key) else []
            for s, node in enumerate(nodes):
                calls.append((node, S.TRAIN_LINKS.name, {
                    "job": self.job, "generation": self.generation,
                    "previous": to_wire(nodes[s - 1]) if s > 0 else None,
                    "next": to_wire(nodes[s + 1]) if s < self.stages - 1 else None,
                    "tied_rank": (0 if s == 0 else 1) if tied and s in (0, self.stages - 1) else -1,
                    "tied_members": tied if s in (0, self.stages - 1) else []}))
        await asyncio.gather(*(self.c.service.call(node, op, args) for node, op, args in calls))
        await self.place_rows()

    async def place_rows(self) -> None:
        """Every shard's rows on its owner's first stage, and (with two replicas or more) spare copies
        on the next replicas' first stages (``shard_copies`` of them), which take the shard over if the
        owner is lost."""
        live = {n.public_key for n in self.live}
        copies = []
        spares = min(self.spec.shard_copies, len(self.alive) - 1)
        for shard in self.shard_ids:
            self.holders[shard] &= live
            owner = self.owner[shard]
            at = self.alive.index(owner)
            wanted = [self.first(self.alive[(at + d) % len(self.alive)]) for d in range(spares + 1)]
            for node in wanted:
                if node.public_key not in self.holders[shard]:
                    if not self.holders[shard]:
                        raise JobFailed(f"shard {shard[:12]}... is lost: no live node holds a copy")
                    holder = next(n for n in self.live if n.public_key in self.holders[shard])
                    copies.append((shard, node, holder))
        await asyncio.gather(*(self.c.service.call(node, S.TRAIN_BACKUP.name,
                                                   {"job": self.job, "shard": shard, "holder": to_wire(holder)},
                                                   timeout=600) for shard, node, holder in copies))
        for shard, node, _ in copies:
            self.holders[shard].add(node.public_key)

    # --- a step ----------------------------------------------------------------------------------

    async def compute(self, step: int) -> dict[int, list[S.StageStepped]] | None:
        """``train.stage_step`` on every stage of every live replica; replica -> its stages' replies, or
        None after a failure was cleaned up (the step is run again)."""
        batch = self.batch(step)
        number = {s: i for i, s in enumerate(self.shard_ids)}
        per_replica: dict[int, list[list[int]]] = {r: [] for r in self.alive}
        for row in batch:
            per_replica[self.owner[row.shard]].append([number[row.shard], row.index])
        tasks = {}
        for r in self.alive:
            micro = -(-len(per_replica[r]) // self.spec.micro_batch_size)
            for s, node in enumerate(self.replicas[r]):
                rows = [torch.tensor(per_replica[r], dtype=torch.int64).reshape(-1, 2)] if s == 0 else []
                tasks[(r, s)] = asyncio.ensure_future(self.c.service.invoke(
                    node, S.TRAIN_STAGE_STEP, {"job": self.job, "step": step, "micro_batches": micro,
                                               "shards": self.shard_ids if s == 0 else []},
                    rows, timeout=STEP_TIMEOUT_S))
        results = await self.all_or_cleanup(step, tasks)
        if results is None:
            return None
        return {r: [results[(r, s)] for s in range(self.stages)] for r in self.alive}

    async def score_heldout(self, step: int) -> EvalSums | None:
        """Each live replica scores the held-out rows of the shards it owns, forward only through its
        stages (``train.stage_evaluate``): the exact model of the step, which no single node holds."""
        shards, rows = held_rows(self.spec, self.heldout, self.shard_ids, lambda shard: self.owner[shard])
        calls = []
        for r, held in rows.items():
            micro = -(-held.shape[0] // self.spec.micro_batch_size)
            for s, node in enumerate(self.replicas[r]):
                calls.append(self.c.service.invoke(
                    node, S.TRAIN_STAGE_EVALUATE, {"job": self.job, "step": step, "micro_batches": micro,
                                                   "shards": shards if s == 0 else []},
                    [held] if s == 0 else [], timeout=STEP_TIMEOUT_S))
        return await self.gather_sums(calls)

    async def apply(self, step: int, lr: float, results: dict[int, list[S.StageStepped]]) -> list[S.NodeRef]:
        return await self.apply_everywhere(S.TRAIN_STAGE_APPLY.name, {"job": self.job, "step": step, "lr": lr,
                                                                      "grad_norm": self.grad_norm(results)})

    def node_name(self, key: tuple[int, int]) -> str:
        replica, stage = key
        return self.replicas[replica][stage].name

    def where(self, node: S.NodeRef) -> tuple[int, int]:
        """(replica, stage) of a node of the job."""
        for r, nodes in enumerate(self.replicas):
            for s, n in enumerate(nodes):
                if n.public_key == node.public_key:
                    return r, s
        raise KeyError(node.name)

    def describe(self, node: S.NodeRef) -> str:
        r, s = self.where(node)
        span = self.spec.stages[s]
        replica = f" of replica {r}" if self.spec.replicas > 1 else ""
        return f"stage {s}{replica} ({node.name}, layers {span.start}-{span.end - 1})"

    async def recover(self, dead: list[S.NodeRef]) -> None:
        """Drop the replicas with a dead stage; interrupt the job if none is left."""
        lost = sorted({self.where(n)[0] for n in dead} & set(self.alive))
        for node in dead:
            self.store.event(self.job, "stage_lost", f"{self.describe(node)} stopped answering")
            self.watch.node_lost(node.name, f"({self.describe(node)}) stopped answering")
        remaining = [r for r in self.alive if r not in lost]
        if not remaining:
            names = ", ".join(self.describe(n) for n in dead)
            raise JobInterrupted(f"{names} stopped answering and no replica of it is left; resume with "
                                 f"'dllmctl jobs resume {self.job}' once the node is back")
        dropped = [n for r in lost for n in self.replicas[r] if n.public_key not in {d.public_key for d in dead}]
        self.alive = remaining
        await self.c._release(self.job, dropped)
        for r in lost:
            self.store.event(self.job, "replica_lost", f"replica {r} dropped; continuing with {len(remaining)} "
                                                       f"replica(s)")
        live = {n.public_key for n in self.live}
        for shard in self.shard_ids:
            self.holders[shard] &= live
            if self.owner[shard] in lost:
                holding = [r for r in self.alive if self.first(r).public_key in self.holders[shard]]
                if not holding:
                    raise JobFailed(f"shard {shard[:12]}... is lost: no live replica holds a copy")
                self.owner[shard] = holding[0]
                self.store.event(self.job, "shard_moved", f"shard of {shard_node(self.spec, shard)} now computed "
                                                          f"by replica {holding[0]}")
        await self.form()

    def step_metrics(self, step: int, lr: float, results: dict[int, list[S.StageStepped]], seconds: float) -> dict:
        reference = results[self.alive[0]]
        last = reference[-1]
        bubbles = {r: _bubbles(replies) for r, replies in results.items()}
        nodes = {}
        for r, replies in results.items():
            for s, reply in enumerate(replies):
                nodes[self.replicas[r][s].name] = {
                    "replica": r, "stage": s, "rows": reply.rows, "micro_batches": reply.micro_batches,
                    "compute_s": reply.compute_s, "wait_s": reply.wait_s, "pipeline_s": reply.pipeline_s,
                    "bubble": bubbles[r][s], "comm_s": reply.comm_s, "bytes_sent": reply.bytes_sent,
                    "activation_bytes": reply.activation_bytes}
        bubbles = bubbles[self.alive[0]]
        return {"loss": last.loss, "lr": lr, "grad_norm": self.grad_norm(results), "tokens": last.tokens, "step_s": seconds,
                "tokens_per_s": last.tokens / seconds if seconds else None,
                "compute_s": max(r.compute_s for replies in results.values() for r in replies),
                "comm_s": max(r.comm_s for replies in results.values() for r in replies),
                "bubble": sum(bubbles) / len(bubbles),  # the replica's mean: the schedule's theory is per stage
                "bubble_theoretical": schedule.theoretical_bubble(self.stages, reference[0].micro_batches),
                "bytes_between_stages": sum(r.bytes_sent for replies in results.values() for r in replies),
                "stages": [{"stage": s, "compute_s": reply.compute_s, "bubble": bubbles[s],
                            "activation_bytes": reply.activation_bytes} for s, reply in enumerate(reference)],
                "nodes": nodes}

    # --- checkpoints -----------------------------------------------------------------------------

    def writers(self) -> list[S.NodeRef]:
        """Who writes each stage's part: that stage of the first live replica (all replicas are equal)."""
        return [self.replicas[self.alive[0]][s] for s in range(self.stages)]

    async def checkpoint(self, step: int, metrics: dict | None) -> None:
        """Every stage writes its part on its node; the coordinator copies each (its own part goes to
        the next writer's node); complete once the coordinator holds all of them."""
        state = {**self.cursor(step), "metrics": metrics or {}}
        writers = self.writers()
        written = await asyncio.gather(*(self.c.service.invoke(n, S.TRAIN_SAVE_PART,
                                                               {"job": self.job, "step": step, "state": state},
                                                               timeout=PART_TIMEOUT_S) for n in writers))
        me, own = self.c.service.identity.public_key, self.spec.nodes[0]  # the coordinator
        copies = []
        for s, (info, _) in enumerate(written):
            writer = writers[s]
            # The coordinator's own part goes to another writer; every other part comes to the coordinator.
            target = next((w for w in writers if w.public_key != me), None) if writer.public_key == me else own
            if target is not None:
                copies.append(self.c.service.invoke(target, S.TRAIN_FETCH_PART, {
                    "job": self.job, "stage": s, "step": step, "holder": to_wire(writer), "signer": info.signer},
                    timeout=PART_TIMEOUT_S))
        await asyncio.gather(*copies)
        size = sum(info.bytes for info, _ in written)
        self.store.event(self.job, "checkpoint", f"step {step} ({self.stages} parts, {size} bytes)")

    async def load_checkpoint(self, step: int) -> int:
        """Every stage of every replica loads its part (from its own copy, or the coordinator's)."""
        checkpoints = self.c.checkpoints(self.job)
        own = to_wire(self.spec.nodes[0])  # the coordinator holds a copy of every part
        await asyncio.gather(*(self.c.service.invoke(node, S.TRAIN_LOAD_PART, {
            "job": self.job, "step": step, "holder": own, "signer": checkpoints.signer(step, self.where(node)[1])},
            timeout=PART_TIMEOUT_S) for node in self.live))
        return step


def _bubbles(replies: list[S.StageStepped]) -> list[float]:
    """Each stage's idle share of its replica's pipeline phase: from the step's start (every stage is
    asked at once) to the last stage done with its last backward. A stage measured against its own
    end would hide the idle time of the stages that finish early (the last, under 1F1B)."""
    span = max(r.pipeline_s for r in replies)
    return [1 - r.compute_s / span if span > 0 else 0.0 for r in replies]
