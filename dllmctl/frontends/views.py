"""What the cluster looks like, as JSON documents: the MCP resources (``llm://...``,
``training://...``) are these. Every figure is read live from the nodes (or from this client's own
records, which say so); nothing is estimated or invented.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from dllmd.net.client import CallError, RpcClient
from dllmd.net.identity import Identity
from dllmctl.alerts import job_alerts
from dllmctl.cluster.registry import NodeEntry
from dllmctl.cluster.live import LISTED_FIELDS, query_nodes
from dllmctl.placement.coverage import layer_coverage, uncovered
from dllmctl.data.records import DatasetRecords
from dllmctl.models import local_store
from dllmctl.training.jobs import find_coordinator, job_call, job_metrics, list_jobs
from dllmd.net.messages import training as S

RECENT_JOBS = 20  # collections over jobs (checkpoints, metrics, training figures) look at the newest ones
NODE_TIMEOUT_S = 3.0
SPAN_FIGURES = ("model", "start", "end", "dtype", "step_ms", "passes", "tokens", "busy_s", "sessions", "queued",
                "kv_bytes")


async def nodes_view(user: Identity, nodes: list[NodeEntry]) -> list[dict]:
    """Every registered node asked now: what ``dllmctl nodes list --json`` prints."""
    rows = await query_nodes(user, nodes, NODE_TIMEOUT_S)
    return [{k: r.get(k) for k in LISTED_FIELDS} for r in rows]


async def models_view(user: Identity, nodes: list[NodeEntry]) -> list[dict]:
    """Models in the local store and models served by nodes that are up: who serves which layers,
    whether every layer is covered (only then can it generate), and how many copies each layer has."""
    return models_of(await query_nodes(user, nodes, NODE_TIMEOUT_S))


def models_of(rows: list[dict]) -> list[dict]:
    """:func:`models_view` of node rows already asked (``query_nodes``)."""
    served: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "up":
            for span in row["serving"]:
                served.setdefault(span["model"], []).append(
                    {"node": row["name"], "start": span["start"], "end": span["end"], "dtype": span.get("dtype")})
    stored = {m.name: m for m in local_store().list()}
    models = []
    for name in sorted(set(stored) | set(served)):
        spans = served.get(name, [])
        manifest = stored.get(name)
        entry: dict[str, Any] = {"name": name, "in_local_store": manifest is not None, "spans": spans}
        if manifest is not None:
            entry.update(family=manifest.family, layers=manifest.num_layers, params=manifest.params,
                         bytes=manifest.total_bytes, dtype=manifest.dtype, source=manifest.source)
        num_layers = manifest.num_layers if manifest else max((s["end"] for s in spans), default=0)
        runs = layer_coverage(num_layers, [(s["start"], s["end"]) for s in spans])
        entry["coverage"] = [r.to_json() for r in runs]
        # Generating needs every layer served and the tokenizer here (it lives in the local store).
        entry["can_generate"] = bool(spans) and not uncovered(runs) and manifest is not None
        models.append(entry)
    return models


async def performance_view(user: Identity, nodes: list[NodeEntry], recent_inference: list[dict]) -> dict:
    """Measured figures only: per node its matmul GFLOP/s and weight stream GB/s (measured at start), this client's ping
    round trip, and per served span its decode pass time, passes and tokens; the generations this
    process ran; the latest step of recent training jobs."""
    rows = await query_nodes(user, nodes, NODE_TIMEOUT_S)
    node_figures = [{"name": r["name"], "status": r["status"], "latency_ms": r["latency_ms"],
                     "matmul_gflops": (r.get("hardware") or {}).get("matmul_gflops"),
                     "stream_gbps": (r.get("hardware") or {}).get("stream_gbps"),
                     "spans": [{k: s.get(k) for k in SPAN_FIGURES} for s in r["serving"]]} for r in rows]
    rates = [g["tokens_per_second"] for g in recent_inference if g.get("tokens_per_second")]
    inference = {"source": "generations run through this MCP server process (newest last)",
                 "count": len(recent_inference), "recent": recent_inference,
                 "median_tokens_per_second": round(statistics.median(rates), 3) if rates else None}
    jobs, unreachable = await list_jobs(user, nodes)
    training = []
    for job in jobs[-RECENT_JOBS:]:
        shown = await show_job(user, nodes, job)
        last = (shown or {}).get("last_metrics") or {}
        training.append({"job": job["job"], "state": job["state"], "model": job["model"], "nodes": job["nodes"],
                         "step": job["step"], "total_steps": job["total_steps"],
                         **{k: last.get(k) for k in ("loss", "tokens_per_s", "step_s", "compute_s", "comm_s")}})
    return {"measured_at": time.time(), "nodes": node_figures, "inference": inference, "training": training,
            "unreachable": unreachable,
            "fields": {"latency_ms": "one ping round trip from this client, just now",
                       "matmul_gflops": "the node's own matmul benchmark (dllmd measures it once per machine)",
                       "stream_gbps": "GB/s of weights a one-row matmul reads there (measured with it): the decode bound",
                       "step_ms": "the span's recent decode pass time (moving average), what routing weighs",
                       "busy_s": "compute seconds the span has spent since it was loaded",
                       "tokens_per_s": "training tokens per second of the job's latest step"}}


async def show_job(user: Identity, nodes: list[NodeEntry], job: dict) -> dict | None:
    """``jobs.show`` of a ``list_jobs`` entry at its coordinator; None when it cannot be asked."""
    node = next((n for n in nodes if n.name == job["coordinator"]), None)
    if node is None:
        return None
    try:
        return await job_call(user, node, S.JOBS_SHOW, {"job": job["job"]})
    except CallError:
        return None


async def jobs_view(user: Identity, nodes: list[NodeEntry]) -> dict:
    jobs, unreachable = await list_jobs(user, nodes)
    return {"jobs": jobs, "unreachable": unreachable}


async def locate_job(user: Identity, nodes: list[NodeEntry], job: str) -> NodeEntry:
    """The coordinator of ``job``; TrainError when no reachable node has it."""
    return await find_coordinator(user, nodes, job)


async def job_view(user: Identity, nodes: list[NodeEntry], job: str) -> dict:
    node = await locate_job(user, nodes, job)
    return {**await job_call(user, node, S.JOBS_SHOW, {"job": job}), "coordinator": node.name}


async def checkpoints_view(user: Identity, nodes: list[NodeEntry], job: str | None = None) -> dict:
    """One job's checkpoints, or those of the newest jobs (job -> list)."""
    if job is not None:
        node = await locate_job(user, nodes, job)
        listing = await job_call(user, node, S.CHECKPOINTS_LIST, {"job": job})
        return {"job": job, "coordinator": node.name, "checkpoints": listing["checkpoints"]}
    by_name = {n.name: n for n in nodes}
    jobs, unreachable = await list_jobs(user, nodes)
    result: dict[str, Any] = {}
    for entry in jobs[-RECENT_JOBS:]:
        try:
            listing = await job_call(user, by_name[entry["coordinator"]], S.CHECKPOINTS_LIST, {"job": entry["job"]})
            result[entry["job"]] = listing["checkpoints"]
        except (CallError, KeyError) as exc:
            unreachable.append(f"{entry['job']}: {exc}")
    return {"checkpoints": result, "unreachable": unreachable}


