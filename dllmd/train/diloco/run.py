"""A DiLoCo job, as its coordinator runs it: outer steps of ``sync_every`` inner steps each.

The loop's steps are outer steps: one metrics row each, checkpoints every ``--checkpoint-every`` of
them (always at a sync, where every worker's weights are the outer weights), the job's step count.
The data cursor and the learning-rate schedule count inner steps: inner step k trains on the global
batch k a synchronous job would, each worker on the rows of the shards it computes.

An inner step is answered by every worker on its own, so a worker that dies during one does not
hold the others up: the coordinator pings the ones that failed, drops the dead (their shards move to
a node holding a copy, as in a synchronous job, and the ring is formed again without them) and goes
on with the survivors. What a dropped worker trained since the last sync is lost with it (its rows
of those steps included); the next sync averages the survivors' pseudo-gradients. A worker that
failed but still answers is sent the step again (one that took it already answers from the first
time). A failed sync is cleaned up and tried again like a synchronous step, without redoing the
inner steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from dllmd.net.messages import training as S
from dllmd.train import schedule
from dllmd.train.jobs import JobFailed
from dllmd.train.run import MAX_FAILED_ATTEMPTS, STEP_TIMEOUT_S, DataParallelRun

log = logging.getLogger("dllmd.coordinator")


@dataclass
class OuterStep:
    """What one outer step gathered: each inner step's replies, then each worker's sync."""

    index: int
    started: float
    inner: list[list[tuple[S.NodeRef, S.InnerStepped]]] = field(default_factory=list)
    lr: float = 0.0  # of its last inner step


class DiLoCoRun(DataParallelRun):
    def __init__(self, coordinator, job: str, spec: S.JobSpec):
        super().__init__(coordinator, job, spec)
        self.every = spec.sync_every
        self.inner_total = self.total
        self.total = outer_steps(self.inner_total, self.every)
        self._current: OuterStep | None = None

    def inner_steps(self, outer: int) -> range:
        return range(outer * self.every, min((outer + 1) * self.every, self.inner_total))

    async def compute(self, step: int) -> tuple[OuterStep, list[S.Synced]] | None:
        if self._current is None or self._current.index != step:
            self._current = OuterStep(step, time.perf_counter())
        current = self._current
        for inner in self.inner_steps(step)[len(current.inner):]:  # a failed sync is retried without them
            current.lr = schedule.learning_rate(inner, self.spec.lr, self.spec.warmup_steps, self.inner_total)
            current.inner.append(await self.inner_step(inner, current.lr))
        tasks = {n.public_key: asyncio.ensure_future(self.c.service.invoke(
            n, S.TRAIN_SYNC, {"job": self.job, "step": step}, timeout=STEP_TIMEOUT_S)) for n in self.live}
        synced = await self.all_or_cleanup(step, tasks)
        return None if synced is None else (current, [synced[n.public_key] for n in self.live])

    async def inner_step(self, step: int, lr: float) -> list[tuple[S.NodeRef, S.InnerStepped]]:
        """Inner step ``step`` on every live worker; the replies of those that took it."""
        for _ in range(MAX_FAILED_ATTEMPTS):
            nodes, rows = list(self.live), self.rows_of(step)
            replies = await asyncio.gather(*(self.c.service.invoke(
                n, S.TRAIN_INNER, {"job": self.job, "step": step, "lr": lr, "shards": self.shard_ids},
                [rows[n.public_key]], timeout=STEP_TIMEOUT_S) for n in nodes), return_exceptions=True)
            took = [(n, r[0]) for n, r in zip(nodes, replies) if not isinstance(r, BaseException)]
            failed = [(n, r) for n, r in zip(nodes, replies) if isinstance(r, BaseException)]
            if not failed:
                return took
            log.warning("job %s inner step %d failed on %s: %s", self.job, step, failed[0][0].name, failed[0][1])
            alive = await asyncio.gather(*(self.c.alive(n) for n, _ in failed))
            dead = [n for (n, _), ok in zip(failed, alive) if not ok]
            if dead:
                await self.recover(dead)
                return took
            self.store.event(self.job, "step_failed", f"inner step {step}: {failed[0][1]}; retrying")
        raise JobFailed(f"inner step {step} failed {MAX_FAILED_ATTEMPTS} times with every node alive")

    async def recover(self, dead: list[S.NodeRef], form: bool = True) -> None:
        for node in dead:
            self.store.event(self.job, "inner_progress_lost",
                             f"{node.name}'s inner steps since outer step {self._current.index if self._current else 0} "
                             f"are not in the next sync")
        await super().recover(dead, form)

    async def apply(self, step: int, lr: float, results) -> list[S.NodeRef]:
        return await self.apply_everywhere("train.outer", {"job": self.job, "step": step})

    def step_metrics(self, step: int, lr: float, results: tuple[OuterStep, list[S.Synced]], seconds: float) -> dict:
        current, synced = results
        seconds = time.perf_counter() - current.started  # the whole outer step, inner steps and retries too
        first = synced[0]
        per_node: dict[str, dict] = {}
        for replies in current.inner:
            for node, reply in replies:
                mine = per_node.setdefault(node.name, {"rows": 0, "compute_s": 0.0, "tokens": 0})
                mine["rows"] += reply.rows
                mine["compute_s"] += reply.compute_s
                mine["tokens"] += reply.tokens
        for node, reply in zip(self.live, synced):
            per_node.setdefault(node.name, {"rows": 0, "compute_s": 0.0, "tokens": 0}).update(
                comm_s=reply.comm_s, bytes_sent=reply.bytes_sent)
        comm = max(r.comm_s for r in synced)
        return {"loss": first.loss, "lr": current.lr, "grad_norm": first.pseudo_grad_norm, "tokens": first.tokens,
                "rows": sum(n["rows"] for n in per_node.values()), "step_s": seconds,
                "tokens_per_s": first.tokens / seconds if seconds else None,
                "compute_s": sum(max((r.compute_s for _, r in replies), default=0.0) for replies in current.inner),
                "comm_s": comm, "comm_exposed_s": comm, "bytes_sent": sum(r.bytes_sent for r in synced),
                "inner_steps": len(current.inner), "first_inner_step": step * self.every, "nodes": per_node}

    def cursor(self, step: int) -> dict:
        """After outer step ``step``: the data order stands at its inner step."""
        return {**super().cursor(min(step * self.every, self.inner_total)), "outer_step": step}


def outer_steps(inner_steps: int, every: int) -> int:
    """Outer steps of ``every`` inner steps (the last may be shorter) that cover ``inner_steps``."""
    return -(-inner_steps // every)
