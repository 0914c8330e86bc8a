"""One look at the whole cluster: every registered node's ``node.stats`` (asked concurrently, with its
latency) and every job still running on a coordinator among them, with its ETA.

No rich, no typer: ``dllmctl top`` renders a snapshot, the web dashboard serves ``to_dict()``.

The running jobs come from their coordinators' ``node.stats`` (the job store's figures: step, loss,
tokens/s, step time), so one round trip per node serves a refresh; ``jobs.*`` stays for the full story.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import zmq

from dllmd.net.identity import Identity
from dllmd.net.messages.node import NODE_STATS, NodeStats
from dllmctl.cluster.live import STATUS_UP, ask_node
from dllmctl.cluster.registry import NodeEntry, Registry

DEFAULT_TIMEOUT_S = 2.0


@dataclass
class NodeView:
    """A node as the snapshot found it: ``stats`` when ``status`` is up, else ``error`` and ``code``
    (the node's error code, or down / unauthorized / key-mismatch)."""

    name: str
    address: str
    status: str
    latency_ms: float | None = None
    stats: NodeStats | None = None
    error: str | None = None
    code: str | None = None


@dataclass
class JobView:
    job: str
    coordinator: str  # the node it runs on
    state: str
    step: int
    total_steps: int
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None  # steps left times the latest step's time


@dataclass
class ClusterSnapshot:
    taken_at: float  # unix time
    nodes: list[NodeView] = field(default_factory=list)
    jobs: list[JobView] = field(default_factory=list)

    @property
    def up(self) -> int:
        return sum(1 for n in self.nodes if n.status == STATUS_UP)

    @property
    def tokens_per_s(self) -> float:
        """Tokens the cluster generates per second (summed over the nodes' last stages)."""
        return sum(n.stats.tokens_per_s for n in self.nodes if n.stats is not None)

    def to_dict(self) -> dict:
        """Plain maps and lists, ready for JSON."""
        return {"taken_at": self.taken_at, "up": self.up, "down": len(self.nodes) - self.up,
                "tokens_per_s": round(self.tokens_per_s, 3),
                "nodes": [asdict(n) for n in self.nodes], "jobs": [asdict(j) for j in self.jobs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def jobs_of(node: str, stats: NodeStats) -> list[JobView]:
    out = []
    for job in stats.jobs:
        eta = (job.total_steps - job.step) * job.step_s if job.step_s else None
        out.append(JobView(job=job.job, coordinator=node, state=job.state, step=job.step, total_steps=job.total_steps,
                           loss=job.loss, tokens_per_s=job.tokens_per_s, eta_s=round(eta, 1) if eta is not None else None))
    return out


async def snapshot_nodes(identity: Identity, entries: list[NodeEntry],
                         timeout: float = DEFAULT_TIMEOUT_S) -> ClusterSnapshot:
    """Ask ``entries`` at once; a node that is down or refuses is a row saying so, never an exception."""
    ctx = zmq.Context()
    try:
        answers = await asyncio.gather(*(ask_node(identity, e, NODE_STATS, timeout, ctx) for e in entries))
    finally:
        ctx.destroy(linger=0)
    snap = ClusterSnapshot(taken_at=time.time())
    for entry, answer in zip(entries, answers):
        snap.nodes.append(NodeView(entry.name, entry.address, answer.status, answer.latency_ms, answer.reply,
                                   answer.error, answer.code))
        if answer.reply is not None:
            snap.jobs += jobs_of(entry.name, answer.reply)
    return snap


async def cluster_snapshot(identity: Identity, registry: Registry, names: list[str] | None = None,
                           timeout: float = DEFAULT_TIMEOUT_S) -> ClusterSnapshot:
    """Every registered node (or the ``names`` given; RegistryError for an unknown one), right now."""
    return await snapshot_nodes(identity, registry.select(names), timeout)
