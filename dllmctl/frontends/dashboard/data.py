"""What the dashboard shows, as JSON documents: the nodes (:mod:`dllmctl.monitor.snapshot`, what
``dllmctl top`` shows: load, tokens/s) and the layers each holds (tensor-parallel groups, replicas as
layer coverage), recent training jobs, and their events (``alert.*`` kinds are alerts). Everything is
asked live, as ``dllmctl top`` and ``dllmctl jobs list`` ask it."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict

from dllmd.net.identity import Identity
from dllmd.net.messages.node import ServedSpan
from dllmctl.cluster.registry import NodeEntry
from dllmctl.frontends.views import models_of, show_job
from dllmctl.monitor.snapshot import JobView, NodeView, snapshot_nodes
from dllmctl.training.jobs import find_coordinator, job_metrics, list_jobs

RECENT_JOBS = 10  # jobs whose details (last loss, events) a snapshot carries, newest first
MAX_EVENTS = 100
ALERT_PREFIX = "alert."
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # what a coordinator names a job, at most


async def snapshot(user: Identity, nodes: list[NodeEntry]) -> dict:
    """One poll of the dashboard: nodes, models (who holds which layers), jobs, events."""
    cluster, (jobs, unreachable) = await asyncio.gather(snapshot_nodes(user, nodes), list_jobs(user, nodes))
    recent = jobs[::-1][:RECENT_JOBS]
    details = await asyncio.gather(*(show_job(user, nodes, job) for job in recent))
    events = [{"job": job["job"], **event, "alert": event["kind"].startswith(ALERT_PREFIX)}
              for job, detail in zip(recent, details) if detail for event in detail["events"]]
    events.sort(key=lambda e: e["time"], reverse=True)
    rows = [node_row(n) for n in cluster.nodes]
    live = {j.job: j for j in cluster.jobs}  # running jobs' latest figures, from their coordinators' node.stats
    return {"time": cluster.taken_at, "up": cluster.up, "tokens_per_s": round(cluster.tokens_per_s, 3),
            "nodes": rows, "models": models_of([{**r, "serving": r["spans"]} for r in rows]),
            "jobs": [job_row(job, detail, live.get(job["job"])) for job, detail in zip(recent, details)],
            "events": events[:MAX_EVENTS], "unreachable": unreachable}


def node_row(node: NodeView) -> dict:
    """A node as the page draws it: status, load, tokens/s, and each span it serves."""
    stats = node.stats
    row = {"name": node.name, "status": node.status, "latency_ms": node.latency_ms, "error": node.error,
           "spans": [span_row(s) for s in stats.serving] if stats else []}
    if stats:
        row.update(cpu_percent=stats.cpu_percent, cpu_cores=stats.cpu_cores, ram_used_bytes=stats.ram_used_bytes,
                   ram_total_bytes=stats.ram_total_bytes, gpus=[asdict(g) for g in stats.gpus],
                   sessions=stats.sessions, tokens_per_s=stats.tokens_per_s, processed_per_s=stats.processed_per_s)
    return row


def span_row(span: ServedSpan) -> dict:
    """A served span: its layers ``[start, end)`` and load, and its tensor-parallel group when it
    holds a slice of each layer."""
    tensor = span.tensor_slice
    return {"model": span.model, "start": span.start, "end": span.end, "dtype": span.dtype, "sessions": span.sessions,
            "queued": span.queued, "step_ms": span.step_ms, "group": tensor.group if tensor else None,
            "rank": tensor.rank if tensor else None, "group_size": tensor.size if tensor else None}


def job_row(job: dict, detail: dict | None, live: JobView | None) -> dict:
    """A ``jobs.list`` entry with its last step's loss and tokens/s (and, running, its ETA)."""
    last = (detail or {}).get("last_metrics") or {}
    return {**{k: job[k] for k in ("job", "state", "model", "dataset", "nodes", "step", "total_steps", "created",
                                   "updated", "error", "coordinator")},
            "parallelism": (detail or {}).get("parallelism"), "loss": last.get("loss"),
            "tokens_per_s": last.get("tokens_per_s"), "eta_s": live.eta_s if live else None}


async def metrics(user: Identity, nodes: list[NodeEntry], job: str, after_step: int) -> dict:
    """A job's steps after ``after_step``: what the loss chart appends."""
    page = await job_metrics(user, await find_coordinator(user, nodes, job), job, after_step)
    return {"job": job, "state": page["state"], "step": page["step"], "total_steps": page["total_steps"],
            "metrics": [{k: row.get(k) for k in ("step", "loss", "heldout_loss", "lr", "tokens_per_s")}
                        for row in page["metrics"]]}
