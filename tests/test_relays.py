"""Relayed inference (``DistributedSession(relays=...)``): a session's traffic through one or two relay
nodes, sealed in a layer per relay. Two stages and two relays, real daemons on 127.0.0.1: relayed
sessions give the direct session's tokens and logits, a stage knows only the last relay's key, a relay
carries session traffic only and only for its clients, is never a stage, and survives hostile blobs.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

import pytest
import torch

from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.relay import RelayedNode
from dllmctl.inference.session import DistributedSession
from dllmd.net.client import NodeUnauthorized, RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages.inference import SESSION_CLOSE, SamplingParams, SessionArgs
from dllmd.net.messages.relay import RELAY_DELIVER, RELAY_FORWARD, HopLayer
from dllmd.net.pool import ConnectionPool
from dllmd.net.sealing import curve_key_of, seal
from dllmd.net.wire import ErrorCode
from tests.conftest import local_daemons, make_home, start_daemon
from tests.test_distributed_inference import _deploy, _import

PROMPT = [(i * 37 + 11) % 300 + 5 for i in range(19)]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """Stages local-1 and local-2 (a tiny llama split over them) and relays relay-1 and relay-2."""
    root = tmp_path_factory.mktemp("relays")
    with local_daemons(root, 2) as cluster:
        stages = cluster["nodes"]
        homes = {name: root / name for name in ("relay-1", "relay-2")}
        ids = {name: make_home(home, name, relay=True) for name, home in homes.items()}
        for name, home in homes.items():
            keys = AuthorizedKeys(home / "authorized_keys.toml")
            keys.authorize(cluster["user"].public_key, Role.CLIENT, "user")
            for other, identity in ids.items():
                if other != name:
                    keys.authorize(identity.public_key, Role.RELAY, other)
            for stage in stages:  # the hops it may dial
                keys.authorize(stage.public_key, Role.PEER, stage.name)
        for stage in stages:
            keys = AuthorizedKeys(Path(stage.home) / "authorized_keys.toml")
            for name, identity in ids.items():
                keys.authorize(identity.public_key, Role.RELAY, name)
        daemons = {name: start_daemon(home) for name, home in homes.items()}
        try:
            name, _ = _import(cluster, "llama")
            route = _deploy(cluster, name, [(0, 2), (2, 5)])
            relays = [NodeEntry(n, d.address, d.public_key) for n, d in daemons.items()]
            yield {**cluster, "model": name, "route": route, "relays": relays, "relay_ids": ids, "daemons": daemons}
        finally:
            for daemon in daemons.values():
                daemon.stop()


def _generate(net, relays, new_tokens=NEW_TOKENS):
    async def run():
        async with ConnectionPool(net["user"]) as pool, \
                DistributedSession(pool, net["route"], net["model"], SamplingParams(), prompt_tokens=len(PROMPT),
                                   max_new_tokens=new_tokens, logits="last", relays=relays) as session:
            return await session.generate(PROMPT, new_tokens, set())

    return asyncio.run(run())


def test_relayed_sessions_give_the_direct_sessions_tokens_and_logits(net):
    direct = _generate(net, [])
    per_token = {}
    for n in (1, 2):
        got = _generate(net, net["relays"][:n])
        assert got.token_ids == direct.token_ids, f"{n} relay(s)"
        assert all(torch.equal(a, b) for a, b in zip(got.logits, direct.logits)), f"{n} relay(s)"
        per_token[n] = got
    per_token[0] = direct
    # Per-token latency on loopback (decode steps only), for docs/inference.md's figures.
    ms = {n: statistics.median(g.step_seconds[1:]) * 1000 for n, g in per_token.items()}
    print(f"\nper-token decode latency: direct {ms[0]:.2f} ms, 1 relay {ms[1]:.2f} ms, 2 relays {ms[2]:.2f} ms")


def test_a_stage_knows_the_last_relay_not_the_client(net):
    first = net["route"][0].node
    relay1, relay2 = net["relays"]

    async def scenario():
        async with ConnectionPool(net["user"]) as pool:
            session = DistributedSession(pool, net["route"], net["model"], SamplingParams(), prompt_tokens=4,
                                         max_new_tokens=2, relays=[relay1])
            async with session:
                # The user administers the stage, but the session's owner there is relay-1's key:
                direct = pool.get(first.address, first.public_key)
                with pytest.raises(RemoteError) as exc:
                    await direct.invoke(SESSION_CLOSE, SessionArgs(session.id), timeout=5)
                assert exc.value.code == ErrorCode.NOT_FOUND
                # ... and not any relay's: through relay-2 it is not there either.
                with pytest.raises(RemoteError) as exc:
                    await RelayedNode(pool, [relay2], first).invoke(SESSION_CLOSE, SessionArgs(session.id), timeout=5)
                assert exc.value.code == ErrorCode.NOT_FOUND
                await session.generate([1, 2, 3, 4], 2, set())  # still intact, and closed through relay-1 below

    asyncio.run(scenario())


def test_a_relay_carries_session_traffic_only_and_only_for_its_clients(net):
    first = net["route"][0].node
    relay1 = net["relays"][0]
    relay_identity = net["relay_ids"]["relay-1"]
    stage_identity = Identity.load(Path(net["nodes"][0].home) / "identity")

    async def scenario():
        async with ConnectionPool(net["user"]) as pool:
            stream = await RelayedNode(pool, [relay1], first).open_stream("keys.list", {}, timeout=5)
            with pytest.raises(RemoteError) as exc:
                await stream.next(timeout=10)
            assert exc.value.code == ErrorCode.FORBIDDEN and "session operations only" in exc.value.message
        # The relay's own key on a stage: session.* for others, nothing of its own.
        async with RpcClient(relay_identity, first.address, first.public_key) as as_relay:
            for op in ("info", "ping", "span.load", "keys.list", "train.step"):
                with pytest.raises(RemoteError) as exc:
                    await as_relay.call(op, {}, timeout=10)
                assert exc.value.code == ErrorCode.FORBIDDEN, op
        # A key the relay knows, but not as a client (a stage: a peer there), is refused as such.
        async with RpcClient(stage_identity, relay1.address, relay1.public_key) as peer:
            with pytest.raises(RemoteError) as exc:
                await peer.call(RELAY_FORWARD.name, {"sealed": b"x"}, timeout=10)
            assert exc.value.code == ErrorCode.FORBIDDEN
        async with RpcClient(Identity.generate(), relay1.address, relay1.public_key) as stranger:
            with pytest.raises(NodeUnauthorized):
                await stranger.call(RELAY_FORWARD.name, {"sealed": b"x"}, timeout=10)
        # A node without relay = true passes nothing on.
        async with RpcClient(net["user"], first.address, first.public_key) as admin:
            with pytest.raises(RemoteError) as exc:
                await admin.call(RELAY_FORWARD.name, {"sealed": b"x"}, timeout=10)
            assert exc.value.code == ErrorCode.UNAVAILABLE

    asyncio.run(scenario())


def test_a_relay_is_never_a_stage_of_the_session(net):
    relay1 = net["relays"][0]

    async def scenario():
        async with ConnectionPool(net["user"]) as pool:
            with pytest.raises(ValueError, match="also a stage"):  # the client checks
                RelayedNode(pool, [relay1], relay1)
            # ... and the relay refuses a layer that names itself as the next hop.
            layer = seal(curve_key_of(relay1.public_key), HopLayer(relay1.address, relay1.public_key, b"x", True))
            async with RpcClient(net["user"], relay1.address, relay1.public_key) as client:
                with pytest.raises(RemoteError) as exc:
                    await client.call(RELAY_FORWARD.name, {"sealed": layer}, timeout=10)
                assert exc.value.code == ErrorCode.CONFLICT

    asyncio.run(scenario())


def test_hostile_sealed_blobs_get_a_clear_error_and_the_relay_runs_on(net):
    first = net["route"][0].node
    relay1 = net["relays"][0]
    to_stage = seal(curve_key_of(first.public_key), HopLayer(first.address, first.public_key, b"x", True))
    blobs = {
        "garbage": b"\x00" * 100,
        "empty": b"",
        "wrong recipient": to_stage,  # sealed to the stage, sent to the relay
        "not a layer": seal(curve_key_of(relay1.public_key), SessionArgs("abcdefgh")),
        "bad next key": seal(curve_key_of(relay1.public_key), HopLayer(first.address, "zz" * 32, b"x", True)),
        "bad next address": seal(curve_key_of(relay1.public_key), HopLayer("ipc:///tmp/x", first.public_key, b"x")),
    }

    async def scenario():
        async with RpcClient(net["user"], relay1.address, relay1.public_key) as client:
            for label, blob in blobs.items():
                with pytest.raises(RemoteError) as exc:
                    await client.call(RELAY_FORWARD.name, {"sealed": blob}, timeout=10)
                assert exc.value.code == ErrorCode.BAD_ARGS, label
            await client.call("ping", timeout=10)
        # The innermost layer, forged: garbage reaches the stage through the relay and is refused there.
        layer = seal(curve_key_of(relay1.public_key), HopLayer(first.address, first.public_key, b"junk", True))
        async with RpcClient(net["user"], relay1.address, relay1.public_key) as client:
            with pytest.raises(RemoteError) as exc:
                await client.call(RELAY_FORWARD.name, {"sealed": layer}, timeout=10)
            assert exc.value.code == ErrorCode.BAD_ARGS
        async with RpcClient(net["user"], first.address, first.public_key) as admin:
            with pytest.raises(RemoteError) as exc:
                await admin.call(RELAY_DELIVER.name, {"sealed": b"junk"}, timeout=10)
            assert exc.value.code == ErrorCode.BAD_ARGS
    asyncio.run(scenario())
    assert all(d.proc.poll() is None for d in net["daemons"].values())
    assert _generate(net, net["relays"][:1], new_tokens=2).token_ids  # and still relays


def test_generation_with_failover_routes_around_the_relays_and_through_them(net):
    """What ``dllmctl infer --relays`` runs: the route is chosen among the stages only (a relay is never
    a stage, even when the relays are among the nodes asked), and every session goes through them."""
    from dllmctl.inference.failover import generate_with_failover
    from dllmctl.inference.stages import live_stages

    nodes = [*net["registry"].select(None), *net["relays"]]

    async def run(relays):
        async with ConnectionPool(net["user"]) as pool:
            return await generate_with_failover(pool, lambda: live_stages(net["user"], nodes, net["model"]),
                                                net["model"], 5, PROMPT, NEW_TOKENS, set(), SamplingParams(),
                                                relays=relays)

    relayed = asyncio.run(run(net["relays"][:2]))
    assert relayed.token_ids == _generate(net, []).token_ids
    assert not {n.name for n in net["relays"]} & {s["node"] for r in relayed.routes for s in r}


def test_the_relay_benchmark_measures_relayed_tokens_equal_to_direct(net):
    """``dllmctl bench relays`` on its own temporary daemons (two stages, one relay) with this module's model."""
    from dllmctl.bench import relays as relay_bench

    report = relay_bench.run(net["user"], net["model"], net["store"].path(net["model"]), 1, 4, None)
    direct, relayed = report["loopback"]["runs"]
    assert direct["relays"] == 0 and relayed["relays"] == 1
    assert relayed["identical_to_direct"] and direct["per_token_ms"] > 0 and relayed["per_token_ms"] > 0
    assert relayed["added_ms"] == round(relayed["per_token_ms"] - direct["per_token_ms"], 3)
