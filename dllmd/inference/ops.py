"""A node's inference service: the layer spans it serves, the sessions running through them, and the
``session.*`` operations.

Per generated token the client sends one ``session.forward`` (one-way) to the first stage; each
stage runs its layers and pushes the hidden state straight to the next stage (one-way again,
:mod:`.forwarding`); the last stage samples and streams the token id back on the session's stream.
N stages, N + 1 messages, no round trip per hop. Arriving steps are admitted and batched by
:mod:`.scheduler`; passes run one at a time: CPU decode passes on the event loop itself, the others
(prefill, tensor-parallel, CUDA) on one compute thread. A ``session.forward`` carries several
sessions' steps when a batch moves on to the next stage together.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from dllmd import hardware
from dllmd.config import validate_endpoint
from dllmd.inference.forwarding import Forwarder, Onward
from dllmd.inference.memory import MemoryCap, NoRoom
from dllmd.inference.prefix_cache import PrefixCache
from dllmd.inference import private
from dllmd.inference.sampling import opened_history, penalized, sample_next
from dllmd.inference.scheduler import PendingStep, StepScheduler, admit
from dllmd.inference.sessions import DETACHED, NextHop, Session, SessionTable
from dllmd.inference.tensor_group import GroupChannel, GroupError, GroupMember, PassSpec, TensorGroup
from dllmd.models.span import LayerSpan
from dllmd.net.codec import CodecError, HopCodec, decode, parts_of
from dllmd.net.identity import parse_public_key
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages import inference as M
from dllmd.net.messages import tensor as T
from dllmd.net.messages.node import ServedSpan
from dllmd.net.pool import ConnectionPool
from dllmd.net.server import DEFERRED, Call, HandlerError, Operation, RpcServer
from dllmd.net.wire import ErrorCode
from dllmd.observe.metrics import NodeMetrics

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
    group: TensorGroup | None = None  # a tensor-parallel member's group
    ready: bool = True  # False until a tensor-parallel member is linked to its group
    follow_stop: threading.Event | None = None  # a follower's thread runs until this is set
    follow_thread: threading.Thread | None = None

    def describe(self, sessions: list[Session] = (), queued: int = 0, prefix: tuple[int, int] = (0, 0)) -> ServedSpan:
        s, g = self.span, self.group
        return ServedSpan(model=self.model, start=s.start, end=s.end, embed=s.embed, head=s.head,
                          prefix_cache_bytes=prefix[0], prefix_cache_blocks=prefix[1],
                          dtype=str(s.dtype).removeprefix("torch."), param_bytes=self.param_bytes,
                          sessions=len(sessions), kv_bytes=sum(x.cache.nbytes for x in sessions),
                          kv_reserved_bytes=sum(x.reserved_bytes for x in sessions), queued=queued,
                          step_ms=round(self.step_ms, 3), busy_s=round(self.busy_s, 4), passes=self.passes,
                          tokens=self.tokens, tensor_slice=s.tensor_slice,
                          group_port=g.channel.port if g else 0, group_ready=bool(g) and self.ready,
                          group_broken=(g.broken or "") if g else "", reductions=g.reductions if g else 0,
                          reduce_s=round(g.reduce_s, 4) if g else 0.0, reduce_wait_s=round(g.wait_s, 4) if g else 0.0)


class InferenceService:
    def __init__(self, peers: ConnectionPool, keys: AuthorizedKeys, memory_budget_bytes: int,
                 group_channel: Callable[[], GroupChannel] | None = None, own_key: str = "",
                 memory_cap: MemoryCap = MemoryCap(), prefix_cache_bytes: int = 0, metrics: NodeMetrics | None = None):
        self.keys = keys
        self.metrics = metrics or NodeMetrics()  # passes and generated tokens (node.stats, Prometheus)
        self.own_key = own_key  # this node's Ed25519 public key (hex): its entry in a group's member list
        self.group_channel = group_channel  # opens a tensor-parallel member's sockets
        self.spans: dict[str, LoadedSpan] = {}
        self.cap = memory_cap
        self._loading_bytes = 0  # weights of spans being built: they count against the cap already
        self.sessions = SessionTable(memory_budget_bytes, cap=memory_cap, weights_bytes=self.weights_bytes)
        self.prefix = PrefixCache(prefix_cache_bytes, room=self._prefix_room)
        self.scheduler = StepScheduler()
        self.forwarder = Forwarder(peers, lambda pending, why: self._end(pending.session,
                                                                         ErrorCode.NEXT_HOP_UNREACHABLE, why))
        # One compute thread: torch already parallelizes inside an op, and one queue keeps every
        # session's steps in arrival order.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ------------------------------------------------------------------------------

    def register(self, server: RpcServer) -> None:
        server.register(Operation(M.SESSION_OPEN, self._open))
        server.register(Operation(M.SESSION_FORWARD, self._forward))
        server.register(Operation(M.SESSION_CLOSE, self._close))
        server.register(Operation(M.SESSION_KEEPALIVE, self._keepalive))
        server.register(Operation(T.GROUP_CONNECT, self._connect_group))

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._sweep()), asyncio.ensure_future(self._run_passes())]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for session in self.sessions.all():
            self._end(session, ErrorCode.UNAVAILABLE, "the node is shutting down")
        for loaded in self.spans.values():
            self._stop_following(loaded)
        # At most one pass is in flight (bounded by the group timeout); group sockets must be closed
        # after it.
        self.compute.shutdown(wait=True, cancel_futures=True)
        for loaded in self.spans.values():
            if loaded.group is not None:
                loaded.group.channel.close()

    def serving(self, prefix_stats: bool = True) -> list[ServedSpan]:
        """What this node serves. ``prefix_stats`` False hides the prefix cache's contents: watching
        them change would tell a client whether another client's prompt hit or how long it was."""
        return [loaded.describe(self.sessions.for_model(name), self.scheduler.queued_for(name),
                                self.prefix.held(name) if prefix_stats else (0, 0))
                for name, loaded in self.spans.items()]

    def weights_bytes(self) -> int:
        """Weights this node holds and is loading."""
        # A snapshot: the prefix cache asks from the compute thread while the loop may add a span.
        return sum(loaded.param_bytes for loaded in list(self.spans.values())) + self._loading_bytes

    def _prefix_room(self) -> int:
        """What the prefix cache may hold now: what sessions leave unreserved of the KV budget, and what
        the owner's cap leaves beside the weights and the reservations. The cache only ever fills that
        headroom and gives it back (``shrink``) whenever a session opens or a span loads, so admission
        counts it as free and dllm's total stays within the cap."""
        room = self.sessions.unreserved_bytes()
        if self.cap.limit_bytes:
            room = min(room, self.cap.limit_bytes - self.memory_used_bytes())
        return room

    def memory_used_bytes(self) -> int:
        """What counts against the owner's cap: weights held and loading, KV caches reserved."""
        return self.weights_bytes() + self.sessions.reserved_bytes()

    async def load(self, model: str, build: Callable[[], LayerSpan], expected_bytes: int = 0) -> LoadedSpan:
        """Build a span on the compute thread and serve it (replacing this model's previous span). A
        tensor-parallel slice also opens its group socket; it serves once ``group.connect`` links it.

        NoRoom if the span's weights do not fit the owner's cap beside what is held (the previous span
        too: it is dropped only once the new one is built): first by ``expected_bytes``, before
        anything is read, then by what the built span holds."""
        self.cap.check("its weights", expected_bytes, self.memory_used_bytes())
        self._loading_bytes += expected_bytes
        self.prefix.shrink()  # the weights take the cap's headroom the prefix cache may hold
        try:
            span = await asyncio.get_running_loop().run_in_executor(self.compute, build)
        finally:
            self._loading_bytes -= expected_bytes
        hardware.return_freed_memory()
        param_bytes = span.weight_bytes
        try:
            self.cap.check("its weights", param_bytes, self.memory_used_bytes())
        except NoRoom:
            del span  # its memory goes back now, not whenever the refusal's traceback is collected
            hardware.return_freed_memory()
            raise
        group = None
        if span.tensor_slice is not None:
            if self.group_channel is None:
                raise ValueError("this node cannot join tensor-parallel groups")
            group = TensorGroup(self.group_channel(), span.tensor_slice.group, span.tensor_slice.rank,
                                span.tensor_slice.vocab_lo)
            span.attach(group.reduce)
        self.unload(model)
        self.prefix.drop_model(model)  # cached blocks belong to the span that computed them
        loaded = self.spans[model] = LoadedSpan(model, span, param_bytes, group=group, ready=group is None)
        log.info("serving %s layers [%d, %d)%s (%.1f MiB)", model, span.start, span.end,
                 f" as member {span.tensor_slice.rank} of group {group.group}" if group else "", param_bytes / 2**20)
        return loaded

    def unload(self, model: str) -> bool:
        for session in self.sessions.for_model(model):
            self._end(session, ErrorCode.UNAVAILABLE, f"model {model} was undeployed from this node")
        loaded = self.spans.pop(model, None)
        self.prefix.drop_model(model)
        if loaded is not None:
            self._leave_group(loaded)
        return loaded is not None

    def _leave_group(self, loaded: LoadedSpan) -> None:
        if loaded.group is None:
            return
        self._stop_following(loaded)
        # The leader's channel belongs to the compute thread: close it there, after any pass in flight.
        self.compute.submit(loaded.group.channel.close)

    @staticmethod
    def _stop_following(loaded: LoadedSpan) -> None:
        if loaded.follow_stop is not None:
            loaded.follow_stop.set()
            loaded.follow_thread.join(timeout=2.0)

    # --- tensor-parallel groups ---------------------------------------------------------------------

    async def _connect_group(self, call: Call) -> T.Connected:
        """Link this member to the rest of its group; a follower then starts running the leader's passes."""
        a: T.ConnectArgs = call.args
        loaded = self.spans.get(a.model)
        if loaded is None or loaded.group is None or loaded.group.group != a.group:
            raise HandlerError(ErrorCode.NOT_FOUND, f"this node holds no slice of {a.model} in group {a.group!r}; "
                                                    f"load it first (span.load with its tensor_slice)")
        tslice = loaded.span.tensor_slice
        if len(a.members) != tslice.size:
            raise HandlerError(ErrorCode.BAD_ARGS, f"group {a.group} has {tslice.size} members, not {len(a.members)}")
        members = [self._member(m, rank, tslice.rank) for rank, m in enumerate(a.members)]
        if loaded.ready:
            raise HandlerError(ErrorCode.CONFLICT, f"this node is already linked into group {a.group}; reload the "
                                                   f"slice to link it again")
        group = loaded.group
        if tslice.rank == 0:  # the leader's channel belongs to its compute thread, which runs its passes
            await asyncio.get_running_loop().run_in_executor(self.compute, group.channel.connect, tslice.rank, members)
        else:
            group.channel.connect(tslice.rank, members)
            loaded.follow_stop = threading.Event()
            loaded.follow_thread = threading.Thread(target=self._follow, args=(loaded, asyncio.get_running_loop()),
                                                    name=f"follow-{a.group}", daemon=True)
            loaded.follow_thread.start()
        loaded.ready = True
        log.info("linked into group %s as member %d of %d", a.group, tslice.rank, tslice.size)
        return T.Connected(connected=True, rank=tslice.rank, size=tslice.size)

    def _member(self, member: T.GroupMemberArgs, rank: int, own_rank: int) -> GroupMember:
        """A member this node will connect to: an endpoint, and a key this node trusts as a peer (a caller
        cannot make the daemon connect anywhere it likes). This node's own entry must carry its own key."""
        try:
            validate_endpoint(member.endpoint)
            key = parse_public_key(member.public_key).hex()
        except ValueError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, f"group member {rank}: {exc}") from None
        if rank == own_rank:
            if key != self.own_key:
                raise HandlerError(ErrorCode.BAD_ARGS, f"member {rank} is this node's rank but not its key")
        else:
            entry = self.keys.by_public_key(key)
            if entry is None or entry.role != Role.PEER:
                raise HandlerError(ErrorCode.FORBIDDEN, f"group member {rank}'s key is not authorized as a peer "
                                                        f"on this node")
        return GroupMember(key, member.endpoint)

    def _follow(self, loaded: LoadedSpan, loop: asyncio.AbstractEventLoop) -> None:
        """A follower's thread: run the leader's commands on this member's slice."""

        def on_loop(fn, *args):
            return asyncio.run_coroutine_threadsafe(_call(fn, *args), loop).result(timeout=10)

        async def _call(fn, *args):
            return fn(*args)

        def run_pass(spec: PassSpec, inputs: torch.Tensor) -> list[torch.Tensor]:
            sessions = [self.sessions.get(sid) for sid in spec.sessions]
            missing = [sid for sid, x in zip(spec.sessions, sessions) if x is None]
            if missing:
                raise GroupError(f"member {loaded.group.rank} has no session {missing[0]}")
            started = time.perf_counter()
            outputs = run_step(loaded.span, spec, inputs, [x.cache for x in sessions])
            for session in sessions:
                session.touch()
            self._account(loaded, spec.mode, len(sessions), inputs.shape[1] * len(sessions), (time.perf_counter() - started) * 1000)
            return outputs

        try:
            loaded.group.follow(loaded.follow_stop, run_pass,
                                lambda sid, positions, ttl_s: on_loop(self._open_detached, loaded, sid, positions, ttl_s),
                                lambda sids: on_loop(self._close_detached, sids))
        except BaseException:
            log.exception("member %d of group %s stopped following its leader", loaded.group.rank, loaded.group.group)
            raise
        log.info("member %d of group %s left", loaded.group.rank, loaded.group.group)

    def _open_detached(self, loaded: LoadedSpan, session_id: str, positions: int, ttl_s: float) -> str | None:
        """A follower's share of a session its leader opened: the cache of its heads, reserved here."""
        span = loaded.span
        if self.sessions.get(session_id) is not None:
            return f"session {session_id} is already open on member {loaded.group.rank}"
        reserve = span.kv_cache_bytes(positions)
        session = Session(session_id, loaded.model, span.new_cache(), DETACHED, None, M.SamplingParams(), "none",
                          ttl_s=ttl_s, positions=positions, reserved_bytes=reserve)
        try:
            self.sessions.add(session)
        except NoRoom as exc:
            return f"member {loaded.group.rank} of group {loaded.group.group}: {exc}"
        self.prefix.shrink()  # the cache lives in what sessions leave unreserved
        return None

    def _close_detached(self, session_ids: list[str]) -> None:
        for sid in session_ids:
            self.sessions.pop(sid)

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
            self._release_followers(session)
        session.stream.fail(code, message)

    def _release_followers(self, session: Session) -> None:
        """A leader's session ended: free its caches on the other members too (in order with the passes)."""
        loaded = self.spans.get(session.model)
        if loaded is not None and loaded.group is not None and loaded.group.leader and session.stream is not DETACHED:
            self.compute.submit(loaded.group.close, [session.id])

    # --- operations -----------------------------------------------------------------------------

    async def _open(self, call: Call):
        a: M.OpenArgs = call.args
        if not SESSION_ID.match(a.session):
            raise HandlerError(ErrorCode.BAD_ARGS, "session ids are 8-64 characters of [A-Za-z0-9_-]")
        if a.logits not in ("none", "last", "all"):
            raise HandlerError(ErrorCode.BAD_ARGS, "logits must be none, last or all")
        entry = self.keys.by_public_key(call.caller.public_key)
        if entry is not None and entry.role != Role.PEER and not entry.may_use(a.model):
            raise HandlerError(ErrorCode.FORBIDDEN, f"this node's owner has not allowed your key to run {a.model!r} "
                                                    f"here (allowed: {', '.join(entry.models) or 'none'})")
        loaded = self.spans.get(a.model)
        if loaded is None:
            raise HandlerError(ErrorCode.NOT_FOUND, f"this node does not serve {a.model!r}; deploy it first")
        self._check_group_leader(loaded)
        span = loaded.span
        if (a.start, a.end) != (span.start, span.end):
            raise HandlerError(ErrorCode.CONFLICT, f"this node serves layers [{span.start}, {span.end}) of "
                                                         f"{a.model}, not [{a.start}, {a.end}); the layout changed: "
                                                         f"re-plan")
        if self.sessions.get(a.session) is not None:
            raise HandlerError(ErrorCode.CONFLICT, f"session {a.session} is already open here")
        if a.private:
            private.check_private_open(span, a)
        private.check_next_hop(span, a)
        _check_feed_back(span, a)
        if a.next_address:
            self._check_next_hop(a.next_address, a.next_public_key)
        positions = a.prompt_tokens + a.max_new_tokens
        context = getattr(span.config, "max_position_embeddings", None)
        if context and positions > context:
            raise HandlerError(ErrorCode.TOO_LARGE, f"{a.prompt_tokens} prompt + {a.max_new_tokens} new tokens "
                                                    f"exceed the model's context of {context} tokens")
        try:
            hops = HopCodec(a.activations, a.activation_block)
            if a.next_address or loaded.group is not None:  # what travels: hidden states, partial sums
                hops.check_width(span.config.hidden_size)
        except CodecError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        reserve = span.kv_cache_bytes(positions)
        # Keyed by the caller: a client never hits (or times) another client's prompts.
        # Not behind lossy hops either: blocks computed from fp16/int8 hidden states must never serve a
        # session that asked for exact ones (nor the other way round). Nor for a private session: its
        # client runs the first layers with a cache of its own, which a hit here would not fill.
        prefix = self.prefix.open_session(span, a.model, call.caller.public_key, a.prefix, a.prompt_tokens,
                                          usable=loaded.group is None and hops.encoding == "fp32" and not a.private)
        try:
            history = opened_history(a.sampling, not a.next_address and not a.private, call.tensors, a.prompt_tokens,
                                     a.replayed, span.vocab_size)
        except ValueError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        next_hop = NextHop(a.next_address, a.next_public_key) if a.next_address else None
        session = Session(a.session, a.model, span.new_cache(), call.responder, next_hop, a.sampling, a.logits,
                          a.ttl_s, positions=positions, reserved_bytes=reserve, batching=a.batching, hops=hops,
                          prefix=prefix, owner=call.caller.public_key, private=a.private, history=history,
                          feed_back_until=a.feed_back_until, stop_ids=frozenset(a.stop_ids))
        try:
            self.sessions.add(session)
        except NoRoom as exc:
            raise HandlerError(ErrorCode.NO_MEMORY, f"layers [{span.start}, {span.end}): {exc}; try another "
                                                    f"replica, a shorter request, or later") from None
        self.prefix.shrink()  # the cache lives in what sessions leave unreserved
        if loaded.group is not None:
            await self._open_on_followers(loaded, session)
        call.responder.send(M.Opened(opened=True, start=span.start, end=span.end, reserved_bytes=reserve,
                                     cached_tokens=prefix.cached_tokens if prefix else 0,
                                     dtype=str(span.dtype).removeprefix("torch.")))
        return DEFERRED

    def _check_group_leader(self, loaded: LoadedSpan) -> None:
        group = loaded.group
        if group is None:
            return
        if not group.leader:
            raise HandlerError(ErrorCode.CONFLICT, f"this node is member {group.rank} of tensor-parallel group "
                                                   f"{group.group}; sessions open at its member 0")
        if not loaded.ready:
            raise HandlerError(ErrorCode.UNAVAILABLE, f"tensor-parallel group {group.group} is not linked yet "
                                                      f"(group.connect)")
        if group.broken:
            raise HandlerError(ErrorCode.UNAVAILABLE, f"{group.broken}; redeploy the group")

    async def _open_on_followers(self, loaded: LoadedSpan, session: Session) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.compute, loaded.group.open, session.id,
                                                             session.positions, session.ttl_s)
        except GroupError as exc:
            self.sessions.pop(session.id)
            code = ErrorCode.UNAVAILABLE if exc.member is not None else ErrorCode.NO_MEMORY
            raise HandlerError(code, str(exc)) from None

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

    def _callers_session(self, call: Call) -> Session:
        session = self.sessions.get(call.args.session)
        if session is None or session.stream is DETACHED or not session.reachable_by(call.caller):
            raise HandlerError(ErrorCode.NOT_FOUND, f"no session {call.args.session} here")
        return session

    def _keepalive(self, call: Call) -> M.KeptAlive:
        session = self._callers_session(call)
        session.touch()
        return M.KeptAlive(steps=session.steps)

    def _close(self, call: Call) -> M.Closed:
        session = self._callers_session(call)
        self.sessions.pop(session.id)
        self._release_followers(session)
        session.stream.send({"closed": True}, more=False)
        return M.Closed(closed=True, steps=session.steps)

    def _forward(self, call: Call) -> M.Queued:
        """Queue each carried step; a bad step ends its own session (and is reported on that
        session's stream), never the others in the same message."""
        items: list[M.StepItem] = call.args.items
        try:
            counts = [parts_of(item.encoding) for item in items]
        except CodecError as exc:
            raise HandlerError(ErrorCode.BAD_ARGS, str(exc)) from None
        if not items or len(call.tensors) != sum(counts):
            raise HandlerError(ErrorCode.BAD_ARGS, f"session.forward carries each step's tensors (1, or 2 for int8): "
                                                   f"{len(items)} steps need {sum(counts)}, got {len(call.tensors)}")
        failures, offset = [], 0
        for item, count in zip(items, counts):
            parts, offset = call.tensors[offset:offset + count], offset + count
            session = self.sessions.get(item.session)
            # A follower's share runs only as its leader says; another client's session is not there for it.
            if session is None or session.stream is DETACHED or not session.reachable_by(call.caller):
                failures.append(f"no session {item.session} here (closed or expired)")
                continue
            span = self.spans[session.model].span
            try:
                # Shapes are checked before anything is dequantized: int8 grows 4x on the way to float32.
                if session.private:
                    private.refuse_token_ids(parts)
                width = None if span.embed else span.config.hidden_size
                inputs = decode(item.encoding, parts, span.dtype, width=width, max_tokens=M.MAX_STEP_TOKENS)
                if session.prefix is not None and not session.prefix.begun:  # starts from cached blocks
                    session.queued_position = self.prefix.begin(session.prefix, session.cache, item.start)
                self.scheduler.add(admit(span, session, item, inputs))
            except (CodecError, HandlerError) as exc:
                code, message = (exc.code, exc.message) if isinstance(exc, HandlerError) else (ErrorCode.BAD_ARGS,
                                                                                               str(exc))
                self._end(session, code, message)
                failures.append(message)
            except (ValueError, RuntimeError, KeyError) as exc:  # a cache that cannot take the step: this session only
                log.exception("session %s: its step could not be queued", session.id)
                self._end(session, ErrorCode.INTERNAL, f"this stage could not take the step: {exc}")
                failures.append(str(exc))
        if failures:
            raise HandlerError(ErrorCode.BAD_ARGS if len(failures) == len(items) else ErrorCode.CONFLICT,
                               "; ".join(failures[:4]))
        return M.Queued(len(items))

    # --- passes ---------------------------------------------------------------------------------

    async def _run_passes(self) -> None:
        while True:
            await self.scheduler.ready.wait()
            batch = self.scheduler.take(self._live, self._packable)
            if not batch:
                continue
            try:
                await self._run_pass(batch)
            except Exception:  # a bug in one pass must not stop the node serving every other session
                log.exception("a pass of %d step(s) failed", len(batch))
                for pending in batch:
                    self._end(pending.session, ErrorCode.INTERNAL, "this stage failed internally; see its log")

    def _packable(self, session: Session) -> bool:
        loaded = self.spans.get(session.model)
        return loaded is not None and loaded.group is None and loaded.span.packable

    async def _run_pass(self, batch: list[PendingStep]) -> None:
        loaded = self.spans.get(batch[0].session.model)
        if loaded is None:  # undeployed while queued: unload already ended the sessions
            return
        try:
            if self._runs_inline(loaded, batch):
                outputs, compute_ms = self._compute(loaded, batch)
                await asyncio.sleep(0)  # let what the pass's caller queued (pushes, replies, I/O) go out first
            else:
                outputs, compute_ms = await asyncio.get_running_loop().run_in_executor(
                    self.compute, self._compute, loaded, batch)
        except GroupError as exc:  # a member failed or vanished: the group's caches are out of step
            for pending in batch:
                self._end(pending.session, ErrorCode.UNAVAILABLE,
                          f"layers [{loaded.span.start}, {loaded.span.end}), group {loaded.group.group}: {exc}")
            return
        except (ValueError, RuntimeError, IndexError) as exc:  # the batch's caches are unusable
            for pending in batch:
                self._end(pending.session, ErrorCode.BAD_ARGS,
                          f"layers [{loaded.span.start}, {loaded.span.end}) failed: {exc}")
            return
        mode = "one" if len(batch) == 1 else "batch" if all(p.tokens == 1 for p in batch) else "packed"
        self._account(loaded, mode, len(batch), sum(p.tokens for p in batch), compute_ms)
        self._deliver(batch, outputs, compute_ms)

    @staticmethod
    def _runs_inline(loaded: LoadedSpan, batch: list[PendingStep]) -> bool:
        """Decode passes on the CPU run on the event loop itself. Handing a pass to the compute thread
        and its result back costs two thread wake-ups, ~0.2 ms per stage per token here (measured with
        timestamps at each step, see docs/inference.md), while a decode pass blocks the loop no longer
        than the compute it waits for anyway. Passes are serialized (``_run_passes`` awaits each), so
        an inline pass never races one on the thread. Prefill chunks (long: they would hold up every
        message), tensor-parallel passes (their group sockets belong to the compute thread) and CUDA
        (the loop would wait on the device) stay on the thread."""
        return (loaded.group is None and loaded.span.device.type == "cpu"
                and all(p.tokens == 1 for p in batch))

    @staticmethod
    def _compute(loaded: LoadedSpan, batch: list[PendingStep]) -> tuple[list, float]:
        """One pass (on the compute thread, or inline on the loop: ``_runs_inline``): one step alone, a
        batch of decode steps, or packed prefill chunks; a tensor-parallel leader runs it on every member."""
        started = time.perf_counter()
        spec = pass_spec(batch, loaded.span.head)
        if spec.mode == "packed":
            inputs = [p.inputs for p in batch]
        else:
            inputs = batch[0].inputs if len(batch) == 1 else torch.cat([p.inputs for p in batch], dim=0)
        caches = [p.session.cache for p in batch]
        if loaded.group is None:
            outputs = run_step(loaded.span, spec, inputs, caches)
        else:
            outputs = loaded.group.lead(spec, inputs, lambda: run_step(loaded.span, spec, inputs, caches))
        first = outputs[0]
        if isinstance(first, torch.Tensor) and first.device.type == "cuda":
            torch.cuda.synchronize(first.device)
        return outputs, (time.perf_counter() - started) * 1000

    def _account(self, loaded: LoadedSpan, mode: str, batch: int, tokens: int, compute_ms: float) -> None:
        self.metrics.pass_done(loaded.model, compute_ms / 1000, batch, tokens)
        loaded.busy_s += compute_ms / 1000
        loaded.passes += 1
        loaded.tokens += tokens
        if mode == "batch" or tokens == 1:
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

    def _reply(self, session: Session, item: M.StepItem, out: torch.Tensor | int, trace: dict) -> None:
        """``out`` is the logits, or a token a tensor-parallel group already chose (greedy, no logits asked);
        for a private session, the last stage's hidden states (the client samples)."""
        if item.final:
            self.metrics.token_generated(session.model)
        if session.private:
            private.send_hidden(session.stream, item, out, session.logits, trace)
            return
        logits = [] if session.logits == "none" or isinstance(out, int) else [out[0].cpu()]
        if not item.final:
            if session.logits == "all":  # the client collects every chunk's logits
                session.stream.send({"step": item.step, "chunk": True, **trace}, logits)
            return
        try:
            token = out if isinstance(out, int) else sample_next(out[0, -1], session.sampling, item.step,
                                                                 session.history)
        except (ValueError, RuntimeError) as exc:
            self._end(session, ErrorCode.BAD_ARGS, f"sampling failed: {exc}")
            return
        session.stream.send({"step": item.step, "token": token, **trace}, logits)
        if (item.step + 1 < session.feed_back_until and token not in session.stop_ids
                and session.queued_position < session.positions):  # never past what it reserved
            self._feed_back(session, item.step + 1, token)

    def _feed_back(self, session: Session, step: int, token: int) -> None:
        """Queue ``token`` as the session's next step, as if its client had sent it (``feed_back_until``)."""
        span = self.spans[session.model].span
        item = M.StepItem(session=session.id, step=step, start=session.queued_position)
        try:
            self.scheduler.add(admit(span, session, item, torch.tensor([[token]], dtype=torch.int64)))
        except HandlerError as exc:  # admit's checks hold by construction: a bug, reported to the client
            self._end(session, exc.code, exc.message)


