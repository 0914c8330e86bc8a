"""Routing, bans and the step scheduler as pure functions: tables of inputs and the choice made."""

from __future__ import annotations

import pytest
import torch

from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.failover import Bans
from dllmctl.placement.layout import Span
from dllmctl.placement.routing import RouteError, Stage, choose_route, route_counts, stage_cost
from dllmd.inference.scheduler import PendingStep, StepScheduler
from dllmd.net.messages.inference import MAX_BATCH, SamplingParams, StepItem
from dllmd.inference.sessions import Session


def stage(name, start, end, n=10, **load) -> Stage:
    node = NodeEntry(name, f"tcp://127.0.0.1:{1000 + sum(map(ord, name))}", "00" * 32)
    return Stage(node, Span(name, start, end, start == 0, end == n), **load)


def names(route) -> list[str]:
    return [s.node.name for s in route]


# Two replicas of a two-stage layout: a1 a2 / b1 b2, layers [0, 5) and [5, 10).
REPLICAS = dict(a1=(0, 5), a2=(5, 10), b1=(0, 5), b2=(5, 10))


def replicas(**loads) -> list[Stage]:
    return [stage(n, *span, **loads.get(n, {})) for n, span in REPLICAS.items()]


@pytest.mark.parametrize("candidates, kwargs, expected", [
    # idle and equal: deterministic by name
    (replicas(), {}, ["a1", "a2"]),
    # a busy replica loses to an idle one
    (replicas(a1={"sessions": 3, "step_ms": 10}, b1={"step_ms": 10}), {}, ["b1", "a2"]),
    # queued steps count as load
    (replicas(a2={"queued": 5, "step_ms": 4}, b2={"step_ms": 4}), {}, ["a1", "b2"]),
    # a far node (latency) loses to a near one
    (replicas(a1={"latency_ms": 40}), {}, ["b1", "a2"]),
    # measured throughput: a fast node beats a slow one at equal load
    (replicas(a1={"step_ms": 30}, b1={"step_ms": 5}), {}, ["b1", "a2"]),
    # unmeasured spans: the node with more GFLOP/s is expected to be faster
    (replicas(a1={"gflops": 20}, b1={"gflops": 200}), {}, ["b1", "a2"]),
    # banned nodes are skipped
    (replicas(), {"banned": {"a1"}}, ["b1", "a2"]),
    (replicas(), {"banned": {"a1", "a2"}}, ["b1", "b2"]),
    # sessions this client just placed spread the next one to the other replica
    (replicas(), {"assigned": {"a1": 1, "a2": 1}}, ["b1", "b2"]),
    # fewer hops win when everything else is equal
    ([stage("whole", 0, 10), stage("x", 0, 5), stage("y", 5, 10)], {}, ["whole"]),
])
def test_route_table(candidates, kwargs, expected):
    assert names(choose_route(candidates, 10, "m", **kwargs)) == expected


def test_sessions_spread_evenly_over_replicas():
    candidates, placed = replicas(), []
    for _ in range(8):
        placed.append(choose_route(candidates, 10, "m", assigned=route_counts(placed)))
    assert route_counts(placed) == {"a1": 4, "a2": 4, "b1": 4, "b2": 4}


@pytest.mark.parametrize("candidates, banned, message", [
    ([stage("a", 0, 5)], (), "no live replica serves layers 5-9 of m"),
    (replicas(), {"a2", "b2"}, r"layers 5-9 of m \(banned after failures: a2, b2\)"),
    ([stage("a", 0, 3), stage("b", 4, 10)], (), "no live replica serves layer 3 of m"),
    ([], (), "layers 0-9 of m"),
])
def test_no_route_names_the_missing_span(candidates, banned, message):
    with pytest.raises(RouteError, match=message):
        choose_route(candidates, 10, "m", banned=banned)


def test_stage_cost_grows_with_load():
    idle, busy = stage("a", 0, 5, step_ms=10), stage("a", 0, 5, step_ms=10, sessions=2)
    assert stage_cost(busy) > stage_cost(idle) and stage_cost(idle, extra_sessions=2) == stage_cost(busy)


def test_bans_back_off_exponentially_and_expire():
    now = [100.0]
    bans = Bans(clock=lambda: now[0], base_s=5, max_s=30)
    assert bans.ban("a") == 5 and bans.active() == {"a"}
    now[0] += 5.1
    assert bans.active() == set()
    assert [bans.ban("a") for _ in range(4)] == [10, 20, 30, 30]
    bans.forgive("a")
    assert bans.active() == set() and bans.ban("a") == 5


# --- the scheduler ------------------------------------------------------------------------------

def session(sid: str, model: str = "m", batching: bool = True) -> Session:
    return Session(sid, model, cache=None, stream=None, next_hop=None, sampling=SamplingParams(), logits="none",
                   ttl_s=60, positions=100, reserved_bytes=0, batching=batching)


def pending(s: Session, tokens: int = 1) -> PendingStep:
    return PendingStep(s, StepItem(session=s.id, step=0, start=0), torch.zeros(1, tokens, dtype=torch.long))


