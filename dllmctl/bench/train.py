"""``dllmctl bench train``: fine-tuning throughput on temporary local nodes against one process.

Shards real code (the standard library by default) onto temporary daemons, runs a job there (data
parallel, a pipeline, or hybrid), and runs the same steps in this process (``dllmd.train.local``) as
the baseline. Figures: tokens/s both ways (the first step, which warms up allocators, is left out of
the medians), the share of each distributed step spent communicating, and for pipelines the bubble
(measured: the share of each stage's pipeline phase not spent computing, next to the schedule's
theoretical ``(P-1)/(M+P-1)``), the bytes sent between stages per step, and each stage's training
state (fp32 weights, gradients, two moments and the most saved activations it held at once, counted
from the tensors as :mod:`dllmd.train.memory` counts the single process's) against the single
process's, with each process's peak RSS beside it.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from dllmctl.bench.shard import stdlib_source
from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.data.sharding import ShardRequest, shard_and_push
from dllmctl.training.jobs import job_call, job_metrics, job_spec, pipeline_options, submit
from dllmd.data.shards import read_shard
from dllmd.models.span import expected_weight_bytes
from dllmd.net.identity import Identity
from dllmd.net.messages import training as S
from dllmd.train.local import train_locally
from dllmd.train.optim import OptimConfig
from dllmd.train.worker import ShardRows

POLL_S = 0.5
STATE_COPIES = 4  # weights, gradients and AdamW's two moments, fp32
BUBBLE_TOLERANCE = 0.10  # relative, the target on stages balanced by compute
STATE_TARGET = {False: 0.6, True: 0.75}  # per stage vs one process, 2 stages: untied / tied embeddings


def node_count(parallelism: str, nodes: int, dp: int | None, pp: int | None) -> int:
    if parallelism == "model":
        return pp or nodes
    if parallelism == "hybrid":
        return (dp or 2) * (pp or 2)
    return nodes


def run(user: Identity, model: str, model_dir: Path, nodes: int, steps: int, batch_size: int, micro_batch_size: int,
        seq_len: int, source: str | None = None, include: list[str] | None = None, lr: float = 1e-5,
        parallelism: str = "data", schedule: str = "1f1b", dp: int | None = None, pp: int | None = None,
        stage_layers: list[int] | None = None, balance: str = "compute") -> dict:
    source = source or stdlib_source()
    include = include or ["json/*.py", "email/*.py"]
    nodes = node_count(parallelism, nodes, dp, pp)
    if parallelism == "hybrid":
        dp, pp = dp or 2, pp or 2
    with tempfile.TemporaryDirectory(prefix="dllm-bench-train-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        started = local_cluster.up(nodes, Path(tmp), user, registry)
        entries = [NodeEntry(n.name, n.address, n.public_key) for n in started]
        try:
            request = ShardRequest(uri=source, model=model, model_dir=model_dir, strategy="random", name="bench",
                                   seq_len=seq_len, include=include, exclude=["site-packages/"])
            dataset = shard_and_push(user, entries, request)
            pipeline = asyncio.run(pipeline_options(user, entries, model_dir, dataset, parallelism, dp, pp, schedule,
                                                    micro_batch_size, batch_size, stage_layers, False, balance))
            spec = job_spec(model, dataset, entries, batch_size=batch_size, micro_batch_size=micro_batch_size,
                            epochs=0, max_steps=steps, lr=lr, checkpoint_every=0, **pipeline)
            job = asyncio.run(submit(user, entries, model_dir, spec))["job"]
            metrics = wait_done(user, entries[0], job)
            rss = {n.name: peak_rss(n.pid) for n in started}  # the daemons' high-water marks, still running
            shards = node_shards(started, "bench")
        finally:
            local_cluster.down(Path(tmp), registry)
    local: list[dict] = []
    reset_peak_rss()
    train_locally(model_dir, shards, steps, batch_size, micro_batch_size, OptimConfig(lr=lr),
                  on_step=lambda step, m: local.append(m))
    local_rss = peak_rss()
    timed, local_timed = metrics[1:] or metrics, local[1:] or local
    distributed_tps = statistics.median(m["tokens_per_s"] for m in timed)
    local_tps = statistics.median(m["tokens_per_s"] for m in local_timed)
    report = {"model": model, "parallelism": parallelism, "nodes": nodes, "steps": steps, "batch_size": batch_size,
              "seq_len": seq_len, "micro_batch_size": micro_batch_size, "tokens_per_step": metrics[0]["tokens"],
              "distributed": {"tokens_per_second": round(distributed_tps, 1),
                              "step_s": round(statistics.median(m["step_s"] for m in timed), 3),
                              "compute_s": round(statistics.median(m["compute_s"] for m in timed), 3),
                              "comm_s": round(statistics.median(m["comm_s"] for m in timed), 3),
                              "comm_share": round(statistics.median(m["comm_s"] / m["step_s"] for m in timed), 3),
                              "loss": [round(m["loss"], 4) for m in metrics],
                              "peak_rss_bytes": rss},
              "local": {"tokens_per_second": round(local_tps, 1),
                        "step_s": round(statistics.median(m["step_s"] for m in local_timed), 3),
                        "loss": [round(m["loss"], 4) for m in local], "peak_rss_bytes": local_rss},
              "ratio_tokens_per_second": round(distributed_tps / local_tps, 3)}
    if parallelism != "data":
        report["pipeline"] = _pipeline_figures(model_dir, spec, timed, local_timed, rss)
    return report


def _pipeline_figures(model_dir: Path, spec: S.JobSpec, timed: list[dict], local: list[dict],
                      rss: dict[str, int | None]) -> dict:
    """Bubble, bytes between stages, and each stage's training state against the single process's."""
    config = AutoConfig.from_pretrained(model_dir)
    layers = config.num_hidden_layers
    tied = bool(getattr(config, "tie_word_embeddings", False))
    one_params = expected_weight_bytes(config, 0, layers, embed=True, head=True, dtype=torch.float32) // 4
    one_activations = max(m["activation_bytes"] for m in local)
    one_state = one_params * 4 * STATE_COPIES + one_activations
    measured = statistics.median(m["bubble"] for m in timed)
    theoretical = timed[0]["bubble_theoretical"]
    stages = []
    for s, span in enumerate(spec.stages):
        node = spec.nodes[s].name  # replica 0's
        params = expected_weight_bytes(config, span.start, span.end, embed=span.start == 0, head=span.end == layers,
                                       dtype=torch.float32) // 4
        activations = max(m["stages"][s]["activation_bytes"] for m in timed)
        state = params * 4 * STATE_COPIES + activations
        stages.append({"stage": s, "node": node, "layers": [span.start, span.end], "params": params,
                       "activation_bytes": activations, "training_state_bytes": state,
                       "ratio_to_one_process": round(state / one_state, 3), "peak_rss_bytes": rss.get(node),
                       "compute_s": round(statistics.median(m["stages"][s]["compute_s"] for m in timed), 3),
                       "bubble": round(statistics.median(m["stages"][s]["bubble"] for m in timed), 3)})
    target = STATE_TARGET[tied]
    return {"stages": len(spec.stages), "replicas": spec.replicas, "schedule": spec.schedule, "tied": tied,
            "micro_batches": -(-spec.batch_size // spec.micro_batch_size) // spec.replicas,
            "bubble_measured": round(measured, 3), "bubble_theoretical": round(theoretical, 3),
            "bubble_within_10_percent": abs(measured - theoretical) <= BUBBLE_TOLERANCE * theoretical,
            "bytes_between_stages_per_step": int(statistics.median(m["bytes_between_stages"] for m in timed)),
            "one_process": {"params": one_params, "activation_bytes": one_activations,
                            "training_state_bytes": one_state},
            "per_stage": stages, "state_ratio_target": target,
            "meets_state_target": all(st["ratio_to_one_process"] <= target for st in stages)}


def node_shards(nodes: list[local_cluster.LocalNode], dataset: str) -> dict[str, ShardRows]:
    """Every temporary node's shard of ``dataset``, read from its home: the one-process baseline's data."""
    shards = {}
    for node in nodes:
        path = Path(node.home) / "datasets" / dataset / "shard.safetensors"
        if path.exists():
            tokens, meta = read_shard(path)
            shards[node.public_key] = ShardRows(tokens, int(meta["tokens"]))
    return shards


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak resident memory (Linux ``VmHWM``), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> None:
    """Start this process's peak resident memory afresh (Linux), so that the baseline's is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def wait_done(user: Identity, coordinator: NodeEntry, job: str) -> list[dict]:
    """A job's metrics once it is done (RuntimeError with its error if it failed or was interrupted)."""
    while True:
        status = asyncio.run(job_call(user, coordinator, S.JOBS_SHOW, {"job": job}))
        if status["state"] in ("failed", "interrupted"):
            raise RuntimeError(f"the benchmark job {status['state']}: {status['error']}")
        if status["state"] == "done":
            return asyncio.run(job_metrics(user, coordinator, job))["metrics"]
        time.sleep(POLL_S)

