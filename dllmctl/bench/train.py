"""``dllmctl bench train``: fine-tuning throughput on temporary local nodes against one process.

Shards real code (the standard library by default) onto N temporary daemons, runs a data-parallel
job there, and runs the same steps in this process (``dllmd.train.local``) as the baseline. Figures:
tokens/s both ways (the first step, which warms up allocators, is left out of the medians), the
share of each distributed step spent communicating, and the weights' largest difference.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from dllmctl.cluster import local as local_cluster
from dllmctl.bench.shard import stdlib_source
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.data.sharding import ShardRequest, shard_and_push
from dllmctl.training.jobs import job_call, job_spec, submit
from dllmd.data.shards import read_shard
from dllmd.net.identity import Identity
from dllmd.train.local import train_locally
from dllmd.train.optim import OptimConfig
from dllmd.train.worker import ShardRows
from dllmd.net.messages import training as S

POLL_S = 0.5


def run(user: Identity, model: str, model_dir: Path, nodes: int, steps: int, batch_size: int, micro_batch_size: int,
        seq_len: int, source: str | None = None, include: list[str] | None = None, lr: float = 1e-5) -> dict:
    source = source or stdlib_source()
    include = include or ["json/*.py", "email/*.py"]
    with tempfile.TemporaryDirectory(prefix="dllm-bench-train-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        started = local_cluster.up(nodes, Path(tmp), user, registry)
        entries = [NodeEntry(n.name, n.address, n.public_key) for n in started]
        try:
            request = ShardRequest(uri=source, model=model, model_dir=model_dir, strategy="random", name="bench",
                                   seq_len=seq_len, include=include, exclude=["site-packages/"])
            dataset = shard_and_push(user, entries, request)
            spec = job_spec(model, dataset, entries, batch_size=batch_size, micro_batch_size=micro_batch_size,
                            epochs=0, max_steps=steps, lr=lr, checkpoint_every=0)
            job = asyncio.run(submit(user, entries, model_dir, spec))["job"]
            metrics = _wait(user, entries[0], job)
            shards = {}
            for node in started:
                tokens, meta = read_shard(Path(node.home) / "datasets" / "bench" / "shard.safetensors")
                shards[node.public_key] = ShardRows(tokens, int(meta["tokens"]))
        finally:
            local_cluster.down(Path(tmp), registry)
    local: list[dict] = []
    train_locally(model_dir, shards, steps, batch_size, micro_batch_size, OptimConfig(lr=lr),
                  on_step=lambda step, m: local.append(m))
    timed = metrics[1:] or metrics
    distributed_tps = statistics.median(m["tokens_per_s"] for m in timed)
    local_tps = statistics.median(m["tokens_per_s"] for m in (local[1:] or local))
    return {"model": model, "nodes": nodes, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
            "micro_batch_size": micro_batch_size, "tokens_per_step": metrics[0]["tokens"],
            "distributed": {"tokens_per_second": round(distributed_tps, 1),
                            "step_s": round(statistics.median(m["step_s"] for m in timed), 3),
                            "compute_s": round(statistics.median(m["compute_s"] for m in timed), 3),
                            "comm_s": round(statistics.median(m["comm_s"] for m in timed), 3),
                            "comm_share": round(statistics.median(m["comm_s"] / m["step_s"] for m in timed), 3),
                            "loss": [round(m["loss"], 4) for m in metrics]},
            "local": {"tokens_per_second": round(local_tps, 1),
                      "step_s": round(statistics.median(m["step_s"] for m in (local[1:] or local)), 3),
                      "loss": [round(m["loss"], 4) for m in local]},
            "ratio_tokens_per_second": round(distributed_tps / local_tps, 3)}


def _wait(user: Identity, coordinator: NodeEntry, job: str) -> list[dict]:
    while True:
        status = asyncio.run(job_call(user, coordinator, S.JOBS_METRICS, {"job": job}))
        if status["state"] == "failed":
            shown = asyncio.run(job_call(user, coordinator, S.JOBS_SHOW, {"job": job}))
            raise RuntimeError(f"the benchmark job failed: {shown['error']}")
        if status["state"] == "done":
            return status["metrics"]
        time.sleep(POLL_S)
