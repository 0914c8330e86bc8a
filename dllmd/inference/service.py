"""A node's inference service: the layer spans it serves and the sessions running through them.

Per generated token the client sends one ``session.forward`` (one-way) to the first stage; each
stage runs its layers and pushes the hidden state straight to the next stage (one-way again); the
last stage samples and streams the token id back on the session's stream. N stages, N + 1
messages, no round trip per hop.

A stage serves many sessions at once. Arriving steps wait in a :class:`StepScheduler`, which runs
the pending decode steps of different sessions as one batched forward pass (continuous batching:
sessions join and leave between passes) and prefill chunks one at a time in between, so a long
prompt never stalls the sessions that are decoding for more than one chunk. A ``session.forward``
carries several sessions' steps when a batch moves on to the next stage together.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
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
from dllmd.net.schema import Op, bounded
from dllmd.net.server import DEFERRED, Call, HandlerError, Operation, RpcServer, allow
from dllmd.net.wire import ErrorCode

log = logging.getLogger("dllmd.inference")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
SWEEP_INTERVAL_S = 2.0
MAX_STEP_TOKENS = 4096  # a longer prompt is sent in chunks
MAX_ALL_LOGITS_TOKENS = 512  # "all" logits are [seq, vocab] fp32: keep replies small
MAX_BATCH = 64  # sessions per batched decode pass (and steps per session.forward message)
STEP_MS_SMOOTHING = 0.2  # weight of the newest pass in the per-span step-time average


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
    batching: bool = True  # False: this session's steps always run alone ("model" parallelism)


@dataclass
class StepItem:
    session: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**31)
    start: int = bounded(lo=0, hi=2**31)
    # False for every chunk of a long prompt but the last: the last stage samples only after the last.
    final: bool = True
    # Filled in along the chain, returned with the token: each stage's compute time, the batch it
    # ran in, and the bytes it pushed to the next stage (what `dllmctl bench infer` reports).
    compute_ms: list[float] = bounded([], max_len=256)
    batch: list[int] = bounded([], max_len=256)
    hop_bytes: list[int] = bounded([], max_len=256)


@dataclass
class ForwardArgs:
    items: list[StepItem] = bounded(max_len=MAX_BATCH)


@dataclass
class SessionArgs:
    session: str = bounded(max_len=64)


@dataclass
class ServedSpan:
    model: str
    span: LayerSpan
    param_bytes: int
    step_ms: float = 0.0  # recent compute time of a decode pass: what routing weighs replicas by
    busy_s: float = 0.0  # compute time spent, for utilization
    passes: int = 0
    tokens: int = 0

    def describe(self, sessions: int, queued: int, kv_bytes: int = 0) -> dict:
        s = self.span
        return {"model": self.model, "start": s.start, "end": s.end, "embed": s.embed, "head": s.head,
                "dtype": str(s.dtype).removeprefix("torch."), "param_bytes": self.param_bytes, "sessions": sessions,
                "kv_bytes": kv_bytes, "queued": queued, "step_ms": round(self.step_ms, 3), "busy_s": round(self.busy_s, 4),
                "passes": self.passes, "tokens": self.tokens}


@dataclass
class PendingStep:
    session: Session
    item: StepItem
    inputs: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.inputs.shape[1]


class StepScheduler:
    """Pending steps of every session at this node, and the choice of what runs next.

    The oldest pending step decides: a prefill chunk (or a step of a session that asked to run
    alone) runs by itself; a decode step runs together with every other pending decode step of the
    same model, one per session. A session's steps always run in arrival order."""

    def __init__(self):
        self._pending: deque[PendingStep] = deque()
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, step: PendingStep) -> None:
        self._pending.append(step)
        self.ready.set()

    def queued_for(self, model: str) -> int:
        return sum(1 for p in self._pending if p.session.model == model)

    def take(self, live: Callable[[Session], bool]) -> list[PendingStep]:
        """The next pass: one step alone, or a batch of decode steps. Steps of ended sessions are dropped."""
        self._pending = deque(p for p in self._pending if live(p.session))
        if not self._pending:
            self.ready.clear()
            return []
        first = self._pending[0]
        if not self._batchable(first):
            self._pending.popleft()
            return [first]
        batch, seen, kept = [], set(), deque()
        for pending in self._pending:
            session = pending.session
            if (len(batch) < MAX_BATCH and session.id not in seen and self._batchable(pending)
                    and session.model == first.session.model):
                batch.append(pending)
            else:
                kept.append(pending)
            seen.add(session.id)  # later steps of a session wait for its earlier ones
        self._pending = kept
        return batch

    @staticmethod
    def _batchable(pending: PendingStep) -> bool:
        return pending.tokens == 1 and pending.session.batching


