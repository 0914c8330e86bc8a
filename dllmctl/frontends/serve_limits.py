"""What ``dllmctl serve`` lets one caller do: the limits (body, tokens, messages, time), the rate per
key or address (a token bucket), and which ``Host`` names it answers to.

Pure, without Starlette: the CLI parses ``--rate-limit`` before the ``api`` extra is imported, and
the tests check the bucket without a server.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*$")
MAX_TRACKED = 10_000  # buckets kept at most: an address flood cannot grow the table without bound


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on one request and one caller. The defaults suit a chat UI or an agent; a busier
    client raises them with ``dllmctl serve --rate-limit`` and friends."""

    max_body_bytes: int = 1024 * 1024  # a request body; longer prompts than this are not a chat
    max_tokens: int = 4096  # generated tokens per request (also when max_tokens is left out)
    max_messages: int = 512  # messages in one chat request
    max_seconds: float = 600.0  # one completion, streamed or not, from request to last token
    rate: float = 10.0  # requests per second per caller, on average
    burst: int = 20  # requests a caller may make at once after being idle


def parse_rate(text: str) -> float:
    """``"10/s"`` or ``"600/min"`` as requests per second."""
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"a rate is a positive number per second or minute, such as 10/s or 600/min; got {text!r}")
    per_second = float(match.group(1))
    return per_second / 60 if match.group(2).startswith("m") else per_second


class RateLimiter:
    """One token bucket per caller: ``burst`` tokens, refilled at ``rate`` per second; a request
    takes one. ``take`` answers how many seconds to wait (0.0: go ahead)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when counted)

    def take(self, caller: str) -> float:
        now = self.clock()
        tokens, then = self._buckets.get(caller, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED:
            self._forget_idle(now)
        return 0.0

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing for their callers."""
        full = [c for c, (t, then) in self._buckets.items() if t + (now - then) * self.rate >= self.burst]
        for caller in full:
            del self._buckets[caller]
        while len(self._buckets) > MAX_TRACKED:  # all busy (a flood of addresses): oldest first
            del self._buckets[min(self._buckets, key=lambda c: self._buckets[c][1])]


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def allowed_hosts(bound: str, extra: list[str]) -> frozenset[str]:
    """The names this server answers to: loopback, the address it is bound to, ``--allowed-host``."""
    names = set(LOOPBACK_NAMES) | {_normal(name) for name in extra}
    if bound not in ("0.0.0.0", "::", ""):
        names.add(_normal(bound))
    return frozenset(names)


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's ``Host`` is one of ``allowed``. An IP literal always is: DNS rebinding
    needs a name the attacker controls (the browser sends that name), so an address is not one."""
    if not header:
        return False
    name = _host_name(header)
    if name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """``HOST[:PORT]`` or ``[V6][:PORT]`` without the port."""
    header = header.strip()
    if header.startswith("["):
        return _normal(header[1:header.find("]")] if "]" in header else header)
    return _normal(header.rsplit(":", 1)[0] if header.count(":") == 1 else header)


def _normal(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()
