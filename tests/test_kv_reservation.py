"""A stage reserves a session's KV cache when the session opens: a session that cannot fit the node's
budget is refused up front with the numbers and an error code the client fails over on, instead of
being ended mid-generation; a session never holds more than it reserved."""

from __future__ import annotations

import asyncio

import pytest

from dllmd.models.store import ModelStore
from dllmd.net.client import RemoteError
from dllmd.net.identity import Identity
from dllmd.net.keys import Role
from dllmd.net.messages.inference import SESSION_OPEN, OpenArgs, SamplingParams
from dllmd.net.pool import ConnectionPool
from dllmd.net.schema import to_wire
from dllmd.net.wire import ErrorCode
from dllmctl.cluster.live import query_nodes
from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.stages import live_stages
from dllmctl.models.deploy import deploy
from dllmctl.models.importer import import_model
from dllmctl.placement.layout import Span
from tests.tiny_models import make_tiny_model

# The tiny llama: 5 layers, 2 KV heads of 16 dimensions, fp32: 2 x 2 x 16 x 4 = 256 bytes per position
# and layer, so 1280 bytes per position for the whole model.
PER_POSITION = 1280
BUDGET = 300 * PER_POSITION


@pytest.fixture
def small_node(daemon_factory, tmp_path):
    user = Identity.generate()
    daemon = daemon_factory("small", keys={user.public_key: Role.ADMIN}, config={"memory_budget_bytes": BUDGET})
    store = ModelStore(tmp_path / "models")
    import_model(make_tiny_model("llama", tmp_path / "src"), store, user, name="tiny")
    entry = NodeEntry("small", daemon.address, daemon.public_key)
    asyncio.run(deploy(user, {"small": entry}, store.path("tiny"), [Span("small", 0, 5, True, True)]))
    return user, entry


def _open(session: str, prompt_tokens: int, max_new_tokens: int) -> dict:
    return to_wire(OpenArgs(session=session, model="tiny", start=0, end=5, prompt_tokens=prompt_tokens,
                            max_new_tokens=max_new_tokens, sampling=SamplingParams()))


def test_a_session_that_does_not_fit_is_refused_when_it_opens(small_node):
    user, entry = small_node

    async def scenario():
        async with ConnectionPool(user) as pool:
            client = pool.get(entry.address, entry.public_key)
            first = await client.open_stream(SESSION_OPEN.name, _open("first-session", 100, 100))
            opened = await first.next(timeout=10)
            assert opened.result["reserved_bytes"] == 200 * PER_POSITION
            second = await client.open_stream(SESSION_OPEN.name, _open("second-session", 100, 100))
            with pytest.raises(RemoteError) as refused:
                await second.next(timeout=10)
            assert refused.value.code == ErrorCode.NO_MEMORY
            assert "MiB" in refused.value.message and "budget" in refused.value.message
            # A smaller one still fits beside the first.
            third = await client.open_stream(SESSION_OPEN.name, _open("third-session", 50, 50))
            assert (await third.next(timeout=10)).result["reserved_bytes"] == 100 * PER_POSITION

    asyncio.run(scenario())


def test_generation_holds_no_more_than_it_reserved(small_node):
    user, entry = small_node
    prompt, new_tokens = [5, 6, 7, 8, 9, 10, 11, 12], 200

    async def scenario():
        async with ConnectionPool(user) as pool:
            generating = asyncio.ensure_future(generate_with_failover(
                pool, lambda: live_stages(user, [entry], "tiny"), "tiny", 5, prompt, new_tokens, set(),
                SamplingParams()))
            samples = []
            while not generating.done():
                samples += (await query_nodes(user, [entry]))[0]["serving"]
                await asyncio.sleep(0.005)
            result = await generating
            return result, samples, (await query_nodes(user, [entry]))[0]

    result, samples, after = asyncio.run(scenario())
    assert len(result.token_ids) == new_tokens and not result.failovers
    during = [s for s in samples if s["sessions"] == 1]
    assert during, "the session was never seen open"
    assert all(s["kv_reserved_bytes"] == (len(prompt) + new_tokens) * PER_POSITION for s in during)
    assert all(s["kv_bytes"] <= s["kv_reserved_bytes"] for s in during)
    assert after["kv_budget_bytes"] == BUDGET
    span = after["serving"][0]
    assert span["sessions"] == 0 and span["kv_reserved_bytes"] == 0 and span["kv_bytes"] == 0
