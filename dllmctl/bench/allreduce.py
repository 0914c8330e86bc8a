"""``dllmctl bench allreduce``: our encrypted ring all-reduce against torch.distributed's gloo.

One run starts a temporary local cluster (N daemons on 127.0.0.1 that allow a plaintext ring),
then measures, on the same buffer size and node count:

* gloo: N worker processes (``dllmctl.bench.gloo_worker``), ``all_reduce`` over TCP on loopback,
  with the same OpenMP thread count per process as the daemons get;
* ours, encrypted (AES-256-GCM bulk links): every daemon binds a ring socket (``ring.open``), joins
  the ring (``ring.form``, on all before any runs) and times all-reduces (``ring.run``) by the
  algorithm asked for (``auto``: what training takes for that size, the ring or the tree);
* ours, plaintext: the same with encryption off (trusted links only).

With ``sweep`` sizes it then measures, for each, gloo, our ring and our tree (encrypted), to show
where each algorithm wins and what ``auto`` picks.

The modes take turns, round after round, so that load from elsewhere on the machine falls on all
of them alike. Every rank fills its buffer with ``rank + 1`` and checks the sum, n(n+1)/2, after
each all-reduce; each round of each mode starts with one warm-up. An iteration's time is the
slowest rank's (the collective is done when every rank is), and a mode's figure is the median over
all its iterations. The bandwidth is the "bus bandwidth" of nccl-tests, 2(n-1)/n * bytes / seconds:
what each link carries per second in a ring, comparable across node counts (and across algorithms:
it is the same formula for the tree, whatever the tree really sends). Targets: the encrypted ring at
>= 0.6x gloo, plaintext at >= 0.9x.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import Registry
from dllmd import units
from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity
from dllmd.train.allreduce import ALGORITHMS
from dllmd.train.allreduce_plan import TREE_MAX_BYTES, choose

TARGET_ENCRYPTED = 0.6
TARGET_PLAINTEXT = 0.9
MAX_BYTES = 2 * 1024**3  # ring.run takes up to 512M float32 elements


class BenchError(RuntimeError):
    """The benchmark could not run or a mode gave a wrong result; the message says which."""


def parse_size(text: str, option: str = "--size", lo: int = 4, hi: int = MAX_BYTES) -> int:
    """``64MB`` (10^6), ``512KiB`` (2^10), ``1GB``, ``4M`` (2^20, as nccl-tests), ``4096``: bytes,
    a multiple of 4 (float32 elements) between ``lo`` and ``hi``."""
    try:
        size = units.parse_size(text)
    except ValueError:
        raise ValueError(f"{option} takes a size like 64MB, 512KiB or 1GB, not {text!r}") from None
    if size < lo or size > hi:
        raise ValueError(f"{option} must be between {lo:,} and {hi:,} bytes, got {text!r} ({size:,} bytes)")
    if size % 4:
        raise ValueError(f"{option} must be a whole number of float32 elements (a multiple of 4 bytes), "
                         f"got {size:,} bytes")
    return size


def bus_bandwidth(nbytes: int, nodes: int, seconds: float) -> float:
    """nccl-tests' bus bandwidth, bytes/s: what every link of a ring carries."""
    return 2 * (nodes - 1) / nodes * nbytes / seconds


