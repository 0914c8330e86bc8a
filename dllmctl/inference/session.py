"""The distributed session, as the client runs it: open the session on each stage of a route, then
per token send one message to the first stage and receive one token id from the last.

A long prompt goes out as chunks, all at once: while the second stage works on chunk k the first
is already on chunk k + 1 (with ``parallelism="pipeline"``). With ``parallelism="model"`` the
prompt crosses in one piece and the stages never batch this session with others.

The client holds only the tokenizer and the token ids so far: enough to replay the session on
other nodes when a stage dies (see :mod:`dllmctl.failover`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from dllmd.net.client import BadReply, CallError, CallTimeout, RemoteError, ReplyStream, RpcClient
from dllmd.net.messages.inference import (MAX_STEP_TOKENS, MAX_STOP_IDS, SESSION_CLOSE, SESSION_FORWARD,
                                          SESSION_KEEPALIVE, SESSION_OPEN, Opened, OpenArgs, SamplingParams,
                                          SessionArgs)
from dllmd.net.codec import HopCodec
from dllmd.net.pool import ConnectionPool
from dllmd.net.schema import parse_reply, to_wire
from dllmd.net.wire import ErrorCode, WireError
from dllmd.inference.sampling import TokenHistory, penalized, sample_next
from dllmctl.inference.prefix import usable_cached_tokens
from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.private import PrivateEnds
from dllmctl.inference.relay import RelayedNode
from dllmctl.placement.routing import Stage

# pipeline: prompt chunks overlap across stages, decode batched with other sessions; model: one piece,
# never batched; tensor: one tensor-parallel group holds every layer; hybrid: a chain of such groups.
PARALLELISMS = ("pipeline", "model", "tensor", "hybrid")
PREFILL_CHUNK = 128  # tokens per prefill chunk: small enough that stages overlap, big enough to batch well
STEP_TIMEOUT_S = 60.0  # plus PREFILL_S_PER_TOKEN for each token of the step (long prompts on slow CPUs)
PREFILL_S_PER_TOKEN = 0.05
OPEN_TIMEOUT_S = 30.0
# A stage frees a session idle this long: a client killed mid-generation (or a laptop closed) holds KV
# memory on every stage for seconds, not the minutes a fixed TTL took. A live client's keepalives
# (several per lease, so a lost one or a slow step does not end it) keep an idle session open.
SESSION_LEASE_S = 15.0
KEEPALIVES_PER_LEASE = 5
# The session's connection to the first stage is up (it was opened on it): a send that cannot go out
# this quickly means the node is gone, and failing over beats waiting.
SEND_TIMEOUT_S = 2.0
# Errors that say a node (or the way to it) failed, not that the request was bad: worth a replica.
NODE_FAILURE_CODES = {ErrorCode.UNAVAILABLE, ErrorCode.BUSY, ErrorCode.INTERNAL, ErrorCode.SESSION_EXPIRED,
                      ErrorCode.NOT_FOUND, ErrorCode.CONFLICT, ErrorCode.NO_MEMORY}


class StageFailure(RuntimeError):
    """A stage of the route failed or stopped answering; ``suspects`` are the nodes to blame (all
    stages of the route when nothing says which one)."""

    def __init__(self, message: str, suspects: list[str]):
        super().__init__(message)
        self.suspects = suspects


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    stage_compute_ms: list[list[float]] = field(default_factory=list)  # per step, per stage
    stage_batch: list[list[int]] = field(default_factory=list)  # per step, per stage: sessions in the pass
    hop_bytes: list[list[int]] = field(default_factory=list)  # per step, per stage boundary
    routes: list[list[dict]] = field(default_factory=list)  # [{node, start, end}]; one more per failover
    failovers: list[dict] = field(default_factory=list)  # {"step", "suspects", "error", "stall_s"}
    cached_tokens: int = 0  # prompt tokens the stages took from their prefix caches (the session of step 0)
    time_to_first_token_s: float = 0.0  # from the start of the request (route, open, prefill) to the first token


def prompt_chunks(token_ids: list[int], parallelism: str, chunk: int = PREFILL_CHUNK) -> list[list[int]]:
    size = MAX_STEP_TOKENS if parallelism == "model" else chunk
    return [token_ids[i:i + size] for i in range(0, len(token_ids), size)] or [[]]


class DistributedSession:
    """One generation session across a route of stages."""

    def __init__(self, pool: ConnectionPool, route: list[Stage], model: str, sampling: SamplingParams, *,
                 prompt_tokens: int, max_new_tokens: int, logits: str = "none", ttl_s: float = SESSION_LEASE_S,
                 parallelism: str = "pipeline", hops: HopCodec = HopCodec(), prefix: Sequence[bytes] = (),
                 private: PrivateEnds | None = None, relays: Sequence[NodeEntry] = (),
                 history: Sequence[int] = (), replayed: int = 0, feed_back: bool = False,
                 stop_ids: Sequence[int] = ()):
        """``prompt_tokens`` and ``max_new_tokens`` bound the positions the session will hold: every
        stage reserves its KV cache for them when the session opens (and refuses it if they do not fit).
        ``prefix``: the chain hashes of the prompt's blocks (:mod:`dllmctl.inference.prefix`), so the
        stages skip what their prefix caches hold and cache what this session computes.
        ``private``: the client runs the embeddings, the first layers and the head itself (the route
        starts at layer K and ends without the head); the session's front cache is its own, so a new
        session (a failover's replay) rebuilds it with the stages'.
        ``relays``: every request to every stage goes through these relay nodes, sealed in one layer per
        relay (:mod:`dllmctl.inference.relay`): the stages see the last relay's key, not this client's.
        ``history``: with penalties, the session's tokens so far (the prompt, then the ``replayed`` tokens an
        earlier session generated), handed to whoever samples: the last stage at the open, or this client.
        ``feed_back``: for a session that runs one :meth:`generate`, on a route of one stage that holds the
        whole model (one node, or one tensor-parallel group), the stage feeds each token back as the next
        step itself and this client only reads them: no round trip per token. ``stop_ids`` (at most 64)
        end it there as they end :meth:`generate`; a stop string ends it when the client closes."""
        if parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {', '.join(PARALLELISMS)}")
        self.pool, self.route, self.model = pool, route, model
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens
        self.sampling, self.logits, self.ttl_s, self.parallelism = sampling, logits, ttl_s, parallelism
        self.hops = hops
        self.id = secrets.token_hex(16)
        self.clients = [RelayedNode(pool, relays, stage.node) if relays else
                        pool.get(stage.node.address, stage.node.public_key) for stage in route]
        self.streams: list[ReplyStream | None] = [None] * len(route)
        self._arrivals: asyncio.Queue[int] = asyncio.Queue()  # which stream has a reply waiting
        self.position = 0  # tokens the stages hold in their caches
        self.prefix = list(prefix)
        self.cached_reported = [0] * len(route)  # leading prompt tokens each stage holds cached
        self.private = private
        self._keepalive: asyncio.Task | None = None
        self.front_cache = private.new_cache() if private else None
        self.input_dtype = torch.float32  # what the first stage computes in (private: what to send it)
        self.history = list(history) if penalized(sampling) else []
        if penalized(sampling) and len(self.history) != prompt_tokens:
            raise ValueError("a session with penalties needs its tokens so far: history = the prompt_tokens ids")
        self.replayed = replayed if self.history else 0
        self.first_step = replayed  # generate() numbers this session's steps from here
        # A private client samples, so it keeps the history the last stage would.
        self.token_history = (TokenHistory.of(self.history[:len(self.history) - self.replayed],
                                              self.history[len(self.history) - self.replayed:])
                              if private and self.history else None)
        if private and self.prefix:
            raise ValueError("a private session cannot use the prefix cache: the client's layers would miss it")
        # Only where the one stage embeds and samples (a private client samples itself).
        self.feed_back = (feed_back and len(route) == 1 and not private and route[0].span.start == 0
                          and len(stop_ids) <= MAX_STOP_IDS)
        self.stop_ids = sorted(set(stop_ids)) if self.feed_back else []
        self._fed_from = -1  # the step after which the stage feeds itself: it sends what comes next

    async def __aenter__(self) -> "DistributedSession":
        try:
            await asyncio.gather(*(self._open(i) for i in range(len(self.route))))
        except BaseException:
            await self.close()
            raise
        self._keepalive = asyncio.create_task(self._keep_alive())
        return self

    async def _keep_alive(self) -> None:
        """Tell every stage, several times a lease, that this client is still there (steps do too; this
        covers the gaps: a long prefill upstream, a slow stage, the client's own work)."""
        interval = self.ttl_s / KEEPALIVES_PER_LEASE
        while True:
            await asyncio.sleep(interval)
            calls = [client.invoke(SESSION_KEEPALIVE, SessionArgs(self.id), timeout=interval)
                     for client, stream in zip(self.clients, self.streams) if stream is not None and not stream.finished]
            # A stage that fails to answer is the generation loop's to notice (it fails over).
            await asyncio.gather(*calls, return_exceptions=True)

    async def _open(self, index: int) -> None:
        stage = self.route[index]
        nxt = self.route[index + 1].node if index + 1 < len(self.route) else None
        args = OpenArgs(session=self.id, model=self.model, start=stage.span.start, end=stage.span.end,
                        prompt_tokens=self.prompt_tokens, max_new_tokens=self.max_new_tokens,
                        next_address=nxt.address if nxt else "", next_public_key=nxt.public_key if nxt else "",
                        sampling=self.sampling, logits=self.logits, ttl_s=self.ttl_s,
                        batching=self.parallelism != "model", activations=self.hops.encoding,
                        activation_block=self.hops.block, prefix=self.prefix, private=self.private is not None,
                        feed_back_until=self.first_step + self.max_new_tokens if self.feed_back else 0,
                        stop_ids=self.stop_ids)
        tensors = []
        if nxt is None and self.history and not self.private:  # the stage that samples
            args.replayed = self.replayed
            tensors = [torch.tensor(self.history, dtype=torch.int64)]
        try:
            stream = await self.clients[index].open_stream(SESSION_OPEN.name, to_wire(args), tensors,
                                                           timeout=OPEN_TIMEOUT_S)
            self.streams[index] = stream
            stream.watch(lambda: self._arrivals.put_nowait(index))
            opened = await stream.next(timeout=OPEN_TIMEOUT_S)
            reply = parse_reply(Opened, opened.result)
            self.cached_reported[index] = reply.cached_tokens
            if index == 0:
                self.input_dtype = _dtype(reply.dtype)
        except CallError as exc:
            raise self._failure(index, exc) from exc
        except WireError as exc:
            raise self._failure(index, BadReply(f"{stage.node.name} opened the session with a {exc.message}")) from exc

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session on every stage still holding it (frees its KV caches now, not at TTL)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        async def close_one(client: RpcClient, stream: ReplyStream | None) -> None:
            if stream is not None and not stream.finished:
                stream.close()
                try:
                    await client.invoke(SESSION_CLOSE, SessionArgs(self.id), timeout=3)
                except CallError:
                    pass  # the node is gone or already dropped the session; its TTL frees it anyway

        await asyncio.gather(*(close_one(c, s) for c, s in zip(self.clients, self.streams)))

    def _failure(self, index: int, exc: CallError) -> Exception:
        """Turn a stage's error into a StageFailure naming whom to blame, or keep a request error."""
        node = self.route[index].node.name
        if isinstance(exc, RemoteError):
            # Checked first: the stage itself is fine, the one after it is not (under load a stage's push
            # can fail before this client notices the same node is gone).
            if exc.code == ErrorCode.NEXT_HOP_UNREACHABLE and index + 1 < len(self.route):
                return StageFailure(f"{node}: {exc.message}", [self.route[index + 1].node.name])
            if exc.code not in NODE_FAILURE_CODES:
                return exc  # the request itself is wrong (prompt too long, bad input): no replica helps
            return StageFailure(f"{node}: {exc.message}", [node])
        if isinstance(exc, CallTimeout):
            return StageFailure(f"{node}: {exc}", [s.node.name for s in self.route])
        return StageFailure(f"{node}: {exc}", [node])

    async def step(self, token_ids: list[int], step: int) -> tuple[dict, list[torch.Tensor]]:
        """Run ``token_ids`` through every stage; return the last stage's report (``token``, per-stage
        ``compute_ms``, ``batch`` and ``hop_bytes``) and the logits it sent (one tensor per chunk).
        A step the stage feeds itself (``feed_back``, after the first) is only read."""
        if self.feed_back and 0 <= self._fed_from < step:
            self.position += len(token_ids)
            return await self._step_reply(step, STEP_TIMEOUT_S)
        chunks = prompt_chunks(token_ids, self.parallelism)
        first = self.clients[0]
        for n, chunk in enumerate(chunks):
            item = {"session": self.id, "step": step, "start": self.position, "final": n == len(chunks) - 1}
            tensors = [torch.tensor([chunk], dtype=torch.int64)]
            if self.private:  # hidden states after the client's layers, as the stages send them to each other
                hidden = self.private.embed(chunk, self.position, self.front_cache, self.input_dtype)
                item["encoding"], tensors = self.hops.encode(hidden)
            try:
                await first.send_oneway(SESSION_FORWARD.name, {"items": [item]}, tensors, timeout=SEND_TIMEOUT_S)
            except CallError as exc:
                raise self._failure(0, exc) from exc
            self.position += len(chunk)
        if self.feed_back:
            self._fed_from = step
        return await self._step_reply(step, STEP_TIMEOUT_S + PREFILL_S_PER_TOKEN * len(token_ids))

    async def _step_reply(self, step: int, timeout: float) -> tuple[dict, list[torch.Tensor]]:
        """The last stage's report of ``step`` and the logits that came with it."""
        logits: list[torch.Tensor] = []
        while True:
            reply = await self._next_from_last(timeout)
            if reply.result.get("step") != step:
                raise StageFailure(f"the last stage sent step {reply.result.get('step')!r} where {step} was due",
                                   [self.route[-1].node.name])
            if self.private:
                step_logits = self._private_logits(reply)
                chunk_logits = [step_logits] if self.logits != "none" else []
            else:
                chunk_logits = reply.tensors
            logits.extend(chunk_logits)
            if not reply.result.get("chunk"):
                if self.private:  # sampled here, as the last stage would: same logits, same per-step seed
                    return {**reply.result, "token": sample_next(step_logits[-1], self.sampling, step,
                                                                      self.token_history)}, logits
                return reply.result, logits

    def _private_logits(self, reply) -> torch.Tensor:
        """The last stage's hidden states ``[seq, hidden]`` through the client's norm and head."""
        if len(reply.tensors) != 1 or reply.tensors[0].dim() != 2:
            raise StageFailure("the last stage sent no hidden state", [self.route[-1].node.name])
        return self.private.logits(reply.tensors[0])

    def skippable(self, fed_tokens: int) -> int:
        """Leading tokens of the first feed the stages already hold (none when every position's logits
        are wanted: cached positions have none)."""
        if not self.prefix or self.logits == "all":
            return 0
        return usable_cached_tokens(self.cached_reported, fed_tokens)

    async def _next_from_last(self, timeout: float):
        """The last stage's next reply, while any other stage may report a failure on its own stream.

        Every stream signals its arrivals on one queue (``ReplyStream.watch``), so a step waits once:
        not on a task per stage, created and cancelled again for every token."""
        last = len(self.streams) - 1
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                index = await asyncio.wait_for(self._arrivals.get(), max(remaining, 0))
            except TimeoutError:
                node = self.route[last].node
                raise self._failure(last, CallTimeout(f"{node.address} sent nothing for {timeout:g}s")) from None
            stream = self.streams[index]
            if not stream.ready():
                continue  # a signal for a reply already taken
            try:
                reply = stream.take()
            except CallError as exc:
                raise self._failure(index, exc) from exc
            if index != last:
                # Another stage's stream sent something other than an error: none ever does.
                raise StageFailure("a stage sent an unexpected reply", [s.node.name for s in self.route])
            return reply

    async def generate(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
                       on_token: Callable[[int], None] = lambda _: None, result: Generation | None = None,
                       stop_when: Callable[[], bool] = lambda: False) -> Generation:
        """Prefill then decode, until a stop id, ``max_new_tokens`` or ``stop_when()`` (asked after each
        token: a stop string). With ``result`` holding tokens from an earlier (failed) session, the
        prompt and those tokens are replayed as one prefill and generation goes on where it stopped:
        step numbers (and so seeded sampling) continue, so the output is what one session gives."""
        result = result or Generation(prompt_tokens=len(prompt_ids))
        result.routes.append([{"node": s.node.name, "start": s.span.start, "end": s.span.end} for s in self.route])
        started = time.perf_counter() - result.seconds
        feed = list(prompt_ids) + result.token_ids
        if self.position == 0:  # a new session: the stages start from what they hold cached
            self.position = self.skippable(len(feed))
            feed = feed[self.position:]
            if not result.token_ids:
                result.cached_tokens = self.position
        for step in range(len(result.token_ids), max_new_tokens):
            t0 = time.perf_counter()
            report, logits = await self.step(feed, step)
            token = int(report["token"])
            result.step_seconds.append(time.perf_counter() - t0)
            result.stage_compute_ms.append(list(report.get("compute_ms", [])))
            result.stage_batch.append(list(report.get("batch", [])))
            result.hop_bytes.append(list(report.get("hop_bytes", [])))
            if step == 0:
                result.first_token_s = result.step_seconds[0]
            result.logits.extend(logits)
            result.token_ids.append(token)
            on_token(token)
            result.seconds = time.perf_counter() - started
            if token in stop_ids or stop_when():
                break
            feed = [token]
        result.seconds = time.perf_counter() - started
        return result


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise BadReply(f"a stage reports an unknown dtype {name!r}")
    return dtype
