"""``dllmctl bench chaos``: a data-parallel job on temporary local daemons while faults strike it.

The job trains ``steps`` steps on ``nodes`` daemons (checkpoints every ``checkpoint_every``) while a
seeded schedule injects ``faults`` faults at steps spread over the job, each waited for (the job's
step reached), then struck:

- ``kill``: a worker dies (SIGKILL, as a crash or a power cut);
- ``stop``: a worker hangs (SIGSTOP: alive, connected, answering nothing), killed once dropped;
- ``coordinator``: the coordinator dies; it is started again and the job resumed from its last
  checkpoint (``jobs.resume`` with the nodes' new addresses).

At most ``nodes - 1`` workers are struck (the coordinator and at least itself must remain). Figures:
each fault (kind, node, the step it struck at, seconds until the job was past that step: after a
resume, replayed from the checkpoint), the job's
wall time and state, and whether the final weights equal the same steps in one process
(``dllmd.train.local``; the target: max abs difference <= 1e-5, as in the tests). A fault the job
did not survive is the result, not an exception.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dllmctl.bench.shard import stdlib_source
from dllmctl.bench.train import node_shards
from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.data.sharding import ShardRequest, shard_and_push
from dllmctl.training.jobs import job_call, job_spec, submit
from dllmd.net.identity import Identity
from dllmd.net.messages import training as S

KINDS = ("kill", "stop", "coordinator")
EXACT_TOLERANCE = 1e-5
POLL_S = 0.2
FAULT_TIMEOUT_S = 600.0  # a fault's step not reached, or no step after it, in this long: the job is stuck


@dataclass
class Fault:
    kind: str
    node: str
    at_step: int
    struck_at_step: int = -1
    recovered_s: float | None = None  # until the job was past the step it struck at; None: it never was


def schedule(kinds: list[str], faults: int, nodes: int, steps: int, seed: int) -> list[tuple[str, int]]:
    """(kind, step) for each fault: kinds drawn from ``kinds``, at most ``nodes - 1`` worker faults,
    steps spread evenly over the job's middle (after two steps, which set the step deadline)."""
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"--kinds takes some of {', '.join(KINDS)}")
    rng = random.Random(seed)
    picked, workers = [], 0
    for _ in range(faults):
        choices = [k for k in kinds if k == "coordinator" or workers < nodes - 1]
        if not choices:
            break
        kind = rng.choice(choices)
        workers += kind != "coordinator"
        picked.append(kind)
    span = max(1, steps - 4)
    return [(kind, 3 + (i + 1) * span // (len(picked) + 1)) for i, kind in enumerate(picked)]


def run(user: Identity, model: str, model_dir: Path, nodes: int = 4, steps: int = 40, faults: int = 3,
        kinds: list[str] | None = None, seed: int = 0, batch_size: int = 8, micro_batch_size: int = 2,
        seq_len: int = 64, checkpoint_every: int = 5, lr: float = 1e-4,
        progress=lambda message: None) -> dict:
    plan = schedule(list(kinds or KINDS), faults, nodes, steps, seed)
    rng = random.Random(seed + 1)
    with tempfile.TemporaryDirectory(prefix="dllm-bench-chaos-") as tmp:
        directory = Path(tmp)
        registry = Registry(directory / "cluster.toml")
        started = local_cluster.up(nodes, directory, user, registry, progress=progress)
        entries = [NodeEntry(n.name, n.address, n.public_key) for n in started]
        homes = {n.name: Path(n.home) for n in started}
        try:
            progress("sharding")
            request = ShardRequest(uri=stdlib_source(), model=model, model_dir=model_dir, strategy="random",
                                   name="chaos", seq_len=seq_len, include=["json/*.py", "email/*.py"],
                                   exclude=["site-packages/"])
            dataset = shard_and_push(user, entries, request)
            spec = job_spec(model, dataset, entries, batch_size=batch_size, micro_batch_size=micro_batch_size,
                            epochs=0, max_steps=steps, lr=lr, checkpoint_every=checkpoint_every, seed=seed)
            job = asyncio.run(submit(user, entries, model_dir, spec))["job"]
            began = time.monotonic()
            workers = [e.name for e in entries[1:]]
            struck: list[Fault] = []
            shown: dict = {}
            for kind, at in plan:
                progress(f"step {at}: {kind}")
                shown = _wait_step(user, directory, job, at)
                if shown["state"] != "running":
                    break
                node = entries[0].name if kind == "coordinator" else workers.pop(rng.randrange(len(workers)))
                fault = Fault(kind, node, at, struck_at_step=shown["step"])
                struck.append(fault)
                struck_at = time.monotonic()
                if kind == "coordinator":
                    local_cluster.kill(directory, node)
                    local_cluster.restart(directory, node, registry)
                    _resume(user, directory, registry, job)
                else:
                    pid = next(n.pid for n in local_cluster.load_state(directory) if n.name == node)
                    os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                after = _wait_step(user, directory, job, fault.struck_at_step + 1)
                if after["step"] > fault.struck_at_step:
                    fault.recovered_s = round(time.monotonic() - struck_at, 1)
                if kind == "stop":
                    os.kill(pid, signal.SIGKILL)  # dropped (or the job is stuck): it is not coming back
            progress("finishing")
            shown = _wait_done(user, directory, job)
            seconds = time.monotonic() - began
            weights = _final_weights(homes[entries[0].name], job, shown.get("step", -1))
            shards = node_shards(started, "chaos")
        finally:
            local_cluster.down(directory, registry)
    report = {"model": model, "nodes": nodes, "steps": steps, "seed": seed, "job_state": shown.get("state"),
              "job_step": shown.get("step"), "job_seconds": round(seconds, 1),
              "faults": [asdict(f) for f in struck],
              "events": [e["kind"] for e in shown.get("events", []) if e["kind"] not in ("checkpoint",)]}
    if shown.get("state") == "done" and weights is not None:
        from dllmd.train.local import train_locally
        from dllmd.train.optim import OptimConfig

        progress("the same steps in one process")
        reference = train_locally(model_dir, shards, steps, batch_size, micro_batch_size, OptimConfig(lr=lr),
                                  seed=seed)
        diff = max(float((weights[k] - reference[k]).abs().max()) for k in reference)
        report.update(max_abs_difference=diff, exact=diff <= EXACT_TOLERANCE)
    else:
        report.update(max_abs_difference=None, exact=False)
    report["survived"] = report["exact"] and all(f["recovered_s"] is not None for f in report["faults"])
    return report


def _coordinator(directory: Path) -> NodeEntry:
    node = local_cluster.load_state(directory)[0]
    return NodeEntry(node.name, node.address, node.public_key)


def _show(user: Identity, directory: Path, job: str) -> dict:
    return asyncio.run(job_call(user, _coordinator(directory), S.JOBS_SHOW, {"job": job}))


def _wait_step(user: Identity, directory: Path, job: str, step: int) -> dict:
    """The job once it reached ``step`` (or ended)."""
    deadline = time.monotonic() + FAULT_TIMEOUT_S
    while True:
        shown = _show(user, directory, job)
        if shown["step"] >= step or shown["state"] not in ("queued", "running") or time.monotonic() > deadline:
            return shown
        time.sleep(POLL_S)


def _wait_done(user: Identity, directory: Path, job: str) -> dict:
    deadline = time.monotonic() + FAULT_TIMEOUT_S * 2
    while (shown := _show(user, directory, job))["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return shown


def _resume(user: Identity, directory: Path, registry: Registry, job: str) -> None:
    """The restarted coordinator finds the job interrupted; resume it with every node's address now."""
    deadline = time.monotonic() + 60
    while _show(user, directory, job)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(POLL_S)
    live = {n.name for n in local_cluster.load_state(directory) if n.process() is not None}
    current = [{"name": n.name, "address": n.address, "public_key": n.public_key}
               for n in registry.nodes.values() if n.name in live]
    asyncio.run(job_call(user, _coordinator(directory), S.JOBS_RESUME, {"job": job, "nodes": current}, timeout=900))


def _final_weights(home: Path, job: str, step: int) -> dict | None:
    from safetensors.torch import load_file

    path = home / "jobs" / job / "checkpoints" / f"step-{step:06d}" / "model.safetensors"
    return load_file(str(path)) if path.exists() else None
