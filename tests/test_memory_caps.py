"""The owner's caps (node.toml's ``[limits]``): two real daemons whose owners let dllm use 4 MiB each
serve a 4.7 MiB model between them, with exactly the local model's greedy tokens; neither takes it
alone, a session that would push a node past its cap is refused up front, and ``nodes list`` shows
each cap and what is used of it."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from dllmd.config import ConfigError, NodeConfig, ResourceLimits
from dllmd.net.client import RemoteError
from dllmd.net.messages.inference import SESSION_OPEN, OpenArgs, SamplingParams
from dllmd.net.pool import ConnectionPool
from dllmd.net.schema import to_wire
from dllmd.net.wire import ErrorCode
from dllmctl.cluster.live import query_nodes
from dllmctl.inference.session import DistributedSession
from dllmctl.models.deploy import deploy, deploy_span
from dllmctl.models.importer import import_model
from dllmctl.models.layouts import plan_on_live_nodes
from dllmctl.placement.capacity import node_capacities
from dllmctl.placement.layout import PlanError, Span
from dllmctl.placement.routing import Stage, choose_route
from tests.conftest import local_daemons, make_home, run_cli
from tests.tiny_models import make_tiny_model

MiB = 2**20
CAP = 4 * MiB
# 8 layers of 0.56 MiB, tied embeddings of 0.16 MiB: 4.66 MiB of fp32 weights, more than one cap, less than two.
# A long context lets a session ask for more KV cache than a node's cap leaves.
MODEL_CONFIG = dict(num_hidden_layers=8, hidden_size=128, intermediate_size=256, max_position_embeddings=4096)
KV_PER_POSITION_AND_LAYER = 2 * 2 * 32 * 4  # keys and values, 2 KV heads of 32 dimensions, fp32
NODES = ("local-1", "local-2")
NEW_TOKENS = 10


# --- node.toml ------------------------------------------------------------------------------------------

def test_limits_parse_sizes_and_refuse_bad_values(tmp_path):
    home = tmp_path / "n"
    home.mkdir()
    (home / "node.toml").write_text("name = 'n'\n[limits]\nmemory = '6GiB'\nthreads = 2\ngpus = []\n")
    limits = NodeConfig.load(home).limits
    assert limits == ResourceLimits(memory=6 * 2**30, threads=2, gpus=[])
    assert ResourceLimits(memory="512MiB").memory == 512 * MiB and ResourceLimits(memory=1000).memory == 1000
    assert ResourceLimits(memory="1.5 GB").memory == 1_500_000_000

    (home / "node.toml").write_text("name = 'n'\nmemory_budget_bytes = 1024\n")  # as before [limits]
    old = NodeConfig.load(home)
    assert old.limits == ResourceLimits() and old.memory_budget_bytes == 1024
    old.save(home)
    assert "limits" not in (home / "node.toml").read_text()  # nothing capped, nothing written
    NodeConfig(name="n", limits=ResourceLimits(memory=CAP, gpus=[1])).save(home)
    assert NodeConfig.load(home).limits == ResourceLimits(memory=CAP, gpus=[1])  # TOML round trip

    bad = {"memory = 'lots'": "limits.memory", "memory = -1": "limits.memory", "memory = 1.5": "limits.memory",
           "threads = -2": "limits.threads", "threads = true": "limits.threads", "gpus = 0": "limits.gpus",
           "gpus = [0, 0]": "limits.gpus", "gpus = ['0']": "limits.gpus", "cpus = 2": "unknown setting(s) limits.cpus"}
    for line, named in bad.items():
        (home / "node.toml").write_text(f"name = 'n'\n[limits]\n{line}\n")
        with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
            NodeConfig.load(home)
    (home / "node.toml").write_text("name = 'n'\nlimits = 4\n")
    with pytest.raises(ConfigError, match=r"limits must be a table"):
        NodeConfig.load(home)


def test_a_daemon_will_not_start_on_gpus_it_does_not_have(tmp_path):
    home = tmp_path / "n"
    make_home(home, "n", limits=ResourceLimits(gpus=[63]))
    started = run_cli("dllmd", "start", "--home", str(home), timeout=120)
    assert started.returncode == 1 and "limits.gpus = [63]" in started.stderr and "Traceback" not in started.stderr
    (home / "node.toml").write_text("name = 'n'\nlisten = 'tcp://127.0.0.1:0'\n[limits]\nmemory = 'lots'\n")
    started = run_cli("dllmd", "start", "--home", str(home), timeout=120)
    assert started.returncode == 1 and "limits.memory" in started.stderr and "Traceback" not in started.stderr


# --- what a node checks before it reads a tensor ----------------------------------------------------------

def test_expected_weight_bytes_are_what_the_built_span_holds(tmp_path):
    from dllmd.models.span import LayerSpan, expected_weight_bytes
    from dllmd.models.store import ModelStore
    from dllmd.net.identity import Identity
    from dllmd.net.messages.tensor import TensorSlice
    from transformers import AutoConfig

    source = make_tiny_model("llama", tmp_path / "src")  # tied: one span with both ends holds the matrix once
    store, user = ModelStore(tmp_path / "models"), Identity.generate()
    import_model(source, store, user, name="t")
    import_model(source, store, user, name="q", quantize="int8")
    config = AutoConfig.from_pretrained(source)
    n, vocab = config.num_hidden_layers, config.vocab_size
    member = TensorSlice("g", 1, 2, kv_lo=1, kv_hi=2, mlp_lo=64, mlp_hi=128, vocab_lo=vocab // 2, vocab_hi=vocab)
    for start, end, dtype, tensor_slice in [(0, n, torch.float32, None), (0, n, torch.bfloat16, None),
                                            (2, n, torch.float32, None), (0, n, torch.float32, member)]:
        ends = dict(embed=start == 0, head=end == n)
        span = LayerSpan(config, start, end, **ends, tensors=store.tensor_source("t"), dtype=dtype,
                         tensor_slice=tensor_slice)
        assert expected_weight_bytes(config, start, end, **ends, dtype=dtype, tensor_slice=tensor_slice) \
            == span.weight_bytes, (start, end, dtype, tensor_slice)
    quantized = LayerSpan(config, 0, n, embed=True, head=True, tensors=store.tensor_source("q"))
    floor = expected_weight_bytes(config, 0, n, embed=True, head=True, dtype=torch.float32, quantized=True)
    assert 0 < floor < quantized.weight_bytes  # packed projections are counted once built


# --- the planner's view (pure) ----------------------------------------------------------------------------

def _row(name: str, free: int, cap: int = 0, used: int = 0) -> dict:
    return {"name": name, "status": "up", "serving": [], "memory_used_bytes": used,
            "hardware": {"gpus": [], "ram_available": free, "matmul_gflops": 10.0},
            "limits": {"memory_bytes": cap, "threads": 0, "gpus": None}}


def test_a_node_offers_the_lesser_of_its_free_memory_and_what_its_cap_leaves():
    rows = [_row("uncapped", 100 * MiB), _row("capped", 100 * MiB, cap=8 * MiB, used=3 * MiB),
            _row("tight", 2 * MiB, cap=8 * MiB), _row("full", 100 * MiB, cap=8 * MiB, used=9 * MiB),
            {**_row("old", 50 * MiB), "limits": None, "memory_used_bytes": None}]  # a node from before [limits]
    assert {c.name: c.free_memory_bytes // MiB for c in node_capacities(rows)} == {
        "uncapped": 100, "capped": 5, "tight": 2, "full": 0, "old": 50}


# --- two capped daemons -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two daemons whose owners cap dllm at 4 MiB (their homes are made first, as an owner would write
    node.toml; the local cluster keeps a home it finds), the tiny model imported, and a CLI user."""
    root = tmp_path_factory.mktemp("caps")
    for name in NODES:
        make_home(root / "daemons" / name, name, limits=ResourceLimits(memory=CAP, threads=1))
    with local_daemons(root, len(NODES)) as cluster:
        cluster["user"].save(root / "identity")
        cluster["env"] = {"DLLM_CONFIG_DIR": str(root), "DLLM_DATA_DIR": str(root), "DLLM_CACHE_DIR": str(root / "cache")}
        source = make_tiny_model("llama", root / "src", **MODEL_CONFIG)
        import_model(source, cluster["store"], cluster["user"], name="capped")
        cluster["source"] = source
        yield cluster


