"""A node's inference service: the layer spans it serves and the sessions running through them.

Per generated token the client sends one ``session.forward`` (one-way) to the first stage; each
stage runs its layers on the compute thread and pushes the hidden state straight to the next
stage (one-way again); the last stage samples and streams the token id back on the session's
stream. N stages, N + 1 messages, no round trip per hop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq

from dllmd.inference.sampling import SamplingParams, sample_next
from dllmd.inference.sessions import NextHop, Session, SessionTable
from dllmd.models.span import LayerSpan
from dllmd.net.client import CallError
from dllmd.config import validate_endpoint
from dllmd.net.identity import parse_public_key
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.peers import PeerPool
from dllmd.net.schema import bounded
from dllmd.net.server import DEFERRED, Call, HandlerError, Operation, RpcServer, allow
from dllmd.net.wire import ErrorCode

log = logging.getLogger("dllmd.inference")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SWEEP_INTERVAL_S = 2.0
MAX_STEP_TOKENS = 4096  # a longer prompt is sent in chunks
MAX_ALL_LOGITS_TOKENS = 512  # "all" logits are [seq, vocab] fp32: keep replies small


@dataclass
class OpenArgs:
    session: str = bounded(max_len=64)
    model: str = bounded(max_len=128)
    start: int = bounded(lo=0, hi=100_000)
    end: int = bounded(lo=0, hi=100_000)
    next_address: str = bounded("", max_len=256)
    next_public_key: str = bounded("", max_len=64)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logits: str = bounded("none", max_len=8)
    ttl_s: float = bounded(600.0, lo=1.0, hi=3600.0)


@dataclass
class ForwardArgs:
    session: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**31)
    start: int = bounded(lo=0, hi=2**31)
    # Filled in along the chain, returned with the token: each stage's compute time and the bytes
    # it pushed to the next stage (what `dllmctl bench infer` splits per-token time with).
    compute_ms: list[float] = bounded([], max_len=256)
    hop_bytes: list[int] = bounded([], max_len=256)


@dataclass
class SessionArgs:
    session: str = bounded(max_len=64)


@dataclass
class ServedSpan:
    model: str
    span: LayerSpan
    param_bytes: int

    def describe(self, sessions: int) -> dict:
        s = self.span
        return {"model": self.model, "start": s.start, "end": s.end, "embed": s.embed, "head": s.head,
                "dtype": str(s.dtype).removeprefix("torch."), "param_bytes": self.param_bytes, "sessions": sessions}


class InferenceService:
    def __init__(self, peers: PeerPool, keys: AuthorizedKeys, memory_budget_bytes: int):
        self.peers = peers
        self.keys = keys
        self.spans: dict[str, ServedSpan] = {}
        self.sessions = SessionTable(memory_budget_bytes)
        # One compute thread: torch already parallelizes inside an op, and one queue keeps every
        # session's steps in arrival order.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._sweeper: asyncio.Task | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def register(self, server: RpcServer) -> None:
        anyone = allow(Role.ADMIN, Role.CLIENT, Role.PEER)
        server.register(Operation("session.open", self._open, OpenArgs, anyone))
        server.register(Operation("session.forward", self._forward, ForwardArgs, anyone))
        server.register(Operation("session.close", self._close, SessionArgs, anyone))

    def start(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for session in list(self.sessions._sessions.values()):
            self._end(session, ErrorCode.UNAVAILABLE, "the node is shutting down")
        self.compute.shutdown(wait=False, cancel_futures=True)

    def serving(self) -> list[dict]:
        return [s.describe(len(self.sessions.for_model(name))) for name, s in self.spans.items()]

    async def load(self, model: str, build: Callable[[], LayerSpan]) -> ServedSpan:
        """Build a span on the compute thread and serve it (replacing this model's previous span)."""
        span = await asyncio.get_running_loop().run_in_executor(self.compute, build)
        param_bytes = sum(p.numel() * p.element_size() for p in span.parameters())
        self.unload(model)
        served = self.spans[model] = ServedSpan(model, span, param_bytes)
        log.info("serving %s layers [%d, %d) (%.1f MiB)", model, span.start, span.end, param_bytes / 2**20)
        return served

    def unload(self, model: str) -> bool:
        for session in self.sessions.for_model(model):
            self._end(session, ErrorCode.UNAVAILABLE, f"model {model} was undeployed from this node")
        return self.spans.pop(model, None) is not None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for session in self.sessions.expired():
                self._end(session, "expired", f"session {session.id} expired after {session.ttl_s:g}s idle")

    def _end(self, session: Session, code: str, message: str) -> None:
        if self.sessions.get(session.id) is session:  # not a newer session that reused the id
            self.sessions.pop(session.id)
        session.stream.fail(code, message)

    # --- operations -----------------------------------------------------------------------------

    def _open(self, call: Call):
        a: OpenArgs = call.args
        if not SESSION_ID.match(a.session):
            raise HandlerError(ErrorCode.BAD_ARGS, "session ids are 8-64 characters of [A-Za-z0-9_-]")
        if a.logits not in ("none", "last", "all"):
            raise HandlerError(ErrorCode.BAD_ARGS, "logits must be none, last or all")
        served = self.spans.get(a.model)
        if served is None:
            raise HandlerError(ErrorCode.NOT_FOUND, f"this node does not serve {a.model!r}; deploy it first")
        span = served.span
        if (a.start, a.end) != (span.start, span.end):
            raise HandlerError(ErrorCode.CONFLICT, f"this node serves layers [{span.start}, {span.end}) of {a.model}, "
                                                   f"not [{a.start}, {a.end}); the layout changed: re-plan")
        if self.sessions.get(a.session) is not None:
            raise HandlerError(ErrorCode.CONFLICT, f"session {a.session} is already open here")
        if not self.sessions.has_room():
            raise HandlerError(ErrorCode.BUSY, "this node's KV-cache budget is full; retry later or add nodes")
        if span.head == bool(a.next_address):
            raise HandlerError(ErrorCode.BAD_ARGS, "the last stage takes no next hop; every other stage needs one")
        if a.next_address:
            self._check_next_hop(a.next_address, a.next_public_key)
        next_hop = NextHop(a.next_address, a.next_public_key) if a.next_address else None
        session = Session(a.session, a.model, span.new_cache(), call.responder, next_hop, a.sampling, a.logits, a.ttl_s)
        self.sessions.add(session)
        call.responder.send({"opened": True, "start": span.start, "end": span.end})
        return DEFERRED

    def _check_next_hop(self, address: str, public_key: str) -> None:
        """A stage only pushes to a TCP endpoint whose key this node trusts as a peer: a client
        cannot make the daemon connect anywhere it likes."""
        try:
            validate_endpoint(address)
            key = parse_public_key(public_key).hex()
        except ValueError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"next hop: {exc}") from None
        entry = self.keys.by_public_key(key)
        if entry is None or entry.role != Role.PEER:
            raise HandlerError(ErrorCode.FORBIDDEN, "the next stage's key is not authorized as a peer on this node")

    def _close(self, call: Call) -> dict:
        session = self.sessions.pop(call.args.session)
        if session is None:
            raise HandlerError(ErrorCode.NOT_FOUND, f"no session {call.args.session} here")
        session.stream.send({"closed": True}, more=False)
        return {"closed": True, "steps": session.steps}

    async def _forward(self, call: Call) -> dict:
        a: ForwardArgs = call.args
        session = self.sessions.get(a.session)
        if session is None:
            raise HandlerError(ErrorCode.NOT_FOUND, f"no session {a.session} here (closed or expired)")
        try:
            return await self._step(session, a, call.tensors)
        except HandlerError as exc:
            self._end(session, exc.code, exc.message)
            raise
        except Exception as exc:  # one-way: the session's stream is the only place the client hears of it
            log.exception("step of session %s failed", session.id)
            self._end(session, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            raise HandlerError(ErrorCode.INTERNAL, str(exc)) from None

    async def _step(self, session: Session, a: ForwardArgs, tensors: list[torch.Tensor]) -> dict:
        span = self.spans[session.model].span
        if len(tensors) != 1:
            raise HandlerError(ErrorCode.BAD_ARGS, "session.forward carries exactly one tensor")
        inputs = tensors[0]
        self._check_input(span, inputs)
        if inputs.shape[1] > MAX_STEP_TOKENS:
            raise HandlerError(ErrorCode.TOO_LARGE, f"at most {MAX_STEP_TOKENS} tokens per step; send long prompts "
                                                    f"in chunks")
        if session.logits == "all" and inputs.shape[1] > MAX_ALL_LOGITS_TOKENS:
            raise HandlerError(ErrorCode.TOO_LARGE, f"logits='all' is limited to {MAX_ALL_LOGITS_TOKENS} tokens per step")
        context = getattr(span.config, "max_position_embeddings", None)
        if context and a.start + inputs.shape[1] > context:
            raise HandlerError(ErrorCode.TOO_LARGE, f"position {a.start + inputs.shape[1]} exceeds the model's context "
                                                    f"of {context} tokens")
        if self.sessions.cache_bytes() > self.sessions.memory_budget_bytes:
            raise HandlerError(ErrorCode.BUSY, "this node's KV-cache budget is exhausted; the session was ended")
        if a.start != session.cache.length:
            raise HandlerError(ErrorCode.CONFLICT, f"step starts at position {a.start} but the session is at "
                               f"{session.cache.length}; replay the session")
        session.touch()
        positions = torch.arange(a.start, a.start + inputs.shape[1]).unsqueeze(0)
        keep = 0 if session.logits == "all" else 1

        def run() -> tuple[torch.Tensor, float]:
            started = time.perf_counter()
            # Positions stay on the CPU: the span checks them against the cache without a device sync.
            result = span(inputs.to(span.device), positions, session.cache, keep)
            if result.device.type == "cuda":
                torch.cuda.synchronize(result.device)
            return result, (time.perf_counter() - started) * 1000

        try:
            # Every step on the one compute thread, decode included: running decode on the loop saved
            # ~0.2 ms per hop but let it race a prefill on the same span (models whose rotary tables
            # update in place) and, on CUDA, block the socket behind queued GPU work.
            out, compute_ms = await asyncio.get_running_loop().run_in_executor(self.compute, run)
        except (ValueError, RuntimeError, IndexError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"layers [{span.start}, {span.end}) failed: {exc}") from None
        session.steps += 1
        trace = {"compute_ms": [*a.compute_ms, round(compute_ms, 4)], "hop_bytes": list(a.hop_bytes)}
        if session.next_hop is not None:
            await self._push(session, a, out, trace)
            return {}
        try:
            token = sample_next(out[0, -1], session.sampling, a.step)
        except (ValueError, RuntimeError) as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"sampling failed: {exc}") from None
        logits = [] if session.logits == "none" else [out[0].cpu()]
        session.stream.send({"step": a.step, "token": token, **trace}, logits)
        return {"step": a.step, "token": token}

    @staticmethod
    def _check_input(span: LayerSpan, inputs: torch.Tensor) -> None:
        if span.embed:
            if inputs.dtype != torch.int64 or inputs.dim() != 2 or inputs.shape[0] != 1 or inputs.shape[1] == 0:
                raise HandlerError(ErrorCode.BAD_ARGS, f"the first stage takes int64 token ids [1, seq]; got "
                                                       f"{str(inputs.dtype).removeprefix('torch.')} {list(inputs.shape)}")
            if int(inputs.max()) >= span.config.vocab_size or int(inputs.min()) < 0:
                raise HandlerError(ErrorCode.BAD_ARGS, f"token ids must be in [0, {span.config.vocab_size})")
            return
        hidden = span.config.hidden_size
        if (inputs.dtype != span.dtype or inputs.dim() != 3 or inputs.shape[0] != 1 or inputs.shape[1] == 0
                or inputs.shape[2] != hidden):
            raise HandlerError(ErrorCode.BAD_ARGS, f"stage [{span.start}, {span.end}) takes "
                               f"{str(span.dtype).removeprefix('torch.')} hidden states [1, seq, {hidden}]; got "
                               f"{str(inputs.dtype).removeprefix('torch.')} {list(inputs.shape)}")

    async def _push(self, session: Session, a: ForwardArgs, hidden: torch.Tensor, trace: dict) -> None:
        hop = session.next_hop
        hidden = hidden.cpu()
        trace["hop_bytes"].append(hidden.numel() * hidden.element_size())
        try:
            await self.peers.get(hop.address, hop.public_key).send_oneway(
                "session.forward", {"session": session.id, "step": a.step, "start": a.start, **trace}, [hidden],
                timeout=5.0)
        except (CallError, zmq.ZMQError) as exc:
            # The connection stays in the pool: other sessions may be using it, and zmq reconnects.
            raise HandlerError(ErrorCode.UNAVAILABLE, f"could not reach the next stage {hop.address}: {exc}") from None