def taken(scheduler: StepScheduler, live=lambda s: True) -> list[tuple[str, int]]:
    return [(p.session.id, p.tokens) for p in scheduler.take(live)]


def test_decode_steps_of_different_sessions_run_as_one_batch():
    a, b, c = session("a"), session("b"), session("c")
    scheduler = StepScheduler()
    for step in (pending(a), pending(b), pending(a), pending(c)):
        scheduler.add(step)
    assert taken(scheduler) == [("a", 1), ("b", 1), ("c", 1)]  # a's second step waits for its first
    assert taken(scheduler) == [("a", 1)]
    assert taken(scheduler) == [] and not scheduler.ready.is_set()


def test_a_prefill_chunk_runs_alone_and_keeps_its_session_in_order():
    a, b = session("a"), session("b")
    scheduler = StepScheduler()
    for step in (pending(a, 128), pending(b), pending(a, 1)):
        scheduler.add(step)
    assert taken(scheduler) == [("a", 128)]
    assert taken(scheduler) == [("b", 1), ("a", 1)]


def test_prefill_chunks_of_different_sessions_share_a_pass_within_the_token_budget():
    from dllmd.inference.scheduler import MAX_PACKED_TOKENS

    a, b, c, d, lone = session("a"), session("b"), session("c"), session("d"), session("lone", batching=False)
    scheduler = StepScheduler()
    for step in (pending(a, 128), pending(b), pending(c, 40), pending(a, 128), pending(lone, 30),
                 pending(d, MAX_PACKED_TOKENS)):
        scheduler.add(step)

    def packed():
        return [(p.session.id, p.tokens) for p in scheduler.take(lambda s: True, packable=lambda s: True)]

    # a's second chunk waits for its first; d's chunk would pass the budget; lone runs alone; b decodes apart.
    assert packed() == [("a", 128), ("c", 40)]
    assert packed() == [("b", 1)]
    assert packed() == [("a", 128)]
    assert packed() == [("lone", 30)]
    assert packed() == [("d", MAX_PACKED_TOKENS)]  # a first step always fits


def test_a_decode_step_queued_behind_a_prefill_of_its_session_waits():
    a, b = session("a"), session("b")
    scheduler = StepScheduler()
    for step in (pending(b), pending(a, 64), pending(a, 1)):
        scheduler.add(step)
    assert taken(scheduler) == [("b", 1)]
    assert taken(scheduler) == [("a", 64)]
    assert taken(scheduler) == [("a", 1)]


def test_unbatched_sessions_models_and_batch_size():
    lone, other_model = session("lone", batching=False), session("x", model="other")
    many = [session(f"s{i}") for i in range(MAX_BATCH + 3)]
    scheduler = StepScheduler()
    scheduler.add(pending(lone))
    for s in many:
        scheduler.add(pending(s))
    scheduler.add(pending(other_model))
    assert taken(scheduler) == [("lone", 1)]
    assert len(taken(scheduler)) == MAX_BATCH
    assert taken(scheduler) == [(s.id, 1) for s in many[MAX_BATCH:]]
    assert taken(scheduler) == [("x", 1)]


def test_steps_of_ended_sessions_are_dropped():
    a, b = session("a"), session("b")
    scheduler = StepScheduler()
    scheduler.add(pending(a))
    scheduler.add(pending(b))
    assert taken(scheduler, live=lambda s: s is not a) == [("b", 1)]
    assert len(scheduler) == 0


def test_a_stage_that_cannot_reach_the_next_blames_the_next():
    """next_hop_unreachable names the stage after the one reporting it, whatever else is going on: it is
    a node failure worth a replica, never a bad request (found failing under CPU load, when a stage's
    push fails before the client sees the same node's connection drop)."""
    import asyncio

    from dllmd.net.client import RemoteError
    from dllmd.net.identity import Identity
    from dllmd.net.pool import ConnectionPool
    from dllmd.net.wire import ErrorCode
    from dllmctl.inference.session import DistributedSession, StageFailure

    async def check():
        key = Identity.generate().public_key
        route = [Stage(NodeEntry(n, f"tcp://127.0.0.1:{9000 + i}", key), Span(n, 2 * i, 2 * i + 2, i == 0, i == 2))
                 for i, n in enumerate("abc")]
        async with ConnectionPool(Identity.generate()) as pool:
            session = DistributedSession(pool, route, "m", SamplingParams(), prompt_tokens=1, max_new_tokens=1)
            failure = session._failure(1, RemoteError(ErrorCode.NEXT_HOP_UNREACHABLE, "lost c"))
            assert isinstance(failure, StageFailure) and failure.suspects == ["c"]
            last = session._failure(2, RemoteError(ErrorCode.NEXT_HOP_UNREACHABLE, "?"))
            assert not isinstance(last, StageFailure)  # the last stage has no next hop: a protocol error
            assert session._failure(0, RemoteError(ErrorCode.BAD_ARGS, "x")).code == ErrorCode.BAD_ARGS

    asyncio.run(check())
