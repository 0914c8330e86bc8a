"""What a running cluster tells about itself: ``node.stats`` after real inference (tokens, the spans each
node serves), the cluster snapshot ``dllmctl top`` renders (a killed node is a row saying down), and
each daemon's Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dllmctl.inference.session import DistributedSession
from dllmctl.models.deploy import deploy
from dllmctl.models.importer import import_model
from dllmctl.monitor.snapshot import cluster_snapshot
from dllmctl.placement.layout import Span
from dllmctl.placement.routing import Stage, choose_route
from dllmd.config import ConfigError, NodeConfig
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.pool import ConnectionPool
from tests.conftest import local_daemons, make_home, run_cli
from tests.tiny_models import make_tiny_model

MODEL = "tiny"
NEW_TOKENS = 6
PROMPT = [5, 17, 42, 9]
LAYERS = 5  # the tiny llama's


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two daemons serving the tiny llama split in two, each with a metrics endpoint, after one greedy
    generation through them; ``env`` lets the CLI act as the same user on the same registry and store."""
    with local_daemons(tmp_path_factory.mktemp("observe"), 2, {"metrics_listen": "127.0.0.1:0"}) as cluster:
        root = cluster["root"]
        cluster["user"].save(root / "identity")
        cluster["env"] = {"DLLM_CONFIG_DIR": str(root), "DLLM_DATA_DIR": str(root), "DLLM_CACHE_DIR": str(root / "cache")}
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


def _scrape(node) -> dict:
    """The node's /metrics over HTTP, parsed by prometheus_client: family name -> its samples."""
    at = json.loads((Path(node.home) / "daemon.json").read_text())["metrics"]
    assert at.startswith("127.0.0.1:")
    with urllib.request.urlopen(f"http://{at}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    matches = [s.value for s in families[family] if s.name == (sample or family)
               and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (family, labels, families.get(family))
    return matches[0]


def test_scrape_after_inference_has_the_metric_families(cluster):
    first, last = (_scrape(n) for n in cluster["nodes"])
    assert _value(last, "dllm_tokens_generated", "dllm_tokens_generated_total", model=MODEL) == NEW_TOKENS
    positions = len(PROMPT) + NEW_TOKENS - 1
    assert _value(first, "dllm_tokens_processed", "dllm_tokens_processed_total", model=MODEL) == positions
    # One prefill pass, then one per fed-back token; each took some time and held one session's step.
    passes = _value(first, "dllm_forward_pass_seconds", "dllm_forward_pass_seconds_count", model=MODEL)
    assert passes == NEW_TOKENS
    assert _value(first, "dllm_forward_pass_seconds", "dllm_forward_pass_seconds_sum", model=MODEL) > 0
    assert _value(first, "dllm_forward_batch_size", "dllm_forward_batch_size_sum", model=MODEL) == passes
    assert _value(first, "dllm_span_first_layer", model=MODEL) == 0
    assert _value(last, "dllm_span_end_layer", model=MODEL) == LAYERS
    assert _value(first, "dllm_sessions_open", model=MODEL) == 0  # the session closed
    assert _value(first, "dllm_queue_depth", model=MODEL) == 0
    assert _value(first, "dllm_kv_cache_bytes", model=MODEL) == 0
    # Requests by operation, and bytes by the key that sent them (the user: named at 'cluster up').
    assert _value(first, "dllm_requests", "dllm_requests_total", op="session.open") == 1
    assert _value(last, "dllm_requests", "dllm_requests_total", op="span.load") == 1
    assert _value(first, "dllm_peer_received_bytes", "dllm_peer_received_bytes_total", peer="dllmctl user") > 0
    assert _value(first, "dllm_peer_sent_bytes", "dllm_peer_sent_bytes_total", peer="dllmctl user") > 0
    # The second stage received the hidden states from the first, by its name in the key table.
    assert _value(last, "dllm_peer_received_bytes", "dllm_peer_received_bytes_total", peer="local-1") > 0
    assert 0 < _value(first, "dllm_memory_used_bytes") < _value(first, "dllm_memory_total_bytes")
    assert _value(first, "dllm_resident_memory_bytes") > 0 and _value(first, "dllm_uptime_seconds") > 0
    assert 0 <= _value(first, "dllm_cpu_usage_ratio") <= 1


def test_unknown_operation_counts_as_an_error_under_unknown(cluster):
    from dllmd.net.client import RemoteError, RpcClient

    node = cluster["registry"].nodes["local-1"]

    async def call():
        async with RpcClient(cluster["user"], node.address, node.public_key) as client:
            with pytest.raises(RemoteError) as caught:
                await client.call("no.such.op-" + "x" * 40, {}, timeout=10)
            return caught.value.code

    assert asyncio.run(call()) == "unknown_op"
    # A caller's op names never become labels: the error is counted under 'unknown'.
    assert _value(_scrape(cluster["nodes"][0]), "dllm_errors", "dllm_errors_total", op="unknown", code="unknown_op") == 1


def _corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(12):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (2 + i % 3))
    return root


