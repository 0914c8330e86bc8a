"""``dllmctl bench train --modes sync,diloco+int8,...``: what communicating less costs and saves.

Every mode trains the same model (its stored weights are every mode's start: import a random init to
pretrain from scratch) on the same tokens (one dataset, sharded once onto 2-4 temporary local nodes,
the same seed), one job after another. Per mode: the bytes the workers sent in all (counted by the
ring, every node, the whole run), the held-out loss at the end (the job scores a held-out text,
another module of the standard library, with :mod:`dllmd.inference.perplexity`: the same definition
``dllmctl eval perplexity`` uses), training tokens/s, and a short timed run through WAN proxies
(:mod:`dllmctl.bench.wan`: every link, node to node and client to node, delayed and rate-limited in
each direction) of a few steps, at least one outer step of a DiLoCo mode.

A mode is ``sync``, ``diloco`` (``--sync-every`` inner steps per outer step) or ``overlap``, with an
optional compression: ``diloco+int8``, ``sync+powersgd:4`` (``--compress`` is the compression of the
modes that name none). The first mode is the baseline the others are compared with; the target is
DiLoCo with int8 sending at least 100 times fewer bytes than per-step sync, with a held-out loss
within 3% of it.

The WAN proxies listen on 127.0.0.2 (loopback, like 127.0.0.1 on Linux) at each node's own ports, so
that a job given the proxies' addresses reaches every ring socket through a proxy too: the nodes'
ring ports are fixed when they start, and a ring member's address is its node's host and that port.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from dllmctl.bench.shard import stdlib_source
from dllmctl.bench.train import wait_done
from dllmctl.bench.wan import DelayProxy
from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.data.sharding import ShardRequest, shard_and_push
from dllmctl.training.jobs import TrainError, heldout_fields, job_spec, submit
from dllmd.net.identity import Identity
from dllmd.train.lowcomm import Compression, LowCommError, LowCommSettings

KINDS = ("sync", "diloco", "overlap")
PROXY_HOST = "127.0.0.2"
HELDOUT_FILES = ("textwrap.py", "string/__init__.py", "string.py")  # not in the training include; either string
TARGET_BYTES_RATIO = 100.0
TARGET_LOSS_WITHIN = 0.03


@dataclass(frozen=True)
class Mode:
    name: str  # as given: diloco+int8
    sync_every: int
    compress: str
    overlap: bool

    def options(self, outer_lr: float, outer_momentum: float) -> dict:
        """The mode's :class:`JobSpec` fields (the outer step's only for DiLoCo: refused elsewhere)."""
        outer = {"outer_lr": outer_lr, "outer_momentum": outer_momentum} if self.sync_every else {}
        return {"sync_every": self.sync_every, "compress": self.compress, "overlap": self.overlap, **outer}


def parse_modes(text: str, sync_every: int, compress: str) -> list[Mode]:
    """``sync,diloco+int8,...`` as modes; refused (TrainError) where a mode cannot run."""
    modes = []
    for item in (m.strip() for m in text.split(",") if m.strip()):
        kind, _, own = item.partition("+")
        if kind not in KINDS:
            raise TrainError(f"a mode is {', '.join(KINDS)}, optionally +COMPRESSION (diloco+int8); not {item!r}")
        try:
            compression = str(Compression.parse(own or compress))
            mode = Mode(item, sync_every if kind == "diloco" else 0, compression, kind == "overlap")
            LowCommSettings(mode.sync_every, compression=Compression.parse(compression),
                            overlap=mode.overlap).check("data", "zmq", False)
        except LowCommError as exc:
            raise TrainError(f"mode {item}: {exc}") from None
        modes.append(mode)
    if not modes:
        raise TrainError("give at least one mode, e.g. --modes sync,diloco+int8")
    if len({m.name for m in modes}) != len(modes):
        raise TrainError("a mode is given twice")
    return modes


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free on ``host`` and on the proxies' host now (held open together, so all different)."""
    probes = []
    try:
        while len(probes) < count:
            probe = socket.socket()
            probe.bind((host, 0))
            port = probe.getsockname()[1]
            try:
                with socket.socket() as other:
                    other.bind((PROXY_HOST, port))
            except OSError:
                probe.close()
                continue
            probes.append(probe)
        return [p.getsockname()[1] for p in probes]
    finally:
        for probe in probes:
            probe.close()


def heldout_text(source: str) -> str:
    """A module of ``source`` (the standard library) that training does not see."""
    for name in HELDOUT_FILES:
        path = Path(source) / name
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise TrainError(f"no held-out module ({', '.join(HELDOUT_FILES)}) in {source}")


