"""The distributed session, as the client runs it: find a chain of stages, open the session on
each, then per token send one message to the first stage and receive one token id from the last.

The client holds only the tokenizer and the token ids so far (enough to replay the session on
other nodes when a stage dies).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dllmd.inference.sampling import SamplingParams
from dllmd.net.client import CallError, ReplyStream, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.schema import to_wire
from dllmctl.cluster import NodeEntry

STEP_TIMEOUT_S = 60.0  # plus PREFILL_S_PER_TOKEN for each token of the step (long prompts on slow CPUs)
PREFILL_S_PER_TOKEN = 0.05


class RouteError(RuntimeError):
    """No chain of nodes covers the model's layers."""


@dataclass(frozen=True)
class Stage:
    node: NodeEntry
    start: int
    end: int
    embed: bool
    head: bool
    latency_ms: float = 0.0


def choose_route(candidates: list[Stage], num_layers: int, model: str) -> list[Stage]:
    """The chain of stages covering layers [0, num_layers) with the fewest hops (ties: lower total
    latency, then names). Stages must meet exactly: each starts where the previous one ended."""
    usable = [c for c in candidates if c.end > c.start and (c.start > 0 or c.embed) and (c.end < num_layers or c.head)]
    best: dict[int, tuple[int, float, list[Stage]]] = {0: (0, 0.0, [])}
    for position in range(num_layers):  # spans only move forward, so positions in order suffice
        if position not in best:
            continue
        hops, latency, route = best[position]
        for stage in sorted((c for c in usable if c.start == position), key=lambda c: c.node.name):
            option = (hops + 1, latency + stage.latency_ms, route + [stage])
            current = best.get(stage.end)
            if current is None or option[:2] < current[:2]:
                best[stage.end] = option
    if num_layers not in best:
        reached = max(best)
        raise RouteError(f"no reachable node serves layer {reached} of {model}; deploy it "
                         f"('dllmctl deploy {model}') or bring its nodes back")
    return best[num_layers][2]


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    stage_compute_ms: list[list[float]] = field(default_factory=list)  # per step, per stage
    hop_bytes: list[list[int]] = field(default_factory=list)  # per step, per stage boundary


class DistributedSession:
    """One generation session across a route of stages."""

    def __init__(self, user: Identity, route: list[Stage], model: str, sampling: SamplingParams,
                 logits: str = "none", ttl_s: float = 600.0):
        self.user, self.route, self.model = user, route, model
        self.sampling, self.logits, self.ttl_s = sampling, logits, ttl_s
        self.id = secrets.token_hex(16)
        self.clients: list[RpcClient] = []
        self.streams: list[ReplyStream] = []
        self.position = 0  # tokens the stages hold in their caches

    async def __aenter__(self) -> "DistributedSession":
        try:
            for i, stage in enumerate(self.route):
                nxt = self.route[i + 1].node if i + 1 < len(self.route) else None
                client = RpcClient(self.user, stage.node.address, stage.node.public_key)
                self.clients.append(client)
                stream = await client.open_stream("session.open", {
                    "session": self.id, "model": self.model, "start": stage.start, "end": stage.end,
                    "next_address": nxt.address if nxt else "", "next_public_key": nxt.public_key if nxt else "",
                    "sampling": to_wire(self.sampling), "logits": self.logits, "ttl_s": self.ttl_s})
                self.streams.append(stream)
            for stream in self.streams:
                await stream.next(timeout=30)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        async def close_one(client: RpcClient, stream: ReplyStream) -> None:
            if not stream.finished:
                try:
                    await client.call("session.close", {"session": self.id}, timeout=3)
                except CallError:
                    pass  # the node is gone or already dropped the session; its TTL frees it anyway

        await asyncio.gather(*(close_one(c, s) for c, s in zip(self.clients, self.streams)))
        for client in self.clients:
            client.close()

    async def step(self, token_ids: list[int], step: int) -> tuple[dict, torch.Tensor | None]:
        """Run ``token_ids`` through every stage; return the last stage's report (``token``, per-stage
        ``compute_ms`` and ``hop_bytes``) and the logits if they were asked for."""
        ids = torch.tensor([token_ids], dtype=torch.int64)
        await self.clients[0].send_oneway("session.forward", {"session": self.id, "step": step, "start": self.position},
                                          [ids])
        self.position += len(token_ids)
        timeout = STEP_TIMEOUT_S + PREFILL_S_PER_TOKEN * len(token_ids)
        last = asyncio.ensure_future(self.streams[-1].next(timeout=timeout))
        # Any other stage may report a failure on its own stream while the last one waits.
        watchers = [asyncio.ensure_future(s.next(timeout=timeout + 1)) for s in self.streams[:-1]]
        try:
            done, _ = await asyncio.wait([last, *watchers], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not last:
                    task.result()  # raises the stage's RemoteError
            reply = last.result()
        finally:
            for task in watchers:
                task.cancel()
        return reply.result, (reply.tensors[0] if reply.tensors else None)

    async def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
                       on_token: Callable[[int], None] = lambda _: None) -> Generation:
        result = Generation(prompt_tokens=len(prompt_ids))
        started = time.perf_counter()
        feed = list(prompt_ids)
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            report, logits = await self.step(feed, step)
            token = int(report["token"])
            result.step_seconds.append(time.perf_counter() - t0)
            result.stage_compute_ms.append(list(report.get("compute_ms", [])))
            result.hop_bytes.append(list(report.get("hop_bytes", [])))
            if step == 0:
                result.first_token_s = result.step_seconds[0]
            if logits is not None:
                result.logits.append(logits)
            result.token_ids.append(token)
            on_token(token)
            if token in stop_ids:
                break
            feed = [token]
        result.seconds = time.perf_counter() - started
        return result
