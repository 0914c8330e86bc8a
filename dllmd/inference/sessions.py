"""Per-session state at one stage: its KV cache, where its hidden states go next, and the stream
back to the client. Sessions expire after a TTL without use, and the table refuses new work
beyond its memory budget, so abandoned sessions can never pin a node's memory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dllmd.inference.sampling import SamplingParams
from dllmd.models.span import SpanCache
from dllmd.net.server import Responder


@dataclass
class NextHop:
    address: str
    public_key: str


@dataclass
class Session:
    id: str
    model: str
    cache: SpanCache
    stream: Responder  # replies to the client's session.open: tokens (last stage) and errors
    next_hop: NextHop | None
    sampling: SamplingParams
    logits: str  # "none" | "last" | "all": which logits the last stage returns with each token
    ttl_s: float
    batching: bool = True  # False: every step runs alone, never in a batch with other sessions
    last_used: float = field(default_factory=time.monotonic)
    steps: int = 0
    queued_position: int = 0  # the position the next arriving step must start at (steps may be queued)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def expired(self, now: float) -> bool:
        return now - self.last_used > self.ttl_s


class SessionTable:
    def __init__(self, memory_budget_bytes: int, max_sessions: int = 1024):
        self.memory_budget_bytes = memory_budget_bytes
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session

    def pop(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def cache_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self._sessions.values())

    def has_room(self) -> bool:
        return len(self._sessions) < self.max_sessions and self.cache_bytes() < self.memory_budget_bytes

    def expired(self) -> list[Session]:
        now = time.monotonic()
        return [s for s in self._sessions.values() if s.expired(now)]

    def for_model(self, model: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.model == model]
