"""One execution of a job, from its first (or resumed) step to done, stopped, failed or interrupted.

:class:`JobRun` is what every parallelism shares: the step loop (compute everywhere, then apply
everywhere only when every part computed the step; metrics; checkpoints every K steps, on stop and
at the end) and the cleanup of a failed step (ping everyone, reset the survivors, then drop the dead
or form the collectives again and retry). :class:`DataParallelRun` is data parallelism (a replica per
node, one ring); :class:`dllmd.train.diloco.run.DiLoCoRun` its DiLoCo form (outer steps of local inner
steps); :class:`dllmd.train.pipeline.run.PipelineRun` pipelines and hybrids.
"""

from __future__ import annotations

import asyncio
import statistics
import logging
import time

import torch

from dllmd.failpoints import failpoint
from dllmd.net.messages import training as S
from dllmd.net.schema import to_wire
from dllmd.train import heldout, schedule
from dllmd.train.heldout import EvalSums, HeldOut, held_rows
from dllmd.train.jobs import JobFailed
from dllmd.train.privacy.job import JobPrivacy
from dllmd.train.watch import JobWatch

log = logging.getLogger("dllmd.coordinator")

STEP_TIMEOUT_S = 3600.0
# A step unanswered for HUNG_FACTOR x the median of the last HUNG_WINDOW steps (at least HUNG_MIN_S):
# the nodes are pinged, those that do not answer dropped, and the job goes on.
HUNG_FACTOR, HUNG_MIN_S, HUNG_WINDOW = 3.0, 30.0, 20
RESET_GRACE_MIN_S = 10.0
PREPARE_TIMEOUT_S = 600.0
MAX_FAILED_ATTEMPTS = 3  # failed steps in a row with no node lost: give up (something else is wrong)
STATE_MESSAGE_BYTES = 64 * 1024 * 1024
STATE_MESSAGE_TENSORS = 48  # a message carries at most 64 tensors
NODE_PREFIX = "optim.node."  # a checkpoint's copy of one worker's own state: optim.node.<key>.<name>


