"""What the dashboard shows, as JSON documents: the nodes and the layers each holds (tensor-parallel
groups, replicas as layer coverage), recent training jobs, and their events (``alert.*`` kinds are
alerts). Everything is asked live, as ``dllmctl nodes list`` and ``dllmctl jobs list`` ask it."""

from __future__ import annotations

import asyncio
import re
import time

from dllmd.net.identity import Identity
from dllmctl.cluster.live import query_nodes
from dllmctl.cluster.registry import NodeEntry
from dllmctl.frontends.views import NODE_TIMEOUT_S, models_of, show_job
from dllmctl.training.jobs import find_coordinator, job_metrics, list_jobs

RECENT_JOBS = 10  # jobs whose details (last loss, events) a snapshot carries, newest first
MAX_EVENTS = 100
ALERT_PREFIX = "alert."
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # what a coordinator names a job, at most


async def snapshot(user: Identity, nodes: list[NodeEntry]) -> dict:
    """One poll of the dashboard: nodes, models (who holds which layers), jobs, events."""
    rows, (jobs, unreachable) = await asyncio.gather(query_nodes(user, nodes, NODE_TIMEOUT_S), list_jobs(user, nodes))
    recent = jobs[::-1][:RECENT_JOBS]
    details = await asyncio.gather(*(show_job(user, nodes, job) for job in recent))
    events = [{"job": job["job"], **event, "alert": event["kind"].startswith(ALERT_PREFIX)}
              for job, detail in zip(recent, details) if detail for event in detail["events"]]
    events.sort(key=lambda e: e["time"], reverse=True)
    return {"time": time.time(), "nodes": [node_row(r) for r in rows], "models": models_of(rows),
            "jobs": [job_row(job, detail) for job, detail in zip(recent, details)],
            "events": events[:MAX_EVENTS], "unreachable": unreachable}


def node_row(row: dict) -> dict:
    """A ``query_nodes`` row as the page draws it: status, machine, and each span it serves."""
    hardware = row.get("hardware") or {}
    return {"name": row["name"], "status": row["status"], "latency_ms": row["latency_ms"], "error": row["error"],
            "device": hardware.get("device"), "cpu_cores": hardware.get("cpu_cores"),
            "ram_total": hardware.get("ram_total"), "ram_available": hardware.get("ram_available"),
            "memory_used_bytes": row.get("memory_used_bytes"),
            "spans": [span_row(s) for s in row["serving"]]}


def span_row(span: dict) -> dict:
    """A served span: its layers ``[start, end)``, load counters (``tokens`` counts up; the page turns
    it into tokens/s), and its tensor-parallel group when it holds a slice of each layer."""
    tensor = span.get("tensor_slice") or {}
    return {**{k: span.get(k) for k in ("model", "start", "end", "head", "dtype", "sessions", "queued", "tokens",
                                         "step_ms")},
            "group": tensor.get("group"), "rank": tensor.get("rank"), "group_size": tensor.get("size")}


def job_row(job: dict, detail: dict | None) -> dict:
    last = (detail or {}).get("last_metrics") or {}
    return {**{k: job[k] for k in ("job", "state", "model", "dataset", "nodes", "step", "total_steps", "created",
                                   "updated", "error", "coordinator")},
            "parallelism": (detail or {}).get("parallelism"), "loss": last.get("loss"),
            "tokens_per_s": last.get("tokens_per_s")}


async def metrics(user: Identity, nodes: list[NodeEntry], job: str, after_step: int) -> dict:
    """A job's steps after ``after_step``: what the loss chart appends."""
    page = await job_metrics(user, await find_coordinator(user, nodes, job), job, after_step)
    return {"job": job, "state": page["state"], "step": page["step"], "total_steps": page["total_steps"],
            "metrics": [{k: row.get(k) for k in ("step", "loss", "heldout_loss", "lr", "tokens_per_s")}
                        for row in page["metrics"]]}