def _check_feed_back(span: LayerSpan, a: M.OpenArgs) -> None:
    """A session may be fed back only where the stage both embeds and samples: the whole model, no next
    hop, not private (there the client samples)."""
    if a.stop_ids and not a.feed_back_until:
        raise HandlerError(ErrorCode.BAD_ARGS, "stop_ids apply to a session opened with feed_back_until")
    if not a.feed_back_until:
        return
    if not (span.embed and span.head) or a.next_address or a.private:
        raise HandlerError(ErrorCode.BAD_ARGS, "feed_back_until needs a stage that holds the whole model (embeddings "
                                               "and head, no next hop) and samples (not private)")
    if any(not 0 <= t < span.vocab_size for t in a.stop_ids):
        raise HandlerError(ErrorCode.BAD_ARGS, f"stop_ids must be token ids in [0, {span.vocab_size})")


def pass_spec(batch: list[PendingStep], head: bool) -> PassSpec:
    """What a pass runs, as every member of a tensor-parallel group must run it. At the head, each row
    says whether the session needs only its greedy token (the group then never gathers whole logits)."""
    # A group's partial sums travel compressed only when every session of the pass asked for the same.
    hops = {p.session.hops for p in batch}
    hops = hops.pop() if len(hops) == 1 else HopCodec()
    wants = None
    if head:
        wants = ["token" if p.session.logits == "none" and p.session.sampling.temperature == 0
                 and not penalized(p.session.sampling) else "logits"
                 for p in batch]
    if len(batch) == 1:
        pending = batch[0]
        return PassSpec("one", [pending.session.id], start=pending.item.start,
                        keep=0 if pending.session.logits == "all" else 1, wants=wants, hops=hops)
    if any(p.tokens > 1 for p in batch):  # prefill chunks of several sessions (never a tensor-parallel group's)
        return PassSpec("packed", [p.session.id for p in batch], wants=wants,
                        keeps=[0 if p.session.logits == "all" else 1 for p in batch])
    return PassSpec("batch", [p.session.id for p in batch], wants=wants, hops=hops)


def run_step(span: LayerSpan, spec: PassSpec, inputs: torch.Tensor | list[torch.Tensor],
             caches: list) -> list[torch.Tensor]:
    """One pass through ``span``: a lone step (positions from ``spec.start``), a batch of decode steps
    (``inputs`` one row per session), or packed prefill chunks (``inputs`` one tensor per session)."""
    if spec.mode == "one":
        # Positions stay on the CPU: the span checks them against the cache without a device sync.
        positions = torch.arange(spec.start, spec.start + inputs.shape[1]).unsqueeze(0)
        return [span(inputs, positions, caches[0], spec.keep)]
    if spec.mode == "packed":
        return span.forward_packed(inputs, caches, spec.keeps)
    if spec.mode != "batch" or len(caches) != inputs.shape[0]:
        raise ValueError(f"a {spec.mode!r} pass of {inputs.shape[0]} rows for {len(caches)} sessions")
    return list(span.forward_batch(inputs, caches).split(1, dim=0))