def iteration_times(per_rank: list[list[float]]) -> list[float]:
    """Each iteration's time: that of its slowest rank."""
    return [max(times) for times in zip(*per_rank)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(nodes: int) -> dict[str, str]:
    """The environment local_cluster gives its daemons: OpenMP threads share the cores evenly."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(local_cluster._threads_per_daemon(nodes)))}


class GlooGroup:
    """``nodes`` gloo worker processes (``dllmctl.bench.gloo_worker``), kept across rounds so that
    rounds of gloo and of our ring can take turns: a burst of load from elsewhere on the machine
    then falls on every mode alike."""

    def __init__(self, nodes: int, elements: int, iterations: int, rounds: int, timeout: float, directory: Path):
        self.nodes, self.timeout = nodes, timeout
        self.lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.logs = [directory / f"gloo-{rank}.log" for rank in range(nodes)]
        port = _free_port()
        self.procs: list[subprocess.Popen] = []
        for rank in range(nodes):
            with open(self.logs[rank], "wb") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "dllmctl.bench.gloo_worker", "--rank", str(rank), "--world", str(nodes),
                     "--port", str(port), "--elements", str(elements), "--iterations", str(iterations),
                     "--rounds", str(rounds), "--timeout", str(int(timeout))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=worker_env(nodes)))
        for rank, proc in enumerate(self.procs):
            threading.Thread(target=self._read, args=(rank, proc), daemon=True).start()

    def _read(self, rank: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.put((rank, line))
        self.lines.put((rank, None))

    def round(self, elements: int | None = None) -> list[list[float]]:
        """One round (of ``elements``, if given: the size from then on): per-rank iteration seconds."""
        for proc in self.procs:
            try:
                proc.stdin.write(f"go {elements}\n" if elements else "go\n")
                proc.stdin.flush()
            except OSError:
                pass  # it exited: reported below
        results: dict[int, list[float]] = {}
        deadline = time.monotonic() + self.timeout
        while len(results) < self.nodes:
            try:
                rank, line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"gloo all_reduce did not finish within {self.timeout:.0f}s") from None
            if line is None:
                raise BenchError(self._failure(rank))
            results[rank] = json.loads(line)["seconds"]
        return [results[rank] for rank in range(self.nodes)]

    def _failure(self, rank: int) -> str:
        try:
            code = self.procs[rank].wait(10)
        except subprocess.TimeoutExpired:
            code = None
        tail = "\n".join(self.logs[rank].read_text(errors="replace").strip().splitlines()[-5:])
        what = "a wrong sum" if code == 2 else f"exit status {code}"
        return f"gloo worker {rank} failed ({what}):\n{tail}"

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ring_endpoint(opened: dict, node_address: str) -> str:
    """Where peers reach a node's ring socket: bound on a wildcard, that is the node's own host."""
    if not opened.get("wildcard"):
        return opened["endpoint"]
    host = node_address.removeprefix("tcp://").rsplit(":", 1)[0]
    return f"tcp://{host}:{opened['port']}"


async def run_ring(user: Identity, nodes: list[local_cluster.LocalNode], elements: int, iterations: int,
                   plaintext: bool, bucket_bytes: int = 0, run_timeout: float = 600.0,
                   algorithm: str = "auto") -> tuple[list[list[float]], dict]:
    """Per-rank iteration seconds of our all-reduce over the daemons' ``ring.*`` operations, and
    rank 0's reply (the bucket size and the algorithm it used; ``bucket_bytes`` 0: the ring's
    default, as training uses)."""
    clients = [RpcClient(user, n.address, n.public_key) for n in nodes]
    try:
        opened = await asyncio.gather(*(c.call("ring.open", {"plaintext": plaintext}, timeout=30) for c in clients))
        members = [{"public_key": n.public_key, "endpoint": _ring_endpoint(o, n.address)}
                   for (o, _), n in zip(opened, nodes)]
        # Everyone joins before anyone sends: a rank drops data of a ring it has not joined yet.
        await asyncio.gather(*(c.call("ring.form", {"members": members, "rank": rank, "generation": 1}, timeout=30)
                               for rank, c in enumerate(clients)))
        args = {"members": members, "elements": elements, "iterations": iterations, "bucket_bytes": bucket_bytes,
                "generation": 1, "algorithm": algorithm}
        results = await asyncio.gather(*(c.call("ring.run", {**args, "rank": rank}, timeout=run_timeout)
                                         for rank, c in enumerate(clients)))
        return [result["seconds"] for result, _ in results], results[0][0]
    finally:
        await asyncio.gather(*(c.call("ring.close", timeout=10) for c in clients), return_exceptions=True)
        for c in clients:
            c.close()


def _figures(rounds: list[list[list[float]]], nbytes: int, nodes: int) -> dict:
    """Figures of one mode from its rounds (each: per-rank iteration seconds)."""
    times = [t for per_rank in rounds for t in iteration_times(per_rank)]
    ranks = [[t for per_rank in rounds for t in per_rank[rank]] for rank in range(nodes)]
    median = statistics.median(times)
    return {"median_ms": round(median * 1000, 3), "bus_gb_per_s": round(bus_bandwidth(nbytes, nodes, median) / 1e9, 4),
            "iteration_ms": [round(t * 1000, 3) for t in times],
            "rank_median_ms": [round(statistics.median(r) * 1000, 3) for r in ranks]}


def _timeout(nbytes: int, iterations: int) -> float:
    return 120.0 + (iterations + 1) * 2 * nbytes / 20e6  # generous: the slowest machines seal at tens of MB/s


def run(user: Identity, nodes: int, nbytes: int, iterations: int, rounds: int = 2, bucket_bytes: int = 0,
        progress: Callable[[str], None] = lambda _: None, algorithm: str = "auto", sweep: list[int] = ()) -> dict:
    if nodes < 2:
        raise BenchError("an all-reduce needs at least 2 nodes")
    if algorithm not in ALGORITHMS:
        raise BenchError(f"--algorithm is one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    elements = nbytes // 4
    report: dict = {"nodes": nodes, "bytes": nbytes, "elements": elements, "iterations": iterations,
                    "rounds": rounds, "algorithm": algorithm, "tree_max_bytes": TREE_MAX_BYTES,
                    "cpu_count": os.cpu_count(), "omp_threads_per_process": int(worker_env(nodes)["OMP_NUM_THREADS"]),
                    "timing": "per iteration the slowest rank's time; median over all iterations of all rounds",
                    "bus_bandwidth": "2(n-1)/n * bytes / seconds"}
    largest = max([nbytes, *sweep])
    with tempfile.TemporaryDirectory(prefix="dllm-bench-allreduce-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        started = local_cluster.up(nodes, Path(tmp), user, registry, progress, bench=True)
        try:
            gloo = GlooGroup(nodes, elements, iterations, rounds * (1 + len(sweep)), _timeout(largest, iterations),
                             Path(tmp))
            try:
                modes = {"encrypted": (False, algorithm), "plaintext": (True, algorithm)}
                report.update(_compare(gloo, user, started, nbytes, iterations, rounds, bucket_bytes, modes, progress))
                for key, target in (("encrypted", TARGET_ENCRYPTED), ("plaintext", TARGET_PLAINTEXT)):
                    ratio = report[key]["ratio_to_gloo"]
                    report[key].update({"target_ratio": target, "meets_target": ratio >= target})
                report["sweep"] = [
                    {"bytes": size, "auto": choose(size, nodes),
                     **_compare(gloo, user, started, size, iterations, rounds, bucket_bytes,
                                {"ring": (False, "ring"), "tree": (False, "tree")}, progress)}
                    for size in sweep]
                for row in report["sweep"]:
                    row["faster"] = "tree" if row["tree"]["median_ms"] < row["ring"]["median_ms"] else "ring"
            finally:
                gloo.close()
        finally:
            local_cluster.down(Path(tmp), registry)
    return report


def _compare(gloo: GlooGroup, user: Identity, nodes: list[local_cluster.LocalNode], nbytes: int, iterations: int,
             rounds: int, bucket_bytes: int, modes: dict[str, tuple[bool, str]],
             progress: Callable[[str], None]) -> dict:
    """gloo and each of ``modes`` (name: (plaintext, algorithm)) on ``nbytes``, taking turns for
    ``rounds`` rounds: their figures, with the ratio of each mode to gloo."""
    elements, count = nbytes // 4, len(nodes)
    measured: dict[str, list] = {"gloo": [], **{key: [] for key in modes}}
    replies: dict[str, dict] = {}
    for r in range(rounds):
        progress(f"{nbytes:,} bytes, round {r + 1}/{rounds}: gloo, {count} processes")
        measured["gloo"].append(gloo.round(elements))
        for key, (plaintext, algorithm) in modes.items():
            progress(f"{nbytes:,} bytes, round {r + 1}/{rounds}: {key}, {count} daemons")
            per_rank, replies[key] = asyncio.run(run_ring(user, nodes, elements, iterations, plaintext, bucket_bytes,
                                                          _timeout(nbytes, iterations), algorithm))
            measured[key].append(per_rank)
    figures = {key: _figures(rounds_, nbytes, count) for key, rounds_ in measured.items()}
    figures["gloo"]["ratio_to_gloo"] = 1.0
    for key in modes:
        figures[key].update({"bucket_bytes": replies[key]["bucket_bytes"], "algorithm": replies[key]["algorithm"],
                             "ratio_to_gloo": round(figures["gloo"]["median_ms"] / figures[key]["median_ms"], 3)})
    return figures
