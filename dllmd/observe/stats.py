"""``node.stats``: what a node is doing now, assembled from its services and its counters (:mod:`.metrics`).

Cheap on purpose (a live view asks every node every second or two): no disk, no benchmark, the CPU
figure is the sampler's (``NodeMetrics.sample``), not a fresh measurement that would block.
"""

from __future__ import annotations

import os
import time

import psutil

from dllmd import hardware
from dllmd.net.messages.node import GpuLoad, NodeStats, RunningJob
from dllmd.observe.metrics import NodeMetrics, total

SAMPLE_INTERVAL_S = 1.0


def gpu_loads() -> list[GpuLoad]:
    """The GPUs this process may use, with their memory in use and (where NVML answers) utilization."""
    return [GpuLoad(index=g["index"], name=g["name"], memory_used_bytes=g["memory_total"] - g["memory_free"],
                    memory_total_bytes=g["memory_total"], util_percent=hardware.gpu_utilization(i))
            for i, g in enumerate(hardware.gpus())]


def node_stats(name: str, metrics: NodeMetrics, inference, training, prefix_stats: bool = False) -> NodeStats:
    """``inference`` is the node's InferenceService, ``training`` its TrainingService. ``prefix_stats``
    False hides the prefix cache's contents, as ``info`` does for a client."""
    mem = psutil.virtual_memory()
    serving = inference.serving(prefix_stats=prefix_stats)
    generated_rate, processed_rate = metrics.rates()
    return NodeStats(
        name=name, uptime_s=round(time.time() - metrics.started, 3), cpu_percent=metrics.cpu_percent,
        cpu_cores=os.cpu_count() or 1, ram_used_bytes=mem.total - mem.available, ram_total_bytes=mem.total,
        rss_bytes=psutil.Process().memory_info().rss, gpus=gpu_loads(), serving=serving,
        sessions=len(inference.sessions), queued=sum(s.queued for s in serving),
        tokens_generated=int(total(metrics.tokens_generated)), tokens_per_s=round(generated_rate, 3),
        tokens_processed=int(total(metrics.tokens_processed)), processed_per_s=round(processed_rate, 3),
        requests=int(total(metrics.requests)), errors=int(total(metrics.errors)),
        jobs=running_jobs(metrics, training), train_workers=sorted(training.workers))


def running_jobs(metrics: NodeMetrics, training) -> list[RunningJob]:
    """Jobs this node coordinates whose run has not ended, with their latest step's figures."""
    coordinator = training.coordinator
    out = []
    for job, task in list(coordinator.tasks.items()):
        if task.done():
            continue
        row = coordinator.store.get(job)
        out.append(RunningJob(job=job, state=row["state"], step=row["step"], total_steps=row["total_steps"],
                              loss=metrics.job_figure("loss", job),
                              tokens_per_s=metrics.job_figure("tokens_per_s", job),
                              step_s=metrics.job_figure("step_s", job)))
    return out
