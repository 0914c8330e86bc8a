"""Per-session state at one stage: its KV cache, where its hidden states go next, the stream back
to the client, and the cache memory reserved for it.

Memory is reserved when a session opens, never discovered mid-generation: the client says how many
positions the session will hold at most (prompt + new tokens), the stage reserves that many
positions times its layers' KV bytes, and an open that does not fit the budget (nor, with the
weights, the owner's cap: :mod:`.memory`) is refused with the numbers. Sessions expire after a TTL
without use, so abandoned ones can never pin a node's memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from dllmd.inference.memory import MemoryCap, NoRoom
from dllmd.inference.prefix_cache import SessionPrefix
from dllmd.inference.sampling import TokenHistory
from dllmd.models.cache import SpanCache
from dllmd.net.codec import HopCodec
from dllmd.net.keys import Role
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.server import Responder


class _Detached:
    """The stream of a tensor-parallel follower's share of a session: the group's leader speaks to the
    client for the whole group, so what a follower would say goes nowhere."""

    def send(self, *_args, **_kwargs) -> None:
        pass

    def fail(self, *_args, **_kwargs) -> None:
        pass


DETACHED = _Detached()


@dataclass
class NextHop:
    address: str
    public_key: str


@dataclass
class Session:
    id: str
    model: str
    cache: SpanCache
    stream: Responder | _Detached  # replies to the client's session.open: tokens (last stage) and errors
    next_hop: NextHop | None
    sampling: SamplingParams
    logits: str  # "none" | "last" | "all": which logits the last stage returns with each token
    ttl_s: float
    positions: int  # the most positions this session may hold (prompt + new tokens), as reserved
    reserved_bytes: int  # KV-cache memory set aside for those positions at this stage
    batching: bool = True  # False: every step runs alone, never in a batch with other sessions
    hops: HopCodec = HopCodec()  # how this stage sends the session's hidden states on
    last_used: float = field(default_factory=time.monotonic)
    steps: int = 0
    queued_position: int = 0  # the position the next arriving step must start at (steps may be queued)
    prefix: SessionPrefix | None = None  # its use of the stage's prefix cache (None: not cached)
    owner: str = ""  # the key that opened it: only it (or a peer stage feeding it) may step or close it
    private: bool = False  # hidden states in and out only (dllmd/inference/private.py)
    history: TokenHistory | None = None  # what the penalties look at (the stage that samples, penalties only)
    feed_back_until: int = 0  # the stage feeds each sampled token back as the next step, up to this step
    stop_ids: frozenset[int] = frozenset()  # ... and not after one of these

    def reachable_by(self, caller) -> bool:
        """Whether ``caller`` may step or close this session: its opener, or one of this node's peers (the
        previous stage pushes its hidden states). Another client's session is not even visible."""
        return caller.public_key == self.owner or caller.role == Role.PEER

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def expired(self, now: float) -> bool:
        return now - self.last_used > self.ttl_s


class SessionTable:
    """The sessions at this stage. ``weights_bytes`` says what the node's weights hold, which counts
    with the reservations against the owner's ``cap``."""

    def __init__(self, memory_budget_bytes: int, max_sessions: int = 1024, cap: MemoryCap = MemoryCap(),
                 weights_bytes: Callable[[], int] = lambda: 0):
        self.memory_budget_bytes = memory_budget_bytes
        self.max_sessions = max_sessions
        self.cap = cap
        self.weights_bytes = weights_bytes
        self._sessions: dict[str, Session] = {}
        self._reserved = 0  # kept as a sum: the prefix cache asks from the compute thread

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def reserved_bytes(self) -> int:
        return self._reserved

    def unreserved_bytes(self) -> int:
        return self.memory_budget_bytes - self._reserved

    def cache_bytes(self) -> int:
        """Memory the caches hold now (at most what is reserved)."""
        return sum(s.cache.nbytes for s in self._sessions.values())

    def check_room(self, reserve_bytes: int) -> None:
        """Raise NoRoom saying what is missing, unless one more session reserving ``reserve_bytes`` fits."""
        if len(self._sessions) >= self.max_sessions:
            raise NoRoom(f"this node already holds {len(self._sessions)} sessions, its maximum")
        reserved = self.reserved_bytes()
        if reserved + reserve_bytes > self.memory_budget_bytes:
            raise NoRoom(f"the session's KV cache needs {reserve_bytes / 2**20:.1f} MiB, but only "
                         f"{max(self.memory_budget_bytes - reserved, 0) / 2**20:.1f} MiB of this node's "
                         f"{self.memory_budget_bytes / 2**20:.1f} MiB budget is unreserved")
        self.cap.check("the session's KV cache", reserve_bytes, self.weights_bytes() + reserved)

    def add(self, session: Session) -> None:
        self.check_room(session.reserved_bytes)
        self.pop(session.id)  # callers refuse ids in use; keep the sum right regardless
        self._sessions[session.id] = session
        self._reserved += session.reserved_bytes

    def pop(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._reserved -= session.reserved_bytes
        return session

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def expired(self) -> list[Session]:
        now = time.monotonic()
        return [s for s in self._sessions.values() if s.expired(now)]

    def for_model(self, model: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.model == model]