def _cli(cluster, *args: str) -> dict:
    done = run_cli("dllmctl", *args, "--json", env=cluster["env"])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_running_job_shows_in_the_snapshot_and_its_steps_in_the_metrics(cluster):
    from dllmd.net.messages import training as S
    from dllmctl.training.jobs import job_call

    _cli(cluster, "shard-data", str(_corpus(cluster["root"] / "repo")), "-m", MODEL, "--seq-len", "32",
         "--nodes", "local-1,local-2", "--name", "code")
    total = 500  # more than it runs: it is stopped once seen
    job = _cli(cluster, "train", "-m", MODEL, "-d", "code", "--nodes", "local-1,local-2", "--max-steps", str(total),
               "--batch-size", "4", "--micro-batch-size", "2", "--detach")["job"]
    coordinator = cluster["registry"].nodes["local-1"]
    seen = _poll(lambda: [j for j in asyncio.run(cluster_snapshot(cluster["user"], cluster["registry"])).jobs
                          if j.step >= 2], "the job's second step in the snapshot")
    view = seen[0]
    assert (view.job, view.coordinator, view.state, view.total_steps) == (job, "local-1", "running", total)
    assert view.loss > 0 and view.tokens_per_s > 0 and view.eta_s > 0
    assert _value(_scrape(cluster["nodes"][0]), "dllm_train_jobs_running") == 1
    asyncio.run(job_call(cluster["user"], coordinator, S.JOBS_STOP, {"job": job}))
    shown = _poll(lambda: (lambda d: d if d["state"] == "stopped" else None)(
        asyncio.run(job_call(cluster["user"], coordinator, S.JOBS_SHOW, {"job": job}))), "the job to stop")
    steps = shown["step"]
    metrics = _scrape(cluster["nodes"][0])
    assert _value(metrics, "dllm_train_steps", "dllm_train_steps_total") == steps
    assert _value(metrics, "dllm_train_step", job=job) == steps
    assert _value(metrics, "dllm_train_loss", job=job) == pytest.approx(shown["last_metrics"]["loss"])
    assert _value(metrics, "dllm_train_tokens_per_second", job=job) > 0
    assert _value(metrics, "dllm_train_step_seconds", "dllm_train_step_seconds_count") == steps
    assert _value(metrics, "dllm_allreduce_seconds", "dllm_allreduce_seconds_count") == steps
    assert not metrics.get("dllm_train_epsilon")  # no DP here: no epsilon series
    assert _value(metrics, "dllm_train_jobs_running") == 0


def _poll(probe, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_top_once_json_shows_a_killed_node_down(cluster):
    """Last in the module: it kills a node."""
    import os
    import signal

    victim = cluster["nodes"][1]
    os.kill(victim.pid, signal.SIGKILL)
    snap = _cli(cluster, "top", "--once", "--timeout", "1")
    rows = {n["name"]: n for n in snap["nodes"]}
    assert rows["local-1"]["status"] == "up" and rows["local-1"]["stats"]["serving"][0]["model"] == MODEL
    assert rows["local-2"]["status"] == "down" and rows["local-2"]["stats"] is None
    assert rows["local-2"]["code"] == "down" and rows["local-2"]["error"]
    assert snap["up"] == 1 and snap["down"] == 1 and snap["jobs"] == []
    table = run_cli("dllmctl", "top", "--once", "--timeout", "1", env=cluster["env"])
    assert table.returncode == 0, table.stderr
    assert "1/2 nodes up" in table.stdout and "down" in table.stdout


@pytest.mark.parametrize("listen, why", [("0.0.0.0:9740", "not a loopback address"), ("127.0.0.1", "HOST:PORT"),
                                         ("127.0.0.1:70000", "HOST:PORT"), ("metrics.lan:9740", "IP address")])
def test_bad_metrics_listen_is_a_clear_config_error(tmp_path, listen, why):
    make_home(tmp_path / "home", "n1")
    path = tmp_path / "home" / "node.toml"
    path.write_text(path.read_text().replace('metrics_listen = ""', f'metrics_listen = "{listen}"'))
    with pytest.raises(ConfigError, match=why) as caught:
        NodeConfig.load(tmp_path / "home")
    assert str(path) in str(caught.value)
    assert NodeConfig(name="n", metrics_listen="0.0.0.0:9740", metrics_allow_remote=True).metrics_listen


def test_a_taken_metrics_port_stops_the_daemon_with_a_message(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        make_home(tmp_path / "home", "n1", metrics_listen=f"127.0.0.1:{taken.getsockname()[1]}")
        done = run_cli("dllmd", "start", "--home", str(tmp_path / "home"), timeout=120)
    assert done.returncode != 0
    assert "cannot serve metrics on 127.0.0.1:" in done.stderr


def test_job_store_events_and_steps_feed_bounded_series(tmp_path):
    """The one place training figures come from: alert.<code> events count by code, per-job gauges are
    kept for the latest jobs only."""
    from dllmd.observe.metrics import MAX_JOB_SERIES, NodeMetrics
    from dllmd.train.jobs import JobStore

    metrics = NodeMetrics()
    store = JobStore(tmp_path / "jobs.sqlite", metrics)
    spec = {"nodes": [{"name": "a"}]}
    for i in range(MAX_JOB_SERIES + 2):
        store.create(f"job{i}", spec, 10)
        store.record_step(f"job{i}", 0, {"loss": 2.0 + i, "eval_loss": 3.0, "epsilon": 0.5, "step_s": 0.2})
    store.event("job0", "alert.loss_spike", "loss doubled")
    store.event("job1", "alert.loss_spike", "again")
    store.event("job1", "checkpoint", "step 1")
    get = metrics.registry.get_sample_value
    assert get("dllm_alerts_total", {"code": "loss_spike"}) == 2
    assert get("dllm_train_steps_total") == MAX_JOB_SERIES + 2
    newest = f"job{MAX_JOB_SERIES + 1}"
    assert get("dllm_train_loss", {"job": newest}) == 2.0 + MAX_JOB_SERIES + 1
    assert get("dllm_eval_loss", {"job": newest}) == 3.0 and get("dllm_train_epsilon", {"job": newest}) == 0.5
    assert get("dllm_train_loss", {"job": "job0"}) is None  # dropped: only the latest jobs keep series
    assert metrics.job_figure("step_s", newest) == 0.2
    store.close()
