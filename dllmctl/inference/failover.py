"""Generation that survives nodes dying: ban the failed node, rebuild the session on a replica,
replay the tokens so far, go on.

A dead stage is noticed within a bounded time: its connection drops (the socket reports the
disconnect at once on a crash, ZeroMQ heartbeats catch a hung or unplugged machine within a few
seconds) and every step has a deadline. The replacement session gets the prompt plus the tokens
generated so far as one prefill, and continues at the same step number; sampling is seeded per
step, so the output is the one a fault-free run gives. The failed session is closed on the stages
that survived, freeing their KV caches at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from dllmd.alerts import Alert
from dllmd.net.messages.inference import SamplingParams
from dllmctl.alerts import record
from dllmctl.inference.private import PrivateEnds
from dllmctl.inference.session import DistributedSession, Generation, StageFailure
from dllmd.net.codec import HopCodec
from dllmd.net.pool import ConnectionPool
from dllmctl.placement.routing import RouteError, Stage, choose_route

log = logging.getLogger("dllmctl.failover")

BAN_BASE_S = 5.0  # first ban; doubles with each further failure of the same node
BAN_MAX_S = 300.0
MAX_FAILOVERS = 8


@dataclass
class Bans:
    """Nodes to avoid for a while, with exponential backoff per node. ``clock`` is injectable for tests."""

    clock: Callable[[], float] = time.monotonic
    base_s: float = BAN_BASE_S
    max_s: float = BAN_MAX_S
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, node: str) -> float:
        """Ban ``node``; returns for how many seconds."""
        strikes = self._strikes[node] = self._strikes.get(node, 0) + 1
        seconds = min(self.base_s * 2 ** (strikes - 1), self.max_s)
        self._until[node] = self.clock() + seconds
        return seconds

    def active(self) -> set[str]:
        now = self.clock()
        return {node for node, until in self._until.items() if until > now}

    def forgive(self, node: str) -> None:
        """A node that served a whole session well starts from a clean slate."""
        self._strikes.pop(node, None)
        self._until.pop(node, None)


StageFinder = Callable[[], Awaitable[list[Stage]]]  # the live spans of the model, asked anew after a failure


async def generate_with_failover(pool: ConnectionPool, find_stages: StageFinder, model: str, num_layers: int,
                                 prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
                                 sampling: SamplingParams, *, parallelism: str = "pipeline", logits: str = "none",
                                 on_token: Callable[[int], None] = lambda _: None, bans: Bans | None = None,
                                 assigned: dict[str, int] | None = None, stages: list[Stage] | None = None,
                                 max_failovers: int = MAX_FAILOVERS, result: Generation | None = None,
                                 hops: HopCodec = HopCodec(), prefix: Sequence[bytes] = (),
                                 private: PrivateEnds | None = None, relays: Sequence = (),
                                 stop_when: Callable[[], bool] = lambda: False) -> Generation:
    """Generate ``max_new_tokens`` after ``prompt_ids`` on the best route, failing over to replicas.

    ``assigned`` (node -> sessions this client runs there) is updated while the session runs, so
    concurrent calls spread over replicas; ``stages`` skips the first live query when the caller
    just made it; ``result`` lets the caller watch the routes and tokens while it runs; ``prefix`` names
    the prompt's blocks for the stages' prefix caches (replays use it too). After a failure the route
    is chosen again from what is known, minus the banned
    nodes; the nodes are asked anew only when that is not enough. Raises RouteError when no replica is left for some span.
    ``private``: the client runs the model's ends; the route covers the layers after them, and each new
    session (a replay) rebuilds the client's own cache along with the stages'. ``relays``: every session,
    replays too, goes through these nodes, which are never chosen as stages. ``stop_when`` is asked after
    every token (a stop string in the text). A replay hands the penalties the prompt and the tokens so far,
    so they see what one session would have."""
    first_layer = private.layers if private else 0
    relay_names = {r.name for r in relays}  # a relay is never one of the session's stages
    bans = bans if bans is not None else Bans()
    assigned = assigned if assigned is not None else {}
    result = result or Generation(prompt_tokens=len(prompt_ids))
    started = time.perf_counter()
    failed_at: float | None = None
    candidates = stages if stages is not None else await find_stages()
    while True:
        try:
            route = choose_route(candidates, num_layers, model, banned=bans.active() | relay_names,
                                 assigned=assigned,
                                 parallelism=parallelism, first_layer=first_layer)
        except RouteError:
            # Perhaps a replica came back or the layout changed: ask the nodes (slow when some are
            # down, so only when what we knew is not enough).
            candidates = await find_stages()
            route = choose_route(candidates, num_layers, model, banned=bans.active() | relay_names,
                                 assigned=assigned,
                                 parallelism=parallelism, first_layer=first_layer)
        for stage in route:
            assigned[stage.node.name] = assigned.get(stage.node.name, 0) + 1
        try:
            done = len(result.token_ids)  # a replay prefills the prompt and these, then generates the rest
            async with DistributedSession(pool, route, model, sampling, prompt_tokens=len(prompt_ids) + done,
                                          max_new_tokens=max_new_tokens - done, logits=logits,
                                          parallelism=parallelism, hops=hops, prefix=prefix,
                                          private=private, relays=relays,
                                          history=list(prompt_ids) + result.token_ids, replayed=done,
                                          feed_back=True, stop_ids=sorted(stop_ids)) as session:
                tokens_before = len(result.token_ids)

                def token_arrived(token: int) -> None:
                    nonlocal failed_at
                    if not result.time_to_first_token_s:
                        result.time_to_first_token_s = time.perf_counter() - started
                    if failed_at is not None:  # the first token after a failover ends the stall
                        result.failovers[-1]["stall_s"] = time.perf_counter() - failed_at
                        failed_at = None
                    on_token(token)

                await session.generate(prompt_ids, max_new_tokens, stop_ids, token_arrived, result, stop_when)
                if len(result.token_ids) > tokens_before:
                    for stage in route:
                        bans.forgive(stage.node.name)
                return result
        except StageFailure as failure:
            if failed_at is None:
                failed_at = time.perf_counter()
            result.failovers.append({"step": len(result.token_ids), "suspects": failure.suspects,
                                     "error": str(failure), "stall_s": None})
            if len(result.failovers) > max_failovers:
                raise RouteError(f"gave up after {max_failovers} failovers; last: {failure}") from failure
            suspects = await _confirm_suspects(pool, route, failure.suspects)
            for name in suspects:
                seconds = bans.ban(name)
                log.warning("stage %s failed (%s); banned for %.0fs, rebuilding the session on a replica",
                            name, failure, seconds)
                node = next(s.node for s in route if s.node.name == name)
                pool.drop(node.address, node.public_key)
                record(Alert.of("node_lost", model, f"stage {name} failed during a generation ({failure}); "
                                                    f"banned for {seconds:.0f} s, going on on a replica",
                                node=name, step=len(result.token_ids)))
        finally:
            for stage in route:
                assigned[stage.node.name] -= 1


async def _confirm_suspects(pool: ConnectionPool, route: list[Stage], suspects: list[str]) -> list[str]:
    """When a failure could be any stage's (a step timed out), ban only the ones that do not answer
    a ping now; if all answer, blame them all (a slow or wedged node looks alive to a ping)."""
    if len(suspects) <= 1:
        return suspects
    by_name = {s.node.name: s.node for s in route}

    async def alive(name: str) -> bool:
        try:
            await pool.get(by_name[name].address, by_name[name].public_key).call("ping", timeout=2.0)
            return True
        except Exception:
            return False

    answers = await asyncio.gather(*(alive(name) for name in suspects))
    dead = [name for name, ok in zip(suspects, answers) if not ok]
    return dead or suspects
