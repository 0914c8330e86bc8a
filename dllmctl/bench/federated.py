"""``dllmctl bench train --parallelism federated``: what a federated round costs, and what it learns.

Shards real code (parts of the standard library) onto temporary local daemons, one client each, and
runs the same rounds twice, in clear and with secure aggregation, then the same tokens as one
data-parallel run (in this process, ``dllmd.train.local``: equal to a data-parallel job). Figures:
bytes per round per client (the weights down, the update up, the secure-aggregation protocol's
keys and shares), seconds per round both ways (what secure aggregation costs), and the held-out loss
(``dllmd.train.heldout.rows_loss``, on rows no run trained on) of the untrained model, after R federated
rounds and after data-parallel training on as many tokens.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from dllmctl.bench.shard import stdlib_source
from dllmctl.bench.train import wait_done
from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.data.sharding import ShardRequest, shard_and_push
from dllmctl.training.jobs import federated_dataset, federated_options, job_spec, submit
from dllmd.data.shards import read_shard
from dllmd.net.identity import Identity
from dllmd.train.heldout import rows_loss as heldout_loss
from dllmd.train.local import train_locally
from dllmd.train.model import load_causal_lm
from dllmd.train.optim import OptimConfig
from dllmd.train.worker import ShardRows

TRAIN_FILES = ["json/*.py", "email/*.py"]
HELDOUT_FILES = ["csv.py", "argparse.py"]


def run(user: Identity, model: str, model_dir: Path, nodes: int = 3, rounds: int = 5, local_steps: int = 4,
        batch_size: int = 4, micro_batch_size: int = 2, seq_len: int = 128, lr: float = 1e-4,
        update_clip: float = 1.0) -> dict:
    source = stdlib_source()
    with tempfile.TemporaryDirectory(prefix="dllm-bench-federated-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        started = local_cluster.up(nodes, Path(tmp), user, registry)
        entries = [NodeEntry(n.name, n.address, n.public_key) for n in started]
        try:
            for name, include, targets in (("bench", TRAIN_FILES, entries), ("heldout", HELDOUT_FILES, entries[:1])):
                shard_and_push(user, targets, ShardRequest(uri=source, model=model, model_dir=model_dir,
                                                           strategy="random", name=name, seq_len=seq_len,
                                                           include=include, exclude=["site-packages/"]))
            runs = {}
            for secure in (False, True):
                options = federated_options(entries, rounds, local_steps, None, nodes, 3600.0, "fedavg", 1.0, 0.9,
                                            0.0, update_clip, secure)
                spec = job_spec(model, federated_dataset("bench", model), entries, batch_size=batch_size,
                                micro_batch_size=micro_batch_size, epochs=0, max_steps=0, lr=lr, **options)
                job = asyncio.run(submit(user, entries, model_dir, spec))["job"]
                checkpoint = Path(started[0].home) / "jobs" / job / "checkpoints" / f"step-{rounds:06d}"
                runs[secure] = (wait_done(user, entries[0], job), load_file(str(checkpoint / "model.safetensors")))
            shards = {n.public_key: _rows(Path(n.home), "bench") for n in started}
            heldout = _rows(Path(started[0].home), "heldout")
        finally:
            local_cluster.down(Path(tmp), registry)
    # Data parallelism on as many tokens: each step takes every client's batch at once.
    steps = rounds * local_steps
    central = train_locally(model_dir, shards, steps, batch_size * nodes, micro_batch_size, OptimConfig(lr=lr))
    model_obj = load_causal_lm(model_dir, sorted(model_dir.rglob("*.safetensors")))
    untrained = heldout_loss(model_obj, heldout)
    losses = {}
    for label, weights in (("federated", runs[False][1]), ("federated_secure", runs[True][1]), ("data_parallel", central)):
        model_obj.load_state_dict(weights, strict=False)
        losses[label] = heldout_loss(model_obj, heldout)
    plain, secure = runs[False][0], runs[True][0]
    per_round = {label: round(statistics.median(m["step_s"] for m in metrics), 3)
                 for label, metrics in (("plain", plain), ("secure", secure))}
    bytes_plain = plain[-1]["bytes_per_client"]
    bytes_secure = secure[-1]["bytes_per_client"]
    return {"model": model, "clients": nodes, "rounds": rounds, "local_steps": local_steps, "batch_size": batch_size,
            "seq_len": seq_len, "tokens_per_round": plain[0]["tokens"],
            "bytes_per_round_per_client": {"plain": bytes_plain["down"] + bytes_plain["up"],
                                           "secure": bytes_secure["down"] + bytes_secure["up"]
                                           + bytes_secure["secure_aggregation"],
                                           "secure_aggregation_protocol": bytes_secure["secure_aggregation"]},
            "round_s": per_round, "secure_aggregation_time_ratio": round(per_round["secure"] / per_round["plain"], 3),
            "heldout_loss": {"untrained": round(untrained, 4), **{k: round(v, 4) for k, v in losses.items()}},
            "federated_vs_data_parallel_loss": round(losses["federated"] / losses["data_parallel"], 4),
            "global_loss_per_round": {"plain": [round(m["loss"], 4) for m in plain],
                                      "secure": [round(m["loss"], 4) for m in secure]}}


def _rows(home: Path, dataset: str) -> ShardRows:
    tokens, meta = read_shard(home / "datasets" / dataset / "shard.safetensors")
    return ShardRows(tokens, int(meta["tokens"]))