@pytest.fixture(scope="module")
def deployed(cluster):
    """The model as the planner lays it out over both nodes, deployed."""
    entries = cluster["registry"].select(None)
    layout = asyncio.run(plan_on_live_nodes(cluster["user"], entries, cluster["store"].get("capped"), 1))
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].path("capped"), layout.spans))
    return layout


def _rows(cluster) -> dict[str, dict]:
    return {r["name"]: r for r in asyncio.run(query_nodes(cluster["user"], cluster["registry"].select(None)))}


def test_a_model_no_single_cap_holds_is_split_and_generates_the_local_models_tokens(cluster, deployed):
    weights = cluster["store"].get("capped")
    assert sum(layer.bytes for layer in weights.layers) + weights.embed.bytes > CAP  # no node could hold it alone
    assert sorted(s.node for s in deployed.spans) == list(NODES)
    nodes = cluster["registry"].nodes
    route = choose_route([Stage(nodes[s.node], s) for s in deployed.spans], 8, "capped")
    prompt = [(i * 37 + 11) % 300 + 5 for i in range(12)]

    async def generate():
        async with ConnectionPool(cluster["user"]) as pool, \
                DistributedSession(pool, route, "capped", SamplingParams(), prompt_tokens=len(prompt),
                                   max_new_tokens=NEW_TOKENS) as session:
            return await session.generate(prompt, NEW_TOKENS, set())

    got = asyncio.run(generate())
    model = AutoModelForCausalLM.from_pretrained(cluster["source"], dtype=torch.float32).eval()
    want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False)[0, len(prompt):].tolist()
    assert got.token_ids == want
    for name, row in _rows(cluster).items():
        held = sum(s["param_bytes"] for s in row["serving"])
        assert row["memory_used_bytes"] == held and 0 < held <= CAP * 0.8, name  # the session closed