class JobRun:
    """The loop; subclasses say how a step is computed, applied, recovered from and checkpointed."""

    def __init__(self, coordinator, job: str, spec: S.JobSpec):
        self.c, self.job, self.spec = coordinator, job, spec
        self.store = coordinator.store
        self.heldout = HeldOut(spec)
        self.rows = self.heldout.train_counts  # rows per shard the batches are drawn from
        self.shard_ids = sorted(self.rows)
        self.holders = {s: {s} for s in self.shard_ids}  # shard -> nodes holding its rows
        for key, shards in coordinator.spares.pop(job, {}).items():  # spares the nodes kept on disk
            for shard in shards:
                if shard in self.holders:
                    self.holders[shard].add(key)
        self.generation = 0
        self.total = schedule.total_steps(self.rows, spec.batch_size, spec.epochs or None, spec.max_steps or None)
        self.privacy = JobPrivacy.of(spec)  # None: exact training

    @property
    def live(self) -> list[S.NodeRef]:
        raise NotImplementedError

    async def begin(self) -> None:
        """Before the first step (or the first after a resume)."""

    async def execute(self, resume_from: int | None) -> None:
        self.watch = JobWatch(self)
        try:
            await self._execute(resume_from)
        finally:
            self.watch.close()

    async def _execute(self, resume_from: int | None) -> None:
        self.store.set_state(self.job, "running")
        step = 0
        await self.begin()
        if resume_from is not None:
            step = await self.load_checkpoint(resume_from)
        await self.form()
        failed_attempts, metrics, budget_spent = 0, None, None
        while step < self.total:
            if self.job in self.c.stopping:
                break
            budget_spent = self.privacy.over_budget(step) if self.privacy else None
            if budget_spent:
                self.store.event(self.job, "privacy_budget", budget_spent + ": the job ends here")
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
            lost = await self.apply(step, lr, results)
            if lost:  # they died between step and apply: those that applied carry on without them
                await self.recover(lost)
            metrics = self.step_metrics(step, lr, results, time.perf_counter() - started)
            if self.privacy:
                metrics.update(self.privacy.metrics(step + 1))
            if self.heldout.due(step, self.total):
                metrics.update(await self.evaluate(step))
            self.store.record_step(self.job, step, metrics)
            self.watch.step_done(step, metrics)
            step += 1
            if self.spec.checkpoint_every and step % self.spec.checkpoint_every == 0 and step < self.total:
                await self.checkpoint(step, metrics)
        await self.checkpoint(step, metrics)
        if step >= self.total or budget_spent:
            self.store.set_state(self.job, "done")
            self.store.event(self.job, "done", f"{step} steps")
        else:
            self.store.set_state(self.job, "stopped")
            self.store.event(self.job, "stopped", f"after step {step}; resume with 'dllmctl jobs resume {self.job}'")

    async def apply_everywhere(self, op: str, args: dict) -> list[S.NodeRef]:
        """``op`` (an apply) on every live node; those that failed."""
        applied = await asyncio.gather(*(self.c.service.call(n, op, args, timeout=600) for n in self.live),
                                       return_exceptions=True)
        return [n for n, r in zip(self.live, applied) if isinstance(r, BaseException)]

    async def all_or_cleanup(self, step: int, tasks: dict) -> dict | None:
        """Wait for a step's calls (``key -> task``); their replies by key, or after the first failure
        None, once the failure is cleaned up: survivors reset (their half-done step is discarded,
        nothing was applied), then the dead dropped or, with none dead, the collectives formed again."""
        self.watch.pending = {self.node_name(key): task for key, task in tasks.items()}
        deadline = self.step_deadline_s()
        done, pending = await asyncio.wait(tasks.values(), timeout=deadline, return_when=asyncio.FIRST_EXCEPTION)
        if not pending and all(t.exception() is None for t in done):
            return {key: task.result()[0] for key, task in tasks.items()}
        first = next((t.exception() for t in done if t.exception() is not None), None) or (
            f"no answer from {', '.join(sorted({self.node_name(k) for k, t in tasks.items() if not t.done()}))} "
            f"within {deadline:.0f} s (3x the usual step, at least {HUNG_MIN_S:.0f} s)")
        log.warning("job %s step %d failed: %s", self.job, step, first)
        nodes = self.live
        alive = await asyncio.gather(*(self.c.alive(n) for n in nodes))
        dead = [n for n, ok in zip(nodes, alive) if not ok]
        survivors = [n for n, ok in zip(nodes, alive) if ok]
        await asyncio.gather(*(self.c.service.call(n, S.TRAIN_RESET.name, {"job": self.job}, timeout=10)
                               for n in survivors), return_exceptions=True)
        # The survivors' calls end once reset (a node mid-compute at most one step later); a dead
        # node's is not waited for. One still running then answers pings but does not finish its
        # step (a stuck GPU, a thread in a deadlock): it is dropped as a dead node is.
        dead_names = {n.name for n in dead}
        await asyncio.wait([t for k, t in tasks.items() if self.node_name(k) not in dead_names] or
                           list(tasks.values()), timeout=self.reset_grace_s())
        stuck_names = {self.node_name(k) for k, t in tasks.items() if not t.done()} - dead_names
        for task in tasks.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # seen
        me = self.c.service.identity.public_key  # its own call is in-process: nothing to drop it to
        stuck = [n for n in survivors if n.name in stuck_names and n.public_key != me]
        for node in stuck:
            self.watch.raise_alert("node_hung", f"{node.name} answers pings but did not finish step {step} after a "
                                                f"reset; the job goes on without it", node=node.name, step=step)
        if stuck:
            dead = dead + stuck
            await self.c._release(self.job, stuck)
        cut_off = [] if dead else await self.cut_off(survivors)
        if dead:
            await self.recover(dead)
        elif cut_off:
            await self.recover(cut_off)
            await self.c._release(self.job, cut_off)
        else:
            self.store.event(self.job, "step_failed", f"step {step}: {first}; retrying")
            await self.form()
        return None

    async def cut_off(self, nodes: list[S.NodeRef]) -> list[S.NodeRef]:
        """With every node answering the coordinator, a step can still fail on a cut link between two
        of them (a ring neighbour's chunks never come): each node pings the others (``train.probe``),
        and of every pair that cannot reach each other one is dropped, as a dead node would be: the
        node cut from the most others first, never the coordinator, else the later in the job's order.
        An event names each cut link."""
        replies = await asyncio.gather(*(self.c.service.invoke(n, S.TRAIN_PROBE, {
            "job": self.job, "members": [to_wire(m) for m in nodes]}, timeout=30) for n in nodes),
            return_exceptions=True)
        order = {n.public_key: i for i, n in enumerate(nodes)}
        cut = {frozenset((n.public_key, key)) for n, reply in zip(nodes, replies)
               if not isinstance(reply, BaseException) for key in reply[0].unreachable if key in order}
        for pair in sorted(cut, key=lambda p: sorted(order[k] for k in p)):
            a, b = sorted(pair, key=order.get)
            self.store.event(self.job, "link_lost", f"{nodes[order[a]].name} and {nodes[order[b]].name} cannot reach "
                                                    f"each other")
        me, dropped = self.c.service.identity.public_key, []
        while cut:
            count = {key: sum(key in pair for pair in cut) for pair in cut for key in pair}
            victim = max((k for k in count if k != me), key=lambda k: (count[k], order[k]))
            dropped.append(nodes[order[victim]])
            cut = {pair for pair in cut if victim not in pair}
        return dropped

    def step_deadline_s(self) -> float | None:
        """How long a step's calls may go unanswered before the nodes are checked (a node that no longer
        answers a ping is then dropped as dead: SIGSTOPped, swapping to death, a stuck driver): 3x the
        median step, at least 30 s. None until two steps are measured (the first ones warm up)."""
        recent = list(self.watch.step_times)[-HUNG_WINDOW:]
        if len(recent) < 2:
            return None
        return max(HUNG_MIN_S, HUNG_FACTOR * statistics.median(recent))

    def reset_grace_s(self) -> float:
        """How long the survivors' step calls may take to end after a reset: a node mid-compute
        finishes its pass first. The median step, at least RESET_GRACE_MIN_S (30 s before two steps
        are measured)."""
        recent = list(self.watch.step_times)[-HUNG_WINDOW:]
        return max(RESET_GRACE_MIN_S, statistics.median(recent)) if len(recent) >= 2 else 30.0

    def node_name(self, key) -> str:
        """The name of the node a step's call ``key`` (its public key) went to."""
        return next((n.name for n in self.spec.nodes if n.public_key == key), str(key))

    # --- what a parallelism says -----------------------------------------------------------------

    async def form(self) -> None:
        raise NotImplementedError

    async def compute(self, step: int):
        raise NotImplementedError

    async def apply(self, step: int, lr: float, results) -> list[S.NodeRef]:
        raise NotImplementedError

    async def recover(self, dead: list[S.NodeRef]) -> None:
        raise NotImplementedError

    def step_metrics(self, step: int, lr: float, results, seconds: float) -> dict:
        raise NotImplementedError

    async def checkpoint(self, step: int, metrics: dict | None) -> None:
        raise NotImplementedError

    async def load_checkpoint(self, step: int) -> int:
        raise NotImplementedError

    async def heldout_loss(self) -> float:
        """The held-out text's mean token loss under the current weights (``JobSpec.eval_tokens``)."""
        raise NotImplementedError

    async def score_heldout(self, step: int) -> EvalSums | None:
        """The held-out rows' sums under the current weights, added over their scorers; None when a
        scorer failed (the rows' owner is gone: the next step notices and recovers)."""
        raise NotImplementedError

    async def evaluate(self, step: int) -> dict:
        """The metrics of the held-out text and rows after ``step``."""
        out = {}
        if self.spec.eval_tokens:
            out["heldout_loss"] = await self.heldout_loss()
        if self.heldout.scores_rows:
            sums = await self.score_heldout(step)
            if sums is None:
                self.store.event(self.job, "eval_skipped", f"step {step}: a scorer of the held-out rows failed")
            else:
                out.update(sums.metrics())
        return out

    async def gather_sums(self, calls: list) -> EvalSums | None:
        """Every scorer's :class:`S.Evaluated` (``invoke`` coroutines), added up; None if one failed."""
        replies = await asyncio.gather(*calls, return_exceptions=True)
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        if failed is not None:
            log.warning("job %s: held-out evaluation failed: %s", self.job, failed)
            return None
        return sum((EvalSums(r.nll, r.tokens, r.correct) for r, _ in replies), EvalSums())

    def cursor(self, step: int) -> dict:
        """Where the data order stands after ``step`` steps, and the job: what every checkpoint records."""
        per_epoch = schedule.steps_per_epoch(self.rows, self.spec.batch_size)
        privacy = {"privacy": to_wire(self.privacy.spent(step))} if self.privacy else {}
        return {"job": self.job, "seed": self.spec.seed, "epoch": step // per_epoch,
                "step_in_epoch": step % per_epoch, "spec": to_wire(self.spec), **privacy}

    def batch(self, step: int) -> list[schedule.Row]:
        """The global batch of ``step``: Poisson-sampled with the job's secret seed under DP, else the
        next rows of the shuffled order."""
        if self.privacy:
            return self.heldout.trained(schedule.poisson_batch(self.rows, self.privacy.sample_rate,
                                                               self.privacy.seed, step))
        return self.heldout.trained(schedule.batch(self.rows, self.spec.batch_size, self.spec.seed, step))


