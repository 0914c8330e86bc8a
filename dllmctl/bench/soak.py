"""``dllmctl bench soak``: many OpenAI clients for a long while against the registered cluster.

The OpenAI-compatible API (the very app ``dllmctl serve`` runs, in this process on a free loopback
port, its rate limit raised: this measures the cluster, not the limiter) takes ``clients``
concurrent clients, each sending ``requests`` chat completions one after another (every fourth one
streamed, prompts differing). A warm-up round of the same shape runs first, because the first
round grows a daemon's memory while allocators and buffers settle (13-37% measured here); the
figures are the measured round's: requests, errors by status, latency, tokens/s, every node's RSS
before and after (target: growth <= 10%), and the sessions left open on the stages once the round
is over (target: none, within a few seconds).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from dllmctl.cluster.live import query_nodes
from dllmctl.cluster.registry import NodeEntry
from dllmd.net.identity import Identity

RSS_GROWTH_TARGET = 0.10
SESSIONS_FREED_WITHIN_S = 10.0
TOPICS = ["the sea", "a robot", "snow", "a violin", "Mars", "a clock", "a garden", "a dragon"]


class _Server:
    """The API app under uvicorn on a thread, on 127.0.0.1 and a free port."""

    def __init__(self, user: Identity, key: str):
        import uvicorn

        from dllmctl.frontends.openai_api import make_app
        from dllmctl.frontends.serve_limits import ServeLimits

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        app = make_app(user, key, ServeLimits(rate=1e6, burst=1_000_000))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", loop="asyncio", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def _request(port: int, key: str, model: str, index: int, max_tokens: int) -> tuple[int, int, float]:
    """One chat completion: (HTTP status, completion tokens, seconds); streamed when ``index % 4 == 3``."""
    stream = index % 4 == 3
    body = json.dumps({"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                       "messages": [{"role": "user", "content": f"Tell me about {TOPICS[index % len(TOPICS)]} "
                                                                f"({index})"}]})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/v1/chat/completions", body,
                           {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        payload = response.read()
    except OSError:
        return 0, 0, time.perf_counter() - started
    finally:
        connection.close()
    if response.status != 200:
        return response.status, 0, time.perf_counter() - started
    if stream:
        chunks = [line[6:] for line in payload.decode().splitlines() if line.startswith("data: ")]
        if not chunks or chunks[-1] != "[DONE]":
            return 599, 0, time.perf_counter() - started  # a stream that did not end properly
        # A delta per detokenized piece: about a token each (the stream carries no usage by default).
        deltas = [json.loads(c)["choices"] for c in chunks[:-1]]
        tokens = sum(1 for choices in deltas if choices and choices[0]["delta"].get("content"))
    else:
        tokens = json.loads(payload)["usage"]["completion_tokens"]
    return 200, tokens, time.perf_counter() - started


def _round(port: int, key: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c: int) -> list[tuple[int, int, float]]:
        return [_request(port, key, model, c * requests + r, max_tokens) for r in range(requests)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rows in pool.map(client, range(clients)) for r in rows]
    wall = time.perf_counter() - started
    statuses = Counter(status for status, _, _ in results)
    seconds = sorted(s for _, _, s in results)
    return {"requests": len(results), "errors": len(results) - statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "tokens": sum(t for _, t, _ in results), "wall_s": round(wall, 2),
            "tokens_per_second": round(sum(t for _, t, _ in results) / wall, 1),
            "latency_p50_ms": round(statistics.median(seconds) * 1000, 1),
            "latency_p95_ms": round(seconds[int(0.95 * (len(seconds) - 1))] * 1000, 1)}


def _nodes(user: Identity, nodes: list[NodeEntry], model: str) -> dict[str, dict]:
    rows = asyncio.run(query_nodes(user, nodes))
    return {r["name"]: {"rss": r.get("rss_bytes") or 0,
                        "sessions": sum(s["sessions"] for s in r["serving"] if s["model"] == model)}
            for r in rows if r["status"] == "up"}


def _sessions_left(user: Identity, nodes: list[NodeEntry], model: str) -> tuple[int, float]:
    started = time.monotonic()
    while True:
        left = sum(n["sessions"] for n in _nodes(user, nodes, model).values())
        waited = time.monotonic() - started
        if not left or waited > SESSIONS_FREED_WITHIN_S:
            return left, round(waited, 2)
        time.sleep(0.25)


def run(user: Identity, nodes: list[NodeEntry], model: str, clients: int, requests: int, max_tokens: int,
        progress=lambda _: None) -> dict:
    key = secrets.token_urlsafe(24)
    with _Server(user, key) as server:
        progress("warm-up round")
        warmup = _round(server.port, key, model, clients, requests, max_tokens)
        before = _nodes(user, nodes, model)
        progress("measured round")
        measured = _round(server.port, key, model, clients, requests, max_tokens)
    after = _nodes(user, nodes, model)
    left, waited = _sessions_left(user, nodes, model)
    rss = {name: {"before": before[name]["rss"], "after": after[name]["rss"],
                  "growth": round(after[name]["rss"] / before[name]["rss"] - 1, 4) if before[name]["rss"] else None}
           for name in before if name in after}
    growth = max((r["growth"] for r in rss.values() if r["growth"] is not None), default=0.0)
    return {"model": model, "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens,
            "warmup": warmup, "measured": measured, "rss": rss, "max_rss_growth": growth,
            "rss_growth_target": RSS_GROWTH_TARGET, "sessions_left": left, "sessions_checked_after_s": waited,
            "meets_target": measured["errors"] == 0 and growth <= RSS_GROWTH_TARGET and left == 0}