async def metrics_view(user: Identity, nodes: list[NodeEntry], job: str | None = None) -> dict:
    """One job's every step (loss, lr, grad norm, tokens/s, times), or the latest step of the newest jobs."""
    if job is not None:
        node = await locate_job(user, nodes, job)
        page = await job_metrics(user, node, job)
        shown = await job_call(user, node, S.JOBS_SHOW, {"job": job})
        return {"job": job, "state": page["state"], "step": page["step"], "total_steps": page["total_steps"],
                "metrics": page["metrics"], "alerts": job_alerts(shown)}
    jobs, unreachable = await list_jobs(user, nodes)
    latest = []
    for entry in jobs[-RECENT_JOBS:]:
        shown = await show_job(user, nodes, entry)
        latest.append({"job": entry["job"], "state": entry["state"], "step": entry["step"],
                       "total_steps": entry["total_steps"], "last": (shown or {}).get("last_metrics"),
                       "last_eval": (shown or {}).get("last_eval"), "alerts": job_alerts(shown or {})})
    return {"jobs": latest, "unreachable": unreachable}


async def data_shards_view(user: Identity, nodes: list[NodeEntry], records: DatasetRecords,
                           dataset: str | None = None) -> dict:
    """This client's dataset records (what training reads), each shard checked against what its node
    holds now: ``present`` is true when the node holds the dataset with the recorded number of
    sequences, false when it does not, null when the node could not be asked."""
    chosen = [records.load(dataset)] if dataset is not None else records.list()
    held = await _held_shards(user, nodes)
    for record in chosen:
        record.pop("skipped", None)
        for row in record.get("nodes", []):
            on_node = held.get(row["node"])
            if on_node is None:
                row["present"] = None
            else:
                shard = on_node.get(record["dataset"])
                row["present"] = bool(shard) and shard.get("sequences") == row.get("sequences")
    return {"datasets": chosen} if dataset is None else chosen[0]


async def _held_shards(user: Identity, nodes: list[NodeEntry]) -> dict[str, dict[str, dict]]:
    """node name -> dataset -> what ``data.list`` says of it; nodes that do not answer are left out."""
    async def one(node: NodeEntry):
        async with RpcClient(user, node.address, node.public_key) as client:
            try:
                result, _ = await client.call("data.list", timeout=NODE_TIMEOUT_S)
                return node.name, {d["dataset"]: d for d in result["datasets"]}
            except CallError:
                return node.name, None

    return {name: held for name, held in await asyncio.gather(*(one(n) for n in nodes)) if held is not None}


def serving_alerts_view() -> dict:
    """This client's serving alerts (stages failover dropped), newest last."""
    from dllmctl.alerts import recent

    return {"alerts": [json.loads(a.to_json()) for a in recent()]}
