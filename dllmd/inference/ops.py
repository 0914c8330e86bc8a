"""A node's inference service: the layer spans it serves, the sessions running through them, and the
``session.*`` operations.

Per generated token the client sends one ``session.forward`` (one-way) to the first stage; each
stage runs its layers and pushes the hidden state straight to the next stage (one-way again,
:mod:`.forwarding`); the last stage samples and streams the token id back on the session's stream.
N stages, N + 1 messages, no round trip per hop. Arriving steps are admitted and batched by
:mod:`.scheduler`; every pass runs on one compute thread. A ``session.forward`` carries several
sessions' steps when a batch moves on to the next stage together.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from dllmd.config import validate_endpoint
from dllmd.inference.forwarding import Forwarder, Onward
from dllmd.inference.sampling import sample_next
from dllmd.inference.scheduler import PendingStep, StepScheduler, admit
from dllmd.inference.sessions import NextHop, NoRoom, Session, SessionTable
from dllmd.models.span import LayerSpan
from dllmd.net.identity import parse_public_key
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages import inference as M
from dllmd.net.messages.node import ServedSpan
from dllmd.net.pool import ConnectionPool
from dllmd.net.server import DEFERRED, Call, HandlerError, Operation, RpcServer, allow
from dllmd.net.wire import ErrorCode

log = logging.getLogger("dllmd.inference")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SWEEP_INTERVAL_S = 2.0
STEP_MS_SMOOTHING = 0.2  # weight of the newest pass in the per-span step-time average


@dataclass
class LoadedSpan:
    """A span this node serves, with its counters."""

    model: str
    span: LayerSpan
    param_bytes: int
    step_ms: float = 0.0  # recent compute time of a decode pass: what routing weighs replicas by
    busy_s: float = 0.0  # compute time spent, for utilization
    passes: int = 0
    tokens: int = 0

    def describe(self, sessions: list[Session] = (), queued: int = 0) -> ServedSpan:
        s = self.span
        return ServedSpan(model=self.model, start=s.start, end=s.end, embed=s.embed, head=s.head,
                          dtype=str(s.dtype).removeprefix("torch."), param_bytes=self.param_bytes,
                          sessions=len(sessions), kv_bytes=sum(x.cache.nbytes for x in sessions),
                          kv_reserved_bytes=sum(x.reserved_bytes for x in sessions), queued=queued,
                          step_ms=round(self.step_ms, 3), busy_s=round(self.busy_s, 4), passes=self.passes,
                          tokens=self.tokens)


class InferenceService:
    def __init__(self, peers: ConnectionPool, keys: AuthorizedKeys, memory_budget_bytes: int):
        self.keys = keys
        self.spans: dict[str, LoadedSpan] = {}
        self.sessions = SessionTable(memory_budget_bytes)
        self.scheduler = StepScheduler()
        self.forwarder = Forwarder(peers, lambda pending, why: self._end(pending.session,
                                                                         ErrorCode.NEXT_HOP_UNREACHABLE, why))
        # One compute thread: torch already parallelizes inside an op, and one queue keeps every
        # session's steps in arrival order.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ------------------------------------------------------------------------------

    def register(self, server: RpcServer) -> None:
        anyone = allow(Role.ADMIN, Role.CLIENT, Role.PEER)
        server.register(Operation(M.SESSION_OPEN, self._open, anyone))
        server.register(Operation(M.SESSION_FORWARD, self._forward, anyone))
        server.register(Operation(M.SESSION_CLOSE, self._close, anyone))

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._sweep()), asyncio.ensure_future(self._run_passes())]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for session in self.sessions.all():
            self._end(session, ErrorCode.UNAVAILABLE, "the node is shutting down")
        self.compute.shutdown(wait=False, cancel_futures=True)

    def serving(self) -> list[ServedSpan]:
        return [loaded.describe(self.sessions.for_model(name), self.scheduler.queued_for(name))
                for name, loaded in self.spans.items()]

    async def load(self, model: str, build: Callable[[], LayerSpan]) -> LoadedSpan:
        """Build a span on the compute thread and serve it (replacing this model's previous span)."""
        span = await asyncio.get_running_loop().run_in_executor(self.compute, build)
        param_bytes = sum(p.numel() * p.element_size() for p in span.parameters())
        self.unload(model)
        loaded = self.spans[model] = LoadedSpan(model, span, param_bytes)
        log.info("serving %s layers [%d, %d) (%.1f MiB)", model, span.start, span.end, param_bytes / 2**20)
        return loaded

    def unload(self, model: str) -> bool:
        for session in self.sessions.for_model(model):
            self._end(session, ErrorCode.UNAVAILABLE, f"model {model} was undeployed from this node")
        return self.spans.pop(model, None) is not None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            for session in self.sessions.expired():
                self._end(session, ErrorCode.SESSION_EXPIRED,
                          f"session {session.id} expired after {session.ttl_s:g}s idle")

    def _live(self, session: Session) -> bool:
        return self.sessions.get(session.id) is session

    def _end(self, session: Session, code: str, message: str) -> None:
        if self._live(session):  # not a newer session that reused the id
            self.sessions.pop(session.id)
        session.stream.fail(code, message)

    # --- operations -----------------------------------------------------------------------------

    def _open(self, call: Call):
        a: M.OpenArgs = call.args
        if not SESSION_ID.match(a.session):
            raise HandlerError(ErrorCode.BAD_ARGS, "session ids are 8-64 characters of [A-Za-z0-9_-]")
        if a.logits not in ("none", "last", "all"):
            raise HandlerError(ErrorCode.BAD_ARGS, "logits must be none, last or all")
        loaded = self.spans.get(a.model)
        if loaded is None:
            raise HandlerError(ErrorCode.NOT_FOUND, f"this node does not serve {a.model!r}; deploy it first")
        span = loaded.span
        if (a.start, a.end) != (span.start, span.end):
            raise HandlerError(ErrorCode.CONFLICT, f"this node serves layers [{span.start}, {span.end}) of "
                                                         f"{a.model}, not [{a.start}, {a.end}); the layout changed: "
                                                         f"re-plan")
        if self.sessions.get(a.session) is not None:
            raise HandlerError(ErrorCode.CONFLICT, f"session {a.session} is already open here")
        if span.head == bool(a.next_address):
            raise HandlerError(ErrorCode.BAD_ARGS, "the last stage takes no next hop; every other stage needs one")
        if a.next_address:
            self._check_next_hop(a.next_address, a.next_public_key)
        positions = a.prompt_tokens + a.max_new_tokens
        context = getattr(span.config, "max_position_embeddings", None)
        if context and positions > context:
            raise HandlerError(ErrorCode.TOO_LARGE, f"{a.prompt_tokens} prompt + {a.max_new_tokens} new tokens "
                                                    f"exceed the model's context of {context} tokens")
        reserve = span.kv_cache_bytes(positions)
        next_hop = NextHop(a.next_address, a.next_public_key) if a.next_address else None
        session = Session(a.session, a.model, span.new_cache(), call.responder, next_hop, a.sampling, a.logits,
                          a.ttl_s, positions=positions, reserved_bytes=reserve, batching=a.batching)
        try:
            self.sessions.add(session)
        except NoRoom as exc:
            raise HandlerError(ErrorCode.NO_MEMORY, f"layers [{span.start}, {span.end}): {exc}; try another "
                                                    f"replica, a shorter request, or later") from None
        call.responder.send(M.Opened(opened=True, start=span.start, end=span.end, reserved_bytes=reserve))
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

    def _close(self, call: Call) -> M.Closed:
        session = self.sessions.pop(call.args.session)
        if session is None:
            raise HandlerError(ErrorCode.NOT_FOUND, f"no session {call.args.session} here")
        session.stream.send({"closed": True}, more=False)
        return M.Closed(closed=True, steps=session.steps)

    def _forward(self, call: Call) -> M.Queued:
        """Queue each carried step; a bad step ends its own session (and is reported on that
        session's stream), never the others in the same message."""
        items: list[M.StepItem] = call.args.items
        if not items or len(call.tensors) != len(items):
            raise HandlerError(ErrorCode.BAD_ARGS, f"session.forward carries one tensor per step: "
                                                   f"{len(items)} steps, {len(call.tensors)} tensors")
        failures = []
        for item, inputs in zip(items, call.tensors):
            session = self.sessions.get(item.session)
            if session is None:
                failures.append(f"no session {item.session} here (closed or expired)")
                continue
            try:
                self.scheduler.add(admit(self.spans[session.model].span, session, item, inputs))
            except HandlerError as exc:
                self._end(session, exc.code, exc.message)
                failures.append(exc.message)
        if failures:
            raise HandlerError(ErrorCode.BAD_ARGS if len(failures) == len(items) else ErrorCode.CONFLICT,
                               "; ".join(failures[:4]))
        return M.Queued(len(items))

    # --- passes ---------------------------------------------------------------------------------

    async def _run_passes(self) -> None:
        while True:
            await self.scheduler.ready.wait()
            batch = self.scheduler.take(self._live)
            if not batch:
                continue
            try:
                await self._run_pass(batch)
            except Exception:  # a bug in one pass must not stop the node serving every other session
                log.exception("a pass of %d step(s) failed", len(batch))
                for pending in batch:
                    self._end(pending.session, ErrorCode.INTERNAL, "this stage failed internally; see its log")

    async def _run_pass(self, batch: list[PendingStep]) -> None:
        loaded = self.spans.get(batch[0].session.model)
        if loaded is None:  # undeployed while queued: unload already ended the sessions
            return
        try:
            outputs, compute_ms = await asyncio.get_running_loop().run_in_executor(
                self.compute, self._compute, loaded, batch)
        except (ValueError, RuntimeError, IndexError) as exc:  # the batch's caches are unusable
            for pending in batch:
                self._end(pending.session, ErrorCode.BAD_ARGS,
                          f"layers [{loaded.span.start}, {loaded.span.end}) failed: {exc}")
            return
        self._account(loaded, batch, compute_ms)
        self._deliver(batch, outputs, compute_ms)

    @staticmethod
    def _compute(loaded: LoadedSpan, batch: list[PendingStep]) -> tuple[list[torch.Tensor], float]:
        """Runs on the compute thread: one step alone, or a batch of decode steps."""
        span = loaded.span
        started = time.perf_counter()
        if len(batch) == 1:
            pending = batch[0]
            session, start = pending.session, pending.item.start
            # Positions stay on the CPU: the span checks them against the cache without a device sync.
            positions = torch.arange(start, start + pending.tokens).unsqueeze(0)
            keep = 0 if session.logits == "all" else 1
            outputs = [span(pending.inputs, positions, session.cache, keep)]
        else:
            stacked = torch.cat([p.inputs for p in batch], dim=0)
            result = span.forward_batch(stacked, [p.session.cache for p in batch])
            outputs = list(result.split(1, dim=0))
        if outputs[0].device.type == "cuda":
            torch.cuda.synchronize(outputs[0].device)
        return outputs, (time.perf_counter() - started) * 1000

    @staticmethod
    def _account(loaded: LoadedSpan, batch: list[PendingStep], compute_ms: float) -> None:
        loaded.busy_s += compute_ms / 1000
        loaded.passes += 1
        loaded.tokens += sum(p.tokens for p in batch)
        if batch[0].tokens == 1:
            loaded.step_ms = compute_ms if loaded.step_ms == 0 else (
                (1 - STEP_MS_SMOOTHING) * loaded.step_ms + STEP_MS_SMOOTHING * compute_ms)

    def _deliver(self, batch: list[PendingStep], outputs: list[torch.Tensor], compute_ms: float) -> None:
        """Hidden states go on to the next stage (one message per next hop for the whole batch);
        the last stage samples and streams each session its token."""
        onward: dict[tuple[str, str], list[Onward]] = {}
        for pending, out in zip(batch, outputs):
            session, item = pending.session, pending.item
            session.steps += 1
            trace = {"compute_ms": [*item.compute_ms, round(compute_ms, 4)], "batch": [*item.batch, len(batch)],
                     "hop_bytes": list(item.hop_bytes)}
            if session.next_hop is not None:
                hop = session.next_hop
                onward.setdefault((hop.address, hop.public_key), []).append((pending, trace, out.cpu()))
            elif self._live(session):
                self._reply(session, item, out, trace)
        for hop, steps in onward.items():
            self.forwarder.push_in_order(hop, steps)

    def _reply(self, session: Session, item: M.StepItem, out: torch.Tensor, trace: dict) -> None:
        logits = [] if session.logits == "none" else [out[0].cpu()]
        if not item.final:
            if session.logits == "all":  # the client collects every chunk's logits
                session.stream.send({"step": item.step, "chunk": True, **trace}, logits)
            return
        try:
            token = sample_next(out[0, -1], session.sampling, item.step)
        except (ValueError, RuntimeError) as exc:
            self._end(session, ErrorCode.BAD_ARGS, f"sampling failed: {exc}")
            return
        session.stream.send({"step": item.step, "token": token, **trace}, logits)
