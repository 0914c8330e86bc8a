"""What a tensor-parallel reduction's exchange costs with nothing of dllm around it: two processes
(as two members are), each sending the other a partial's bytes over CURVE-encrypted PUSH/PULL on
loopback and waiting for the other's, round after round. ``dllmctl bench infer`` reports a group's
transfer time per reduction against this, measured in the same run.

Two processes rather than two threads: threads of one process share its interpreter lock, and
which one holds it when a message lands made the figure swing by 2x from run to run."""

from __future__ import annotations

import multiprocessing
import statistics
import time

WARMUP = 100


def _side(index: int, keys, ports, payload_bytes: int, rounds: int, results) -> None:
    import zmq

    ctx = zmq.Context()
    public, secret = keys[index]
    inbox = ctx.socket(zmq.PULL)
    inbox.curve_server, inbox.curve_secretkey, inbox.curve_publickey = True, secret, public
    inbox.bind(f"tcp://127.0.0.1:{ports[index]}")
    out = ctx.socket(zmq.PUSH)
    out.curve_secretkey, out.curve_publickey, out.curve_serverkey = secret, public, keys[1 - index][0]
    out.connect(f"tcp://127.0.0.1:{ports[1 - index]}")
    payload = bytes(payload_bytes)
    times = []
    for _ in range(rounds + WARMUP):
        started = time.perf_counter()
        out.send(payload, copy=True)
        inbox.recv()
        times.append(time.perf_counter() - started)
    out.send(b"done")  # the other side may still be waiting for its last round
    inbox.close(linger=0)
    out.close(linger=1000)
    ctx.term()
    if index == 0:
        results.put(statistics.median(times[WARMUP:]) * 1000)


def raw_exchange_ms(payload_bytes: int, rounds: int = 2000) -> float:
    """The median time, in ms, of one exchange of ``payload_bytes`` each way between two processes."""
    import socket

    import zmq

    keys = [zmq.curve_keypair() for _ in range(2)]
    ports = []
    for _ in range(2):
        with socket.socket() as probe:  # a free port each (the race with another binder is harmless here)
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    sides = [spawn.Process(target=_side, args=(i, keys, ports, payload_bytes, rounds, results), daemon=True)
             for i in range(2)]
    for side in sides:
        side.start()
    try:
        return round(results.get(timeout=120), 4)
    finally:
        for side in sides:
            side.join(timeout=10)
            if side.is_alive():
                side.kill()
