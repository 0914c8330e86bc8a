"""The role table (dllmd/net/roles.py), walked with a key of every role and a stranger: every
operation in it is served, allowed roles reach its handler, the others get ``forbidden`` and change
nothing, a stranger gets no answer, and an operation missing from the table cannot be registered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dllmd.net.client import NodeUnauthorized, RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import Role
from dllmd.net.roles import ROLE_TABLE, UnlistedOperation
from dllmd.net.schema import NoArgs, Op
from dllmd.net.server import Operation


def _state(home: Path) -> dict[str, bytes]:
    """What a forbidden call must not change: every file of the home but the daemon's own log."""
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file() and p.name != "dllmd.log"}


def test_every_operation_answers_exactly_the_roles_the_table_gives(daemon_factory, user):
    keys = {role: Identity.generate() for role in (Role.CLIENT, Role.PEER, Role.FEDERATION, Role.RELAY)}
    keys[Role.ADMIN] = user
    daemon = daemon_factory(keys={k.public_key: r for r, k in keys.items()}, config={"bench_operations": True})
    before = _state(daemon.home)

    async def outcome(client: RpcClient, op: str) -> str:
        try:
            await client.call(op, {}, timeout=30)
            return "ok"
        except RemoteError as exc:
            return exc.code

    async def scenario() -> dict[tuple[str, Role], str]:
        results = {}
        for role, identity in keys.items():
            async with RpcClient(identity, daemon.address, daemon.public_key) as client:
                for op in ROLE_TABLE:  # one at a time: a loaded machine must not miss heartbeats
                    results[op, role] = await outcome(client, op)
        async with RpcClient(Identity.generate(), daemon.address, daemon.public_key) as stranger:
            with pytest.raises(NodeUnauthorized):
                await stranger.call("ping", timeout=5)
        return results

    results = asyncio.run(scenario())
    wrong = []
    for (op, role), code in results.items():
        allowed = role in ROLE_TABLE[op]
        if code == "unknown_op" or (code == "forbidden") == allowed:
            wrong.append(f"{op} as {role.value}: {code}")
    assert not wrong, "\n".join(wrong)
    forbidden = sum(role not in ROLE_TABLE[op] for op, role in results)
    assert forbidden > 100  # the table is mostly refusals: each was answered, not dropped
    after = _state(daemon.home)
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before
                                                 if k.endswith(".toml")), "a call changed the node's state"
    assert daemon.proc.poll() is None


def test_an_operation_without_an_entry_cannot_be_served():
    async def handler(call):
        return {}

    with pytest.raises(UnlistedOperation, match="role table"):
        Operation(Op("pairing.offer", NoArgs, dict), handler)
    with pytest.raises(ValueError, match="role table says"):
        Operation(Op("keys.list", NoArgs, dict), handler, frozenset({Role.CLIENT}))
    assert Operation(Op("keys.list", NoArgs, dict), handler).roles == frozenset({Role.ADMIN})


def test_no_dial_to_a_key_the_node_has_not_authorized(daemon_factory, user):
    peer = Identity.generate()
    daemon = daemon_factory(keys={user.public_key: Role.ADMIN, peer.public_key: Role.PEER})
    stranger = {"name": "stranger", "address": "tcp://127.0.0.1:9", "public_key": Identity.generate().public_key}
    me = {"name": "node", "address": daemon.address, "public_key": daemon.public_key}

    async def scenario():
        async with RpcClient(user, daemon.address, daemon.public_key) as admin:
            with pytest.raises(RemoteError) as exc:  # a job naming a node this one does not know
                await admin.call("jobs.submit", {"model": "m", "dataset": "d", "nodes": [me, stranger],
                                                 "shards": [{"id": daemon.public_key, "node": "node", "rows": 64}]},
                                 timeout=60)
            assert "stranger's key is not authorized on node node as admin or peer; nothing was sent" in \
                exc.value.message
        async with RpcClient(peer, daemon.address, daemon.public_key) as worker:
            with pytest.raises(RemoteError) as exc:  # a ring through a stranger
                await worker.call("train.ring", {"job": "j", "generation": 1, "rank": 0, "members": [me, stranger]})
            assert exc.value.code == "forbidden" and "ring member stranger" in exc.value.message

    asyncio.run(scenario())


def test_a_hostile_holder_cannot_make_a_node_allocate_without_limit():
    from dllmd.train.service import _bounded_rows

    assert _bounded_rows({"total": 10, "seq_len": 32, "valid_tokens": 300}, "h") == (10, 32, 300)
    for reply in ({"total": 2**40, "seq_len": 32, "valid_tokens": 0}, {"total": 10, "seq_len": 2**30, "valid_tokens": 0},
                  {"total": -1, "seq_len": 32, "valid_tokens": 0}, {"total": 10, "seq_len": 32, "valid_tokens": 10**9},
                  {"total": "x", "seq_len": 32, "valid_tokens": 0}, {"seq_len": 32},
                  {"total": 2**31, "seq_len": 2**20, "valid_tokens": 0}):
        with pytest.raises(ValueError, match="h"):
            _bounded_rows(reply, "h")