class InferenceService:
    def __init__(self, peers: PeerPool, keys: AuthorizedKeys, memory_budget_bytes: int):
        self.peers = peers
        self.keys = keys
        self.spans: dict[str, ServedSpan] = {}
        self.sessions = SessionTable(memory_budget_bytes)
        self.scheduler = StepScheduler()
        # One compute thread: torch already parallelizes inside an op, and one queue keeps every
        # session's steps in arrival order.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._tasks: list[asyncio.Task] = []
        self._pushes: dict[tuple[str, str], asyncio.Task] = {}  # the latest push to each next stage

    # --- lifecycle ------------------------------------------------------------------------------

    def register(self, server: RpcServer) -> None:
        anyone = allow(Role.ADMIN, Role.CLIENT, Role.PEER)
        server.register(Operation(Op("session.open", OpenArgs, dict), self._open, anyone))
        server.register(Operation(Op("session.forward", ForwardArgs, dict), self._forward, anyone))
        server.register(Operation(Op("session.close", SessionArgs, dict), self._close, anyone))

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._sweep()), asyncio.ensure_future(self._run_passes())]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for session in list(self.sessions._sessions.values()):
            self._end(session, ErrorCode.UNAVAILABLE, "the node is shutting down")
        self.compute.shutdown(wait=False, cancel_futures=True)

    def serving(self) -> list[dict]:
        described = []
        for name, served in self.spans.items():
            sessions = self.sessions.for_model(name)
            described.append(served.describe(len(sessions), self.scheduler.queued_for(name),
                                             sum(s.cache.nbytes for s in sessions)))
        return described

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

    def _live(self, session: Session) -> bool:
        return self.sessions.get(session.id) is session

    def _end(self, session: Session, code: str, message: str) -> None:
        if self._live(session):  # not a newer session that reused the id
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
        session = Session(a.session, a.model, span.new_cache(), call.responder, next_hop, a.sampling, a.logits,
                          a.ttl_s, batching=a.batching)
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

    def _forward(self, call: Call) -> dict:
        """Queue each carried step; a bad step ends its own session (and is reported on that
        session's stream), never the others in the same message."""
        items: list[StepItem] = call.args.items
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
                self._admit(session, item, inputs)
            except HandlerError as exc:
                self._end(session, exc.code, exc.message)
                failures.append(exc.message)
        if failures:
            raise HandlerError(ErrorCode.BAD_ARGS if len(failures) == len(items) else ErrorCode.CONFLICT,
                               "; ".join(failures[:4]))
        return {"queued": len(items)}

    def _admit(self, session: Session, item: StepItem, inputs: torch.Tensor) -> None:
        span = self.spans[session.model].span
        self._check_input(span, inputs)
        tokens = inputs.shape[1]
        if tokens > MAX_STEP_TOKENS:
            raise HandlerError(ErrorCode.TOO_LARGE, f"at most {MAX_STEP_TOKENS} tokens per step; send long prompts "
                                                    f"in chunks")
        if session.logits == "all" and tokens > MAX_ALL_LOGITS_TOKENS:
            raise HandlerError(ErrorCode.TOO_LARGE, f"logits='all' is limited to {MAX_ALL_LOGITS_TOKENS} tokens per step")
        context = getattr(span.config, "max_position_embeddings", None)
        if context and item.start + tokens > context:
            raise HandlerError(ErrorCode.TOO_LARGE, f"position {item.start + tokens} exceeds the model's context "
                                                    f"of {context} tokens")
        if self.sessions.cache_bytes() > self.sessions.memory_budget_bytes:
            raise HandlerError(ErrorCode.BUSY, "this node's KV-cache budget is exhausted; the session was ended")
        # Steps queue up (a prompt's chunks arrive back to back): each must continue the one before.
        if item.start != session.queued_position:
            raise HandlerError(ErrorCode.CONFLICT, f"step starts at position {item.start} but the session is at "
                               f"{session.queued_position}; replay the session")
        session.queued_position += tokens
        session.touch()
        self.scheduler.add(PendingStep(session, item, inputs))

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
        served = self.spans.get(batch[0].session.model)
        if served is None:  # undeployed while queued: unload already ended the sessions
            return
        try:
            outputs, compute_ms = await asyncio.get_running_loop().run_in_executor(
                self.compute, self._compute, served, batch)
        except (ValueError, RuntimeError, IndexError) as exc:  # the batch's caches are unusable
            for pending in batch:
                self._end(pending.session, ErrorCode.BAD_ARGS,
                          f"layers [{served.span.start}, {served.span.end}) failed: {exc}")
            return
        self._account(served, batch, compute_ms)
        self._deliver(batch, outputs, compute_ms)

    @staticmethod
    def _compute(served: ServedSpan, batch: list[PendingStep]) -> tuple[list[torch.Tensor], float]:
        """Runs on the compute thread: one step alone, or a batch of decode steps."""
        span = served.span
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
    def _account(served: ServedSpan, batch: list[PendingStep], compute_ms: float) -> None:
        served.busy_s += compute_ms / 1000
        served.passes += 1
        served.tokens += sum(p.tokens for p in batch)
        if batch[0].tokens == 1:
            served.step_ms = compute_ms if served.step_ms == 0 else (
                (1 - STEP_MS_SMOOTHING) * served.step_ms + STEP_MS_SMOOTHING * compute_ms)

    def _deliver(self, batch: list[PendingStep], outputs: list[torch.Tensor], compute_ms: float) -> None:
        """Hidden states go on to the next stage (one message per next hop for the whole batch);
        the last stage samples and streams each session its token."""
        onward: dict[tuple[str, str], list[tuple[PendingStep, dict, torch.Tensor]]] = {}
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
            self._push_in_order(hop, steps)

    def _push_in_order(self, hop: tuple[str, str], steps: list) -> None:
        """Send without holding up the next pass (a dead next stage would stall every session here for
        the send timeout), yet in order: each push to a hop waits for the one before it."""
        previous = self._pushes.get(hop)

        async def push() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await self._push(hop, steps)

        task = self._pushes[hop] = asyncio.ensure_future(push())
        task.add_done_callback(lambda done: self._pushes.get(hop) is done and self._pushes.pop(hop))

    def _reply(self, session: Session, item: StepItem, out: torch.Tensor, trace: dict) -> None:
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

    async def _push(self, hop: tuple[str, str], steps: list[tuple[PendingStep, dict, torch.Tensor]]) -> None:
        items = []
        for pending, trace, hidden in steps:
            trace["hop_bytes"].append(hidden.numel() * hidden.element_size())
            item = pending.item
            items.append({"session": item.session, "step": item.step, "start": item.start, "final": item.final,
                          **trace})
        try:
            await self.peers.get(*hop).send_oneway("session.forward", {"items": items}, [h for _, _, h in steps],
                                                   timeout=5.0)
        except (CallError, zmq.ZMQError) as exc:
            # The connection stays in the pool: other sessions may be using it, and zmq reconnects.
            for pending, _, _ in steps:
                self._end(pending.session, ErrorCode.UNAVAILABLE, f"could not reach the next stage {hop[0]}: {exc}")
