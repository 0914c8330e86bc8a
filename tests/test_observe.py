"""What a running cluster tells about itself: ``node.stats`` after real inference (tokens, the spans each
node serves), the cluster snapshot ``dllmctl top`` renders (a killed node is a row saying down), and
each daemon's Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio

import pytest

from dllmctl.inference.session import DistributedSession
from dllmctl.models.deploy import deploy
from dllmctl.models.importer import import_model
from dllmctl.monitor.snapshot import cluster_snapshot
from dllmctl.placement.layout import Span
from dllmctl.placement.routing import Stage, choose_route
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.pool import ConnectionPool
from tests.conftest import local_daemons
from tests.tiny_models import make_tiny_model

MODEL = "tiny"
NEW_TOKENS = 6
PROMPT = [5, 17, 42, 9]
LAYERS = 5  # the tiny llama's


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two daemons serving the tiny llama split in two, after one greedy generation through them."""
    with local_daemons(tmp_path_factory.mktemp("observe"), 2) as cluster:
        source = make_tiny_model("llama", cluster["root"] / "src")
        import_model(source, cluster["store"], cluster["user"], name=MODEL)
        nodes = cluster["registry"].nodes
        names = sorted(nodes)
        spans = [Span(names[0], 0, 2, True, False), Span(names[1], 2, LAYERS, False, True)]
        asyncio.run(deploy(cluster["user"], nodes, cluster["store"].root / MODEL, spans))
        cluster["spans"] = spans
        cluster["generated"] = _generate(cluster, choose_route([Stage(nodes[s.node], s) for s in spans], LAYERS, MODEL))
        yield cluster


def _generate(cluster, route) -> list[int]:
    async def run():
        async with ConnectionPool(cluster["user"]) as pool, \
                DistributedSession(pool, route, MODEL, SamplingParams(), prompt_tokens=len(PROMPT),
                                   max_new_tokens=NEW_TOKENS) as session:
            return await session.generate(PROMPT, NEW_TOKENS, set())

    return asyncio.run(run())


def test_node_stats_after_inference_show_tokens_and_spans(cluster):
    snap = asyncio.run(cluster_snapshot(cluster["user"], cluster["registry"]))
    assert [n.status for n in snap.nodes] == ["up", "up"]
    first, last = (n.stats for n in snap.nodes)
    assert [(s.model, s.start, s.end) for s in first.serving] == [(MODEL, 0, 2)]
    assert [(s.model, s.start, s.end, s.head) for s in last.serving] == [(MODEL, 2, LAYERS, True)]
    # The last stage sampled every generated token; both ran the prompt and each fed-back token.
    assert last.tokens_generated == len(cluster["generated"].token_ids) == NEW_TOKENS
    assert first.tokens_generated == 0
    positions = len(PROMPT) + NEW_TOKENS - 1
    assert first.tokens_processed == last.tokens_processed == positions
    assert first.serving[0].tokens == positions  # the span's own counter agrees with node.stats'
    assert 0 < last.tokens_per_s and last.uptime_s > 0 and 0 <= first.cpu_percent <= 100
    assert 0 < first.ram_used_bytes < first.ram_total_bytes and first.rss_bytes > 0
    assert first.sessions == 0 and first.queued == 0 and first.requests > 0 and first.jobs == []
    data = snap.to_dict()
    assert data["up"] == 2 and data["nodes"][1]["stats"]["tokens_generated"] == NEW_TOKENS
