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
    keys = {role: Identity.generate() for role in (Role.CLIENT, Role.PEER, Role.FEDERATION)}
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
                codes = await asyncio.gather(*(outcome(client, op) for op in ROLE_TABLE))
            results.update({(op, role): code for op, code in zip(ROLE_TABLE, codes)})
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
        Operation(Op("relay.forward", NoArgs, dict), handler)
    with pytest.raises(ValueError, match="role table says"):
        Operation(Op("keys.list", NoArgs, dict), handler, frozenset({Role.CLIENT}))
    assert Operation(Op("keys.list", NoArgs, dict), handler).roles == frozenset({Role.ADMIN})