def test_one_node_alone_is_refused_by_the_planner_and_by_the_node(cluster, deployed):
    manifest = cluster["store"].get("capped")
    one = cluster["registry"].select(["local-1"])
    with pytest.raises(PlanError) as refused:
        asyncio.run(plan_on_live_nodes(cluster["user"], one, manifest, 1))
    assert "do not fit" in str(refused.value) and "[limits] memory" in str(refused.value)
    assert "local-1 at 4.0 MiB" in str(refused.value)

    before = _rows(cluster)["local-1"]
    whole = Span("local-1", 0, 8, True, True)
    with pytest.raises(RemoteError) as refused:
        asyncio.run(deploy_span(cluster["user"], one[0], cluster["store"].path("capped"), whole))
    assert refused.value.code == ErrorCode.NO_MEMORY
    message = refused.value.message
    assert "4.7 MiB needed" in message and "caps dllm at 4.0 MiB" in message, message
    assert f"{before['memory_used_bytes'] / MiB:.1f} MiB are in use" in message, message
    after = _rows(cluster)["local-1"]  # the node still serves its own span, unchanged
    assert after["status"] == "up" and after["serving"] == before["serving"]
    assert after["memory_used_bytes"] == before["memory_used_bytes"]


def test_a_session_whose_kv_cache_would_pass_the_cap_is_refused_when_it_opens(cluster, deployed):
    span = deployed.spans[-1]  # the last stage: it takes no next hop
    row = _rows(cluster)[span.node]
    assert row["kv_budget_bytes"] == CAP  # the KV budget never exceeds the cap
    per_position = KV_PER_POSITION_AND_LAYER * span.layers
    room = CAP - row["memory_used_bytes"]
    positions = room // per_position + 1  # one position too many for the cap, well within the KV budget
    entry = cluster["registry"].nodes[span.node]

    async def open_session(session: str, max_new_tokens: int):
        args = OpenArgs(session=session, model="capped", start=span.start, end=span.end, prompt_tokens=8,
                        max_new_tokens=max_new_tokens, sampling=SamplingParams())
        async with ConnectionPool(cluster["user"]) as pool:
            stream = await pool.get(entry.address, entry.public_key).open_stream(SESSION_OPEN.name, to_wire(args))
            return (await stream.next(timeout=10)).result

    with pytest.raises(RemoteError) as refused:
        asyncio.run(open_session("too-big-session", positions - 8))
    assert refused.value.code == ErrorCode.NO_MEMORY
    assert "KV cache" in refused.value.message and "caps dllm at 4.0 MiB" in refused.value.message
    assert asyncio.run(open_session("fits-session", positions - 9))["reserved_bytes"] == (positions - 1) * per_position


def test_nodes_list_shows_each_cap_and_what_is_used(cluster, deployed):
    env = {**os.environ, **cluster["env"]}
    listed = run_cli("dllmctl", "nodes", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    for span in deployed.spans:
        row = rows[span.node]
        assert row["limits"] == {"memory_bytes": CAP, "threads": 1, "gpus": None}
        assert row["memory_used_bytes"] >= sum(s["param_bytes"] for s in row["serving"]) > 0
    table = run_cli("dllmctl", "nodes", "list", env={**env, "COLUMNS": "250"})
    assert table.returncode == 0 and table.stdout.count("of 4.0 MiB cap") == len(NODES), table.stdout