class DataParallelRun(JobRun):
    """A full replica on every node; one ring. Checkpoints come from the coordinator's own replica
    (identical to every other); a lost node's shards move to a node holding a copy."""

    def __init__(self, coordinator, job: str, spec: S.JobSpec):
        super().__init__(coordinator, job, spec)
        self._live: list[S.NodeRef] = list(spec.nodes)
        self.owner = {s: s for s in self.shard_ids}  # shard -> the node computing its rows

    async def begin(self) -> None:
        """A resumed job without the nodes that did not answer: dropped as if they had died now."""
        absent = self.c.absent.pop(self.job, [])
        gone = {n.public_key for n in absent}
        if absent:
            self.store.event(self.job, "resumed_without", ", ".join(n.name for n in absent) + " did not answer")
            self._live = [n for n in self._live if n.public_key not in gone]
            await self.recover(absent, form=False)

    @property
    def live(self) -> list[S.NodeRef]:
        return self._live

    def node(self, key: str) -> S.NodeRef:
        return next(n for n in self.live if n.public_key == key)

    async def form(self) -> None:
        """Number the live nodes, tell each its neighbours, and make sure each shard has a spare copy."""
        self.generation += 1
        ports = self.c.ring_ports[self.job]
        members = [ring_member(n, ports[n.public_key]) for n in self.live]
        await asyncio.gather(*(self.c.service.call(n, "train.ring", {"job": self.job, "generation": self.generation,
                                                                     "rank": rank, "members": members})
                               for rank, n in enumerate(self.live)))
        if len(self.live) < 2:
            return
        keys = [n.public_key for n in self.live]
        wanted = 1 + min(self.spec.shard_copies, len(keys) - 1)  # the owner and its spares
        copies = []
        for shard in self.shard_ids:
            holders = self.holders[shard] & set(keys)
            owner = self.owner[shard]
            at = keys.index(owner)
            for spare in (keys[(at + d) % len(keys)] for d in range(1, len(keys))):  # the owner's successors
                if len(holders) >= wanted:
                    break
                if spare not in holders:
                    copies.append((shard, owner, spare))
                    holders.add(spare)
        await asyncio.gather(*(self.c.service.call(self.node(spare), "train.backup",
                                                   {"job": self.job, "shard": shard,
                                                    "holder": to_wire(self.node(owner))}, timeout=PREPARE_TIMEOUT_S)
                               for shard, owner, spare in copies))
        for shard, _, spare in copies:
            self.holders[shard].add(spare)

    def rows_of(self, step: int) -> dict[str, torch.Tensor]:
        """Each live node's rows of global batch ``step`` (those of the shards it computes, in the
        batch's order), as the int64 ``[rows, 2]`` tensor of (shard number, row) a step carries."""
        number = {s: i for i, s in enumerate(self.shard_ids)}
        per_node: dict[str, list[list[int]]] = {n.public_key: [] for n in self.live}
        for row in self.batch(step):
            per_node[self.owner[row.shard]].append([number[row.shard], row.index])
        return {key: torch.tensor(rows, dtype=torch.int64).reshape(-1, 2) for key, rows in per_node.items()}

    async def compute(self, step: int) -> list[dict] | None:
        """Run ``train.step`` everywhere; on a failure, clean up and return None (the step is retried)."""
        rows = self.rows_of(step)
        tasks = {n.public_key: asyncio.ensure_future(self.c.service.call(
            n, "train.step", {"job": self.job, "step": step, "shards": self.shard_ids}, [rows[n.public_key]],
            timeout=STEP_TIMEOUT_S))
            for n in self.live}
        results = await self.all_or_cleanup(step, tasks)
        return None if results is None else [results[n.public_key] for n in self.live]

    async def apply(self, step: int, lr: float, results: list[dict]) -> list[S.NodeRef]:
        return await self.apply_everywhere("train.apply", {"job": self.job, "step": step, "lr": lr})

    async def recover(self, dead: list[S.NodeRef], form: bool = True) -> None:
        """Drop dead nodes, move their shards to nodes holding copies, re-form the ring."""
        gone = {n.public_key for n in dead}
        self._live = [n for n in self.live if n.public_key not in gone]
        for node in dead:
            self.store.event(self.job, "node_lost", f"{node.name} stopped answering; continuing without it")
            self.watch.node_lost(node.name, "stopped answering; the job goes on without it")
        if not self.live or self.live[0].public_key != self.c.service.identity.public_key:
            raise JobFailed("the coordinator's own replica is gone")
        keys = [n.public_key for n in self.live]
        for shard in self.shard_ids:
            self.holders[shard] &= set(keys)
            if self.owner[shard] in gone:
                if not self.holders[shard]:
                    raise JobFailed(f"shard {shard[:12]}... is lost: no live node holds a copy")
                new = min(self.holders[shard], key=keys.index)
                self.store.event(self.job, "shard_moved", f"shard of {shard_node(self.spec, shard)} now computed by "
                                                          f"{self.node(new).name}")
                self.owner[shard] = new
        if form:
            await self.form()

    def step_metrics(self, step: int, lr: float, results: list[dict], seconds: float) -> dict:
        first = results[0]
        return {"loss": first["loss"], "lr": lr, "grad_norm": first["grad_norm"], "tokens": first["tokens"],
                "rows": sum(r["rows"] for r in results), "step_s": seconds,
                "tokens_per_s": first["tokens"] / seconds if seconds else None,
                "compute_s": max(r["compute_s"] for r in results), "comm_s": max(r["comm_s"] for r in results),
                "comm_exposed_s": max(r["comm_exposed_s"] for r in results),
                "bytes_sent": sum(r["bytes_sent"] for r in results),
                "nodes": {n.name: {"rows": r["rows"], "compute_s": r["compute_s"], "comm_s": r["comm_s"],
                                   "bytes_sent": r["bytes_sent"]}
                          for n, r in zip(self.live, results)}}

    async def checkpoint(self, step: int, metrics: dict | None) -> None:
        """The replicas' shared state from the coordinator's own, and every live worker's own state
        (error feedback, DiLoCo's inner AdamW) as ``optim.node.<its key>.<name>``."""
        worker = self.c.service.workers[self.job]
        names = worker.state_names()
        tensors = {n: worker.state_tensor(n) for n in names}
        local_steps = {}
        for node in self.live:
            own, local_steps[node.public_key] = await self.local_state(node)
            tensors.update({f"{NODE_PREFIX}{node.public_key}.{name.removeprefix('local.')}": t for name, t in own.items()})
        config = self.c.service.models.config_path(self.spec.model).read_bytes()
        state = {**self.cursor(step), "optimizer_step": worker.optimizer_step(), "metrics": metrics or {},
                 "torch_rng": torch.get_rng_state().numpy().tobytes().hex(), "local_steps": local_steps,
                 "owners": {shard_node(self.spec, s): self.node(o).name for s, o in self.owner.items()}}
        described = await asyncio.to_thread(self.c.checkpoints(self.job).write, step, tensors, config, state)
        self.store.event(self.job, "checkpoint", f"step {step} ({described['bytes']} bytes)")

    async def heldout_loss(self) -> float:
        model = self.c.service.workers[self.job].model  # the coordinator's replica: the weights every one holds
        return await asyncio.to_thread(heldout.score, model, self.spec)

    async def score_heldout(self, step: int) -> EvalSums | None:
        """Each live worker scores the held-out rows of the shards it computes (of ``--eval-data``: its
        own shard of it); the replicas are identical, so the sums are those of one model."""
        live = {n.public_key for n in self.live}
        own = (lambda shard: shard if shard in live else None) if self.spec.eval_dataset else self.owner.get
        shards, rows = held_rows(self.spec, self.heldout, self.shard_ids, own)
        return await self.gather_sums([self.c.service.invoke(
            self.node(key), S.TRAIN_EVALUATE, {"job": self.job, "shards": shards,
                                                "eval_data": bool(self.spec.eval_dataset)}, [t], timeout=STEP_TIMEOUT_S)
            for key, t in rows.items()])

    async def local_state(self, node: S.NodeRef) -> tuple[dict[str, torch.Tensor], int]:
        """A worker's own state tensors (``local.*``) and its optimizer's step count."""
        listed, _ = await self.c.service.call(node, "train.state", {"job": self.job, "names": [], "local": True})
        tensors = {}
        for batch in message_batches(listed["names"], listed["bytes"]):
            _, got = await self.c.service.call(node, "train.state", {"job": self.job, "names": batch}, timeout=600)
            tensors.update(zip(batch, got))
        return tensors, int(listed["optimizer_step"])

    async def load_checkpoint(self, step: int) -> int:
        tensors, state = await asyncio.to_thread(self.c.checkpoints(self.job).read, step)
        torch.set_rng_state(torch.frombuffer(bytearray(bytes.fromhex(state["torch_rng"])), dtype=torch.uint8))
        shared = {n: t for n, t in tensors.items() if not n.startswith(NODE_PREFIX)}
        local_steps = state.get("local_steps", {})

        async def send(node: S.NodeRef, part: dict[str, torch.Tensor], optimizer_step: int) -> None:
            names = list(part)
            for batch in message_batches(names, [part[n].numel() * part[n].element_size() for n in names]):
                await self.c.service.call(node, "train.load_state",
                                          {"job": self.job, "names": batch, "optimizer_step": optimizer_step},
                                          [part[n] for n in batch], timeout=600)

        async def load(node: S.NodeRef) -> None:
            await send(node, shared, state["optimizer_step"])
            prefix = f"{NODE_PREFIX}{node.public_key}."
            own = {"local." + n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}
            if own:  # a node the checkpoint has none of (it was lost before) starts its own state afresh
                await send(node, own, local_steps.get(node.public_key, 0))

        await asyncio.gather(*(load(n) for n in self.live))
        return step


def message_batches(names: list[str], sizes: list[int]) -> list[list[str]]:
    """``names`` in batches of about :data:`STATE_MESSAGE_BYTES` (and at most
    :data:`STATE_MESSAGE_TENSORS`): one message each."""
    batches, size, current = [], 0, []
    for name, nbytes in zip(names, sizes):
        current.append(name)
        size += nbytes
        if size >= STATE_MESSAGE_BYTES or len(current) >= STATE_MESSAGE_TENSORS:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def ring_member(node: S.NodeRef, port: int) -> dict:
    """A ring member as ``train.ring`` takes it: peers reach its ring socket at the host they already
    know the node by, on the port it bound."""
    return {"name": node.name, "public_key": node.public_key, "address": f"{node.address.rsplit(':', 1)[0]}:{port}"}


def shard_node(spec: S.JobSpec, shard: str) -> str:
    """The name of the node a shard was pushed to."""
    return next((s.node for s in spec.shards if s.id == shard), shard[:12])
