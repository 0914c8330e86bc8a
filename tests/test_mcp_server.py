"""``dllmctl mcp`` spawned by the official MCP SDK's stdio client, against three real local daemons:
every tool and every resource. Inference equals ``dllmctl infer``; a data shard places a dataset;
training jobs on the tiny model (a pipeline, then data-parallel) run to the end; an unbuilt parallelism
is a tool error; long tools send rising progress notifications."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from tests.api_cluster import MODEL, infer, start_user_cluster, stop_user_cluster

pytest.importorskip("mcp")
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

TOOLS = {"llm_inference_distributed", "llm_train_distributed", "llm_data_shard"}
RESOURCES = {"llm://models", "llm://nodes", "llm://performance", "training://jobs", "training://data_shards",
             "training://checkpoints", "training://metrics", "llm://alerts"}
TEMPLATES = {"training://jobs/{job_id}", "training://data_shards/{dataset}", "training://checkpoints/{job_id}",
             "training://metrics/{job_id}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcp")
    env = start_user_cluster(root)
    yield root, env
    stop_user_cluster(root, env)


def _corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(30):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 5))
    return root


class Session:
    """A ClientSession with helpers: tool results as dicts, resources as parsed JSON, progress kept."""

    def __init__(self, session: ClientSession):
        self.session = session

    async def call(self, tool: str, **arguments) -> tuple[dict | str, bool, list[tuple]]:
        progress: list[tuple] = []

        async def heard(value, total, message):
            progress.append((value, total, message))

        result = await self.session.call_tool(tool, arguments, progress_callback=heard, read_timeout_seconds=300)
        if result.is_error:
            return result.content[0].text, True, progress
        return result.structured_content, False, progress

    async def read(self, uri: str):
        result = await self.session.read_resource(uri)
        return json.loads(result.contents[0].text)


def _rising(progress: list[tuple]) -> bool:
    values = [p[0] for p in progress]
    return bool(values) and all(b > a for a, b in zip(values, values[1:]))


def test_every_tool_and_resource(cluster):
    root, env = cluster
    want = infer(env, "Hello there", "--max-new-tokens", "10")
    corpus = _corpus(root / "repo")
    params = StdioServerParameters(command=sys.executable, args=["-m", "dllmctl", "mcp"],
                                   env={**os.environ, **env}, cwd=str(root))

    async def scenario():
        with open(root / "mcp.log", "w") as errlog:  # the server's stderr: its logs
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as raw:
                    await raw.initialize()
                    await _check(Session(raw), want, corpus)

    asyncio.run(asyncio.wait_for(scenario(), 240))
    assert "Traceback" not in (root / "mcp.log").read_text()


async def _check(s: Session, want: dict, corpus: Path) -> None:
    listed = await s.session.list_tools()
    assert {t.name for t in listed.tools} == TOOLS
    schema = next(t for t in listed.tools if t.name == "llm_train_distributed").input_schema
    assert {"model_config", "training_data", "parallelism", "nodes", "epochs", "batch_size"} <= set(schema["properties"])
    assert {r.uri for r in (await s.session.list_resources()).resources} == RESOURCES
    assert {t.uri_template for t in (await s.session.list_resource_templates()).resource_templates} == TEMPLATES

    # --- inference: the text of dllmctl infer, progress per token ---------------------------------
    out, error, progress = await s.call("llm_inference_distributed", prompt="Hello there", model_name=MODEL,
                                        max_new_tokens=10)
    assert not error, out
    assert out["text"] == want["text"] and out["token_ids"] == want["token_ids"]
    assert out["prompt_tokens"] == want["prompt_tokens"] and out["completion_tokens"] == want["new_tokens"]
    assert [r["node"] for r in out["route"]] == ["local-1", "local-2", "local-3"]
    assert _rising(progress) and progress[-1][0] == out["completion_tokens"] and progress[-1][1] == 10
    for parallelism in ("tensor", "hybrid"):
        # Every node serves the pipeline layout, and a new layout never silently replaces it.
        text, error, _ = await s.call("llm_inference_distributed", prompt="hi", model_name=MODEL,
                                      parallelism=parallelism)
        assert error and f"no {parallelism} layout" in text and "already serve" in text, text
    for arguments, needle in (({"model_name": "ghost"}, "no model 'ghost'"),
                              ({"model_name": MODEL, "nodes": ["local-1"]}, "could not serve"),
                              ({"model_name": MODEL, "nodes": ["nobody"]}, "unknown node"),
                              ({"model_name": MODEL, "parallelism": "bogus"}, "parallelism"),
                              ({"model_name": MODEL, "max_new_tokens": 0}, "max_new_tokens")):
        text, error, _ = await s.call("llm_inference_distributed", prompt="hi", **arguments)
        assert error and needle in text, (arguments, text)

    models = {m["name"]: m for m in await s.read("llm://models")}
    assert models[MODEL]["can_generate"] and models[MODEL]["layers"] == 5
    assert sorted((sp["node"], sp["start"], sp["end"]) for sp in models[MODEL]["spans"])[0][1] == 0
    assert models[MODEL]["coverage"] == [{"start": 0, "end": 5, "count": 1}]
    nodes = await s.read("llm://nodes")
    assert [n["name"] for n in nodes] == ["local-1", "local-2", "local-3"] and {n["status"] for n in nodes} == {"up"}
    performance = await s.read("llm://performance")
    assert all(n["matmul_gflops"] > 0 and n["latency_ms"] > 0 for n in performance["nodes"])
    assert all(sp["passes"] > 0 and sp["step_ms"] > 0 for n in performance["nodes"] for sp in n["spans"])
    assert performance["inference"]["count"] == 1 and performance["inference"]["median_tokens_per_second"] > 0
    # The sampling parameters are dllmctl infer's: greedy with a penalty, cut at a stop string.
    full, error, _ = await s.call("llm_inference_distributed", prompt="Hello there", model_name=MODEL,
                                  max_new_tokens=10, temperature=0, repetition_penalty=1.5)
    assert not error, full
    stop = full["text"][len(full["text"]) // 2:][:3]
    cut, error, _ = await s.call("llm_inference_distributed", prompt="Hello there", model_name=MODEL,
                                 max_new_tokens=10, temperature=0, repetition_penalty=1.5, stop=[stop])
    assert not error and cut["finish_reason"] == "stop" and cut["text"] == full["text"][:full["text"].index(stop)]
    assert cut["token_ids"] == full["token_ids"][:len(cut["token_ids"])] and cut["seed"] == 0
    text, error, _ = await s.call("llm_inference_distributed", prompt="hi", model_name=MODEL, stop=["a"] * 5)
    assert error and "stop" in text, text

    # --- data: shard a code directory onto two nodes ----------------------------------------------
    out, error, progress = await s.call("llm_data_shard", data_uri=str(corpus), model_name=MODEL,
                                        shard_strategy="random", nodes=["local-1", "local-2"], name="code", seq_len=32)
    assert not error, out
    assert out["dataset"] == "code" and [r["node"] for r in out["nodes"]] == ["local-1", "local-2"]
    assert out["samples"] == 30 and all(r["sequences"] > 0 for r in out["nodes"])
    assert _rising(progress) and progress[-1][0] == progress[-1][1] == 6  # 4 stages + a push per node
    shards = await s.read("training://data_shards")
    assert [d["dataset"] for d in shards["datasets"]] == ["code"]
    one = await s.read("training://data_shards/code")
    assert all(row["present"] for row in one["nodes"])
    for arguments, needle in (({"data_uri": str(corpus / "missing")}, "missing"),
                              ({"data_uri": str(corpus), "shard_strategy": "alphabetical"}, "shard_strategy"),
                              ({"data_uri": str(corpus), "model_name": "ghost"}, "no model 'ghost'")):
        text, error, _ = await s.call("llm_data_shard", **{"model_name": MODEL, **arguments})
        assert error and needle in text, (arguments, text)
    # local_only asks the nodes, which may run as someone else: they read only under their data_roots,
    # and the corpus (or the nodes' own homes, their keys) is not under them.
    for path in (corpus, corpus.parent / "cluster" / "local-1"):
        text, error, _ = await s.call("llm_data_shard", data_uri=str(path), model_name=MODEL, local_only=True,
                                      name="stolen")
        assert error and "forbidden: " in text and "data_roots" in text and "no node's data was changed" in text, text

    # --- training: a federated job, a pipeline job, then a data-parallel job to the end ---
    text, error, _ = await s.call("llm_train_distributed", model_config=MODEL, training_data="code",
                                  parallelism="federated")
    assert error and "needs nodes" in text
    text, error, _ = await s.call("llm_train_distributed", model_config=MODEL, training_data="code",
                                  parallelism="federated", nodes=["local-1", "local-2"])
    assert error and "needs --rounds" in text
    federated, error, _ = await s.call("llm_train_distributed", training_data="code", batch_size=4,
                                       parallelism="federated", nodes=["local-1", "local-2"],
                                       model_config={"name": MODEL, "rounds": 2, "local_steps": 2,
                                                     "strategy": "fedavgm", "micro_batch_size": 2})
    assert not error and federated["parallelism"] == "federated" and federated["total_steps"] == 2, federated
    text, error, _ = await s.call("llm_train_distributed", model_config={"name": MODEL, "pp": 3}, training_data="code",
                                  parallelism="model")
    assert error and "--pp 3 needs 3 nodes" in text
    out, error, _ = await s.call("llm_train_distributed", training_data="code", batch_size=4, parallelism="model",
                                 model_config={"name": MODEL, "max_steps": 2, "micro_batch_size": 2,
                                               "schedule": "gpipe", "stage_layers": [3, 2]})
    assert not error and out["parallelism"] == "model", out
    deadline = time.monotonic() + 120
    while (shown := await s.read(f"training://jobs/{out['job']}"))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.5)
    assert shown["state"] == "done" and [(n["stage"], n["start"], n["end"]) for n in shown["stages"]] == \
        [(0, 0, 3), (1, 3, 5)], shown
    while (shown := await s.read(f"training://jobs/{federated['job']}"))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.5)
    assert shown["state"] == "done" and shown["federation"]["round"] == 2, shown
    assert [c["node"] for c in shown["federation"]["clients"]] == ["local-1", "local-2"]
    for config, needle in (({"name": MODEL, "learning_rate": 1}, "learning_rate"),
                           ({"lr": 1e-4}, "must name a model"),
                           ({"name": MODEL, "seq_len": 64}, "packed into sequences of 32"),
                           ({"name": MODEL, "dp_clip": 1.0}, "clipping without noise is not differential privacy"),
                           ({"name": MODEL, "dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1.0}, "dp_delta"),
                           ({"name": MODEL, "eval_fraction": 0.9}, "--eval-fraction must be in (0, 0.5]")):
        text, error, _ = await s.call("llm_train_distributed", model_config=config, training_data="code")
        assert error and needle in text, (config, text)
    text, error, _ = await s.call("llm_train_distributed", model_config=MODEL, training_data="nothing")
    assert error and "no dataset 'nothing'" in text

    out, error, progress = await s.call("llm_train_distributed", training_data="code", batch_size=4,
                                        model_config={"name": MODEL, "max_steps": 3, "checkpoint_every": 2,
                                                      "micro_batch_size": 2, "seq_len": 32, "eval_fraction": 0.2})
    assert not error, out
    job = out["job"]
    assert out["total_steps"] == 3 and out["coordinator"] == "local-1" and out["nodes"] == ["local-1", "local-2"]
    assert _rising(progress) and progress[-1][0] == progress[-1][1] == 3
    assert progress[0] == (0, 3, "checking nodes")  # then the model shipped (bytes), replicas loading
    deadline = time.monotonic() + 120
    while (shown := await s.read(f"training://jobs/{job}"))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.5)
    assert shown["state"] == "done" and shown["step"] == 3 and shown["coordinator"] == "local-1", shown
    assert job in {j["job"] for j in (await s.read("training://jobs"))["jobs"]}
    metrics = await s.read(f"training://metrics/{job}")
    assert [m["step"] for m in metrics["metrics"]] == [0, 1, 2]
    assert ["eval_loss" in m for m in metrics["metrics"]] == [False, True, True] and metrics["alerts"] == []
    assert math.isfinite(metrics["metrics"][-1]["eval_perplexity"]) and (await s.read("llm://alerts"))["alerts"] == []
    assert all(math.isfinite(m["loss"]) and m["loss"] > 0 and m["tokens_per_s"] > 0 for m in metrics["metrics"])
    latest = {j["job"]: j for j in (await s.read("training://metrics"))["jobs"]}
    assert latest[job]["last"]["step"] == 2
    assert [c["step"] for c in (await s.read(f"training://checkpoints/{job}"))["checkpoints"]] == [2, 3]
    assert [c["step"] for c in (await s.read("training://checkpoints"))["checkpoints"][job]] == [2, 3]
    assert (await s.read("llm://performance"))["training"][-1]["tokens_per_s"] > 0

    with pytest.raises(MCPError, match="no reachable node coordinates job"):
        await s.read("training://jobs/job-that-never-was")