def run(user: Identity, model: str, model_dir: Path, modes: list[Mode], nodes: int, steps: int, batch_size: int,
        micro_batch_size: int, seq_len: int, lr: float, warmup_steps: int, outer_lr: float, outer_momentum: float,
        wan_steps: int, wan_delay_ms: float, wan_mbit: float, source: str | None = None,
        include: list[str] | None = None, progress=lambda message: None) -> dict:
    source = source or stdlib_source()
    heldout = heldout_fields(model_dir, heldout_text(source))
    common = {"batch_size": batch_size, "micro_batch_size": micro_batch_size, "epochs": 0, "lr": lr,
              "warmup_steps": warmup_steps, "checkpoint_every": 0}
    outer = (outer_lr, outer_momentum)
    ports = free_ports(nodes)
    results = []
    with tempfile.TemporaryDirectory(prefix="dllm-bench-lowcomm-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        progress(f"starting {nodes} nodes")
        started = local_cluster.up(nodes, Path(tmp), user, registry, settings=[{"ring_port": p} for p in ports])
        entries = [NodeEntry(n.name, n.address, n.public_key) for n in started]
        try:
            request = ShardRequest(uri=source, model=model, model_dir=model_dir, strategy="random", name="bench",
                                   seq_len=seq_len, include=include or ["json/*.py", "email/*.py"],
                                   exclude=["site-packages/"])
            dataset = shard_and_push(user, entries, request)
            with wan_links(entries, ports, wan_delay_ms, wan_mbit) as proxied:
                for mode in modes:
                    progress(f"{mode.name}: {steps} steps")
                    spec = job_spec(model, dataset, entries, max_steps=steps, **common, **mode.options(*outer),
                                    **heldout)
                    metrics = _job(user, entries, model_dir, spec)
                    wan = None
                    if wan_steps:
                        inner = _wan_steps(mode, wan_steps)
                        progress(f"{mode.name}: {inner} steps through {wan_mbit:g} Mbit/s, {wan_delay_ms:g} ms links")
                        wan = _wan(user, proxied, model_dir, model, dataset, inner, common, mode.options(*outer))
                    results.append(_figures(mode, metrics, wan))
        finally:
            local_cluster.down(Path(tmp), registry)
    return {"model": model, "nodes": nodes, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
            "lr": lr, "sync_every": max((m.sync_every for m in modes), default=0), "outer_lr": outer_lr,
            "outer_momentum": outer_momentum, "heldout_tokens": len(heldout["eval_tokens"]),
            "wan": {"delay_ms_one_way": wan_delay_ms, "mbit_per_s": wan_mbit, "steps": wan_steps} if wan_steps else None,
            "modes": compare(results)}


def _job(user: Identity, entries: list[NodeEntry], model_dir: Path, spec) -> list[dict]:
    import asyncio

    job = asyncio.run(submit(user, entries, model_dir, spec))["job"]
    return wait_done(user, entries[0], job)


def _wan_steps(mode: Mode, steps: int) -> int:
    """A DiLoCo mode's WAN run is whole outer steps, at least one: its communication is the sync."""
    return max(1, -(-steps // mode.sync_every)) * mode.sync_every if mode.sync_every else steps


@contextmanager
def wan_links(entries: list[NodeEntry], ring_ports: list[int], delay_ms: float, mbit: float) -> Iterator[list[NodeEntry]]:
    """The nodes as a job reaches them through WAN proxies: each node's RPC port and ring port on
    :data:`PROXY_HOST`. Kept up for every WAN run: a daemon's connection through a proxy that closed
    is lost, and its next call with it."""
    proxies = []
    try:
        proxied = []
        for entry, ring_port in zip(entries, ring_ports):
            endpoint = urlparse(entry.address.replace("tcp://", "http://"))
            for port in (endpoint.port, ring_port):
                proxies.append(DelayProxy((endpoint.hostname, port), delay_s=delay_ms / 1000,
                                          bandwidth_bps=mbit * 1e6, host=PROXY_HOST, port=port))
            proxied.append(NodeEntry(entry.name, f"tcp://{PROXY_HOST}:{endpoint.port}", entry.public_key))
        yield proxied
    finally:
        for proxy in proxies:
            proxy.close()


def _wan(user: Identity, proxied: list[NodeEntry], model_dir: Path, model: str, dataset: dict, steps: int,
         common: dict, options: dict) -> dict:
    """The same job, ``steps`` steps, with every link through a proxy: timed."""
    spec = job_spec(model, dataset, proxied, max_steps=steps, **common, **options)
    metrics = _job(user, proxied, model_dir, spec)
    seconds = sum(m["step_s"] for m in metrics)
    tokens = sum(m["tokens"] for m in metrics)
    return {"steps": steps, "seconds": round(seconds, 3), "seconds_per_step": round(seconds / steps, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "comm_s": round(sum(m["comm_s"] for m in metrics), 3),
            "comm_exposed_s": round(sum(m["comm_exposed_s"] for m in metrics), 3),
            "bytes_sent": sum(m["bytes_sent"] for m in metrics)}


def _figures(mode: Mode, metrics: list[dict], wan: dict | None) -> dict:
    seconds = sum(m["step_s"] for m in metrics)
    tokens = sum(m["tokens"] for m in metrics)
    return {"mode": mode.name, "sync_every": mode.sync_every, "compress": mode.compress, "overlap": mode.overlap,
            "outer_steps": len(metrics) if mode.sync_every else None,
            "bytes_sent": sum(m["bytes_sent"] for m in metrics), "final_loss": metrics[-1]["heldout_loss"],
            "final_train_loss": metrics[-1]["loss"], "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "comm_s": round(sum(m["comm_s"] for m in metrics), 3), "wan": wan}


def compare(results: list[dict]) -> list[dict]:
    """Each mode's bytes and loss against the first's, and whether a DiLoCo-with-int8 mode meets the target."""
    base = results[0]
    for result in results:
        result["bytes_ratio"] = round(base["bytes_sent"] / result["bytes_sent"], 2) if result["bytes_sent"] else None
        result["loss_vs_first"] = round(result["final_loss"] / base["final_loss"] - 1, 4)
        if result["sync_every"] and result["compress"] == "int8" and result is not base:
            result["meets_target"] = bool(result["bytes_ratio"] and result["bytes_ratio"] >= TARGET_BYTES_RATIO
                                          and abs(result["loss_vs_first"]) <= TARGET_LOSS_WITHIN)
    return results
