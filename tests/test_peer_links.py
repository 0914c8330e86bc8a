"""Round trips between nodes, measured by the nodes themselves (``peers.ping``), remembered, shown by
``nodes list``, and used to put a tensor-parallel group on the nodes with the fastest links. Real
daemons; a slow link is a userspace delay proxy in front of one node."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import pytest

from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages.node import PEERS_PING, PING, PeerArgs, PingPeersArgs
from dllmd.net.wire import ErrorCode
from dllmctl.bench.wan import DelayProxy
from dllmctl.cluster.links import measure_links
from dllmctl.cluster.live import query_nodes
from dllmctl.cluster.registry import NodeEntry
from tests.conftest import local_daemons
from tests.tiny_models import make_tiny_model

DELAY_S = 0.015  # one way: the proxied node is 30 ms away, the others well under a millisecond


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_daemons(tmp_path_factory.mktemp("links"), 3) as cluster:
        nodes = {entry.name: entry for entry in cluster["registry"].nodes.values()}
        far = nodes["local-1"]  # the first by name: the group's seed were links not measured
        url = urlparse(far.address.replace("tcp://", "http://"))
        with DelayProxy((url.hostname, url.port), delay_s=DELAY_S) as proxy:
            entries = [NodeEntry(e.name, proxy.address if e is far else e.address, e.public_key)
                       for e in nodes.values()]
            yield {**cluster, "entries": entries, "far": far, "proxy": proxy}


def _ping_peers(cluster, target: NodeEntry, args: dict):
    async def run():
        async with RpcClient(cluster["user"], target.address, target.public_key) as client:
            reply = await client.call(PEERS_PING.name, args, timeout=20)
            await client.invoke(PING)  # and it still serves
            return reply
    return asyncio.run(run())


def test_round_trips_are_measured_remembered_and_listed(cluster):
    latency = asyncio.run(measure_links(cluster["user"], cluster["entries"], max_age_s=0))
    assert latency[("local-2", "local-3")] < 2 * DELAY_S * 1000 / 3
    for near in ("local-2", "local-3"):
        assert latency[("local-1", near)] == latency[(near, "local-1")] >= 2 * DELAY_S * 1000
    rows = {row["name"]: row for row in asyncio.run(query_nodes(cluster["user"], cluster["entries"]))}
    remembered = {rtt["name"]: rtt for rtt in rows["local-2"]["peer_rtts"]}
    assert set(remembered) == {"local-1", "local-3"}
    assert remembered["local-1"]["rtt_ms"] >= 2 * DELAY_S * 1000 and remembered["local-1"]["samples"] == 5
    assert all(rtt["measured_at"] > 0 and rtt["error"] == "" for rtt in remembered.values())
    # A young enough measurement is answered as remembered, without pinging again.
    again = asyncio.run(measure_links(cluster["user"], cluster["entries"], max_age_s=600))
    assert again == latency
    rows = {row["name"]: row for row in asyncio.run(query_nodes(cluster["user"], cluster["entries"]))}
    assert {rtt["name"]: rtt for rtt in rows["local-2"]["peer_rtts"]} == remembered


def test_a_tensor_group_forms_among_the_nodes_with_fast_links(cluster):
    from dllmctl.models.importer import import_model
    from dllmctl.models.layouts import plan_groups_on_live_nodes

    store = cluster["store"]
    source = make_tiny_model("llama", cluster["root"] / "src-links")
    import_model(source, store, cluster["user"], name="links-llama")
    layout = asyncio.run(plan_groups_on_live_nodes(cluster["user"], cluster["entries"], store.root / "links-llama",
                                                   store.get("links-llama"), "tensor", tp=2))
    (members,) = layout.groups().values()
    assert {m.node for m in members} == {"local-2", "local-3"}  # not the 30 ms one, first by name


@pytest.mark.parametrize("peers, count", [
    ([{"public_key": "zz", "endpoint": "tcp://127.0.0.1:9"}], 5),  # not a key
    ([{"public_key": "ab" * 32, "endpoint": "tcp://127.0.0.1:9"}], 5),  # hex, but not a curve point
    ([{"public_key": None, "endpoint": "tcp://127.0.0.1:9"}], 5),  # not a string
    ([{"public_key": "VALID", "endpoint": "http://127.0.0.1:9"}], 5),  # not a zmq tcp endpoint
    ([{"public_key": "VALID", "endpoint": "tcp://127.0.0.1:99999"}], 5),  # no such port
    ([{"public_key": "VALID", "endpoint": "tcp://127.0.0.1:*"}], 5),  # names no port
    ([{"public_key": "VALID", "endpoint": "tcp://127.0.0.1:9"}] * 2, 5),  # the same peer twice
    ([{"public_key": "VALID", "endpoint": "tcp://127.0.0.1:9"}] * 65, 5),  # too many
    ([{"public_key": "VALID", "endpoint": "tcp://127.0.0.1:9"}], 0),  # no pings
    ([{"public_key": "VALID", "endpoint": "tcp://127.0.0.1:9", "extra": 1}], 5),  # unknown field
    ("everyone", 5),  # not a list
])
def test_bad_peer_lists_answer_bad_args_and_the_daemon_keeps_serving(cluster, peers, count):
    target = cluster["entries"][1]
    valid = cluster["entries"][2].public_key
    if isinstance(peers, list):
        peers = [{k: (valid if v == "VALID" else v) for k, v in p.items()} for p in peers]
    with pytest.raises(RemoteError) as raised:
        _ping_peers(cluster, target, {"peers": peers, "count": count})
    assert raised.value.code == ErrorCode.BAD_ARGS


def test_a_key_not_authorized_as_a_peer_is_never_connected_to(cluster):
    target = cluster["entries"][1]
    stranger = Identity.generate()
    url = urlparse(target.address.replace("tcp://", "http://"))
    with DelayProxy((url.hostname, url.port)) as trap:
        result, _ = _ping_peers(cluster, target, {"peers": [
            {"public_key": stranger.public_key, "endpoint": trap.address},
            {"public_key": cluster["user"].public_key, "endpoint": trap.address}]})  # an admin, not a peer
        assert trap.connections == 0
    assert [p["error"] for p in result["peers"]] == [ErrorCode.FORBIDDEN, ErrorCode.FORBIDDEN]
    assert all(p["rtt_ms"] == 0 and p["samples"] == 0 for p in result["peers"])


def test_a_peer_that_does_not_answer_is_reported_unavailable(cluster):
    target, other = cluster["entries"][1], cluster["entries"][2]
    result, _ = _ping_peers(cluster, target, {"count": 1, "peers": [
        {"public_key": other.public_key, "endpoint": "tcp://127.0.0.1:9"}]})  # nothing listens there
    (peer,) = result["peers"]
    assert peer["error"] == ErrorCode.UNAVAILABLE and peer["message"]
    assert PingPeersArgs([PeerArgs(other.public_key, other.address)]).count == 5  # the default
