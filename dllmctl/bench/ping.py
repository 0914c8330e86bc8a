"""Round trips through one daemon: a small request and a ``[1, 1, 576]`` fp32 tensor echo.

The baseline is a raw pyzmq DEALER/ROUTER echo over loopback TCP in this process (no CURVE, no
msgpack, no validation): the floor the transport itself sets on this machine, so the ratio shows
what encryption, the protocol and the daemon add.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import torch
import zmq

from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity
from dllmctl.cluster.registry import NodeEntry

HIDDEN_STATE_SHAPE = (1, 1, 576)  # one decode step of SmolLM2-135M


def _summary(samples_ns: list[int]) -> dict:
    s = sorted(samples_ns)
    return {"median_us": round(statistics.median(s) / 1000, 1), "p90_us": round(s[int(len(s) * 0.9)] / 1000, 1),
            "p99_us": round(s[int(len(s) * 0.99)] / 1000, 1), "min_us": round(s[0] / 1000, 1)}


async def _measure_node(user: Identity, node: NodeEntry, count: int, warmup: int) -> dict:
    tensor = torch.randn(HIDDEN_STATE_SHAPE)
    async with RpcClient(user, node.address, node.public_key) as client:
        results = {}
        for label, op, tensors in (("ping", "ping", []), ("tensor_echo", "echo", [tensor])):
            for _ in range(warmup):
                await client.call(op, tensors=tensors)
            samples = []
            for _ in range(count):
                start = time.perf_counter_ns()
                _, back = await client.call(op, tensors=tensors)
                samples.append(time.perf_counter_ns() - start)
            if tensors and not torch.equal(back[0], tensor):
                raise RuntimeError("echoed tensor differs from the one sent")
            results[label] = _summary(samples)
    return results


def _raw_zmq_baseline(count: int, warmup: int) -> dict:
    """Echo through a plain ROUTER in a thread, same payload sizes, no encryption or protocol."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                router.send_multipart(router.recv_multipart())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    results = {}
    payload = torch.randn(HIDDEN_STATE_SHAPE).numpy().tobytes()
    for label, frames in (("ping", [b"x" * 32]), ("tensor_echo", [b"x" * 64, payload])):
        for _ in range(warmup):
            dealer.send_multipart(frames)
            dealer.recv_multipart()
        samples = []
        for _ in range(count):
            start = time.perf_counter_ns()
            dealer.send_multipart(frames)
            dealer.recv_multipart()
            samples.append(time.perf_counter_ns() - start)
        results[label] = _summary(samples)
    stop.set()
    thread.join()
    dealer.close(0)
    router.close(0)
    ctx.term()
    return results


def run(user: Identity, node: NodeEntry, count: int = 2000, warmup: int = 200) -> dict:
    """Measure the node, then the baseline; return figures and ratios (dllm / baseline)."""
    measured = asyncio.run(_measure_node(user, node, count, warmup))
    baseline = _raw_zmq_baseline(count, warmup)
    return {
        "node": node.name,
        "count": count,
        "encrypted": measured,
        "baseline_raw_zmq": baseline,
        "ratio_median": {k: round(measured[k]["median_us"] / baseline[k]["median_us"], 2) for k in measured},
        "target_tensor_echo_median_us": 300,
        "meets_target": measured["tensor_echo"]["median_us"] <= 300,
    }
