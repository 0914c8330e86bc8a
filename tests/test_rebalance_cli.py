"""``dllmctl rebalance`` through real daemons: a node joins (the second replica is filled), a node
leaves (its layers go to a survivor), and greedy generation gives the same tokens throughout; with
``--throughput`` (plan, deploy, rebalance) nodes that hold the whole model become replicas."""

from __future__ import annotations

import json

from dllmctl.placement.capacity import capacities_for, current_replicas, live_spans, served_dtype, unload_first
from dllmctl.placement.layout import Layout, ModelShape, Span
from dllmctl.placement.rebalance import Move, Rebalance
from tests.conftest import run_cli
from tests.test_cli_inference import cluster3  # noqa: F401 (a fixture)
from tests.tiny_models import make_tiny_model

PROMPT = ["infer", "The quick brown fox", "-m", "tiny", "--raw", "--max-new-tokens", "8", "--temperature", "0",
          "--json"]


def _ok(*args):
    done = run_cli("dllmctl", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args else done.stdout


def _spans(doc):
    return sorted((s["node"], s["start"], s["end"]) for s in doc["spans"])


def test_rebalance_after_a_join_and_a_leave(cluster3, tmp_path):  # noqa: F811
    _ok("model", "import", str(make_tiny_model("mistral", tmp_path / "src")), "--name", "tiny", "--json")
    plan = {"model": "tiny", "spans": [{"node": "local-1", "start": 0, "end": 3, "embed": True, "head": False},
                                       {"node": "local-2", "start": 3, "end": 7, "embed": False, "head": True}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    _ok("deploy", "tiny", "--plan", str(tmp_path / "plan.json"), "--json")
    tokens = _ok(*PROMPT)["token_ids"]

    joined = _ok("rebalance", "tiny", "--replicas", "2", "--apply", "--json")
    assert joined["moves"] == [{"node": "local-3", "from": None, "to": [0, 7]}] and joined["moved_layers"] == 7
    assert [(r["node"], r["start"], r["end"]) for r in joined["deployed"]] == [("local-3", 0, 7)]
    assert _ok("nodes", "coverage", "--json") == [{"model": "tiny", "num_layers": 7, "complete": True,
                                                   "runs": [{"start": 0, "end": 7, "count": 2}]}]
    assert "tiny: layers 0-6 x2" in _ok("nodes", "list")

    _ok("nodes", "remove", "local-2")  # gone for the cluster; the replica count stays at two
    left = _ok("rebalance", "tiny", "--apply", "--json")
    assert left["replicas"] == 2 and left["moved_layers"] == 4
    assert left["moves"] == [{"node": "local-1", "from": [0, 3], "to": [0, 7]}]
    assert _spans(left) == [("local-1", 0, 7), ("local-3", 0, 7)] and left["unloaded"] == {}
    assert _ok("rebalance", "tiny", "--json")["moves"] == []  # applied: nothing left to do
    assert _ok(*PROMPT)["token_ids"] == tokens

    done = run_cli("dllmctl", "rebalance", "tiny", "--replicas", "3")
    assert done.returncode == 1 and "3 replicas need at least 3 nodes" in done.stderr, done.stderr


def _holders(doc, layers):
    """How many nodes hold each layer."""
    held = [0] * layers
    for s in doc["spans"]:
        for layer in range(s["start"], s["end"]):
            held[layer] += 1
    return held


def test_throughput_plans_make_a_replica_of_each_node_that_holds_the_model(cluster3, tmp_path):  # noqa: F811
    _ok("model", "import", str(make_tiny_model("llama", tmp_path / "src")), "--name", "tiny", "--json")
    plan = _ok("plan", "tiny", "--throughput", "--json")
    # Every node holds the whole tiny model: three replicas beat one chain of three (a tie in compute,
    # and a replica serves a session without a hop).
    n = max(s["end"] for s in plan["spans"])
    assert plan["replicas"] == 3 and _spans(plan) == [(f"local-{i}", 0, n) for i in (1, 2, 3)]
    assert set(plan["throughput"]) == {"modelled_tokens_per_second", "bound_tokens_per_second", "fraction_of_bound"}
    assert "3 chain(s)" in _ok("plan", "tiny", "--throughput")
    refused = run_cli("dllmctl", "plan", "tiny", "--throughput", "--parallelism", "tensor")
    assert refused.returncode == 1 and "--throughput plans pipeline chains" in refused.stderr

    # Deploy on two of the nodes, then let the third join: the rebalancer adds it as a replica.
    home = json.loads(run_cli("dllmd", "id", "--home", str(cluster3 / "local-3"), "--json").stdout)
    address = next(r["address"] for r in _ok("nodes", "list", "--json") if r["name"] == "local-3")
    _ok("nodes", "remove", "local-3")
    deployed = _ok("deploy", "tiny", "--throughput", "--json")
    assert sorted((r["node"], r["start"], r["end"]) for r in deployed) == [("local-1", 0, n), ("local-2", 0, n)]
    tokens = _ok(*PROMPT)["token_ids"]
    _ok("nodes", "add", address, "--key", home["public_key"], "--name", "local-3", "--json")
    # Two replicas hold 2/3 of what three nodes allow; the fewest moves past 90% put local-3 to work
    # (taking layers off one replica).
    joined = _ok("rebalance", "tiny", "--throughput", "--apply", "--json")
    assert {"node": "local-3", "from": None} in [{k: m[k] for k in ("node", "from")} for m in joined["moves"]]
    assert joined["throughput"]["fraction_of_bound"] >= 0.9 and joined["how"]
    assert min(_holders(joined, n)) >= 2 and "local-3" in {r["node"] for r in joined["deployed"]}
    assert _ok(*PROMPT)["token_ids"] == tokens
    assert _ok("rebalance", "tiny", "--throughput", "--json")["moves"] == []  # applied: nothing left to do


# --- the glue between live rows and the planner (pure) ---------------------------------------------

MB = 2**20


def _row(name, free_mb, serving=(), status="up"):
    hardware = {"gpus": [], "ram_available": free_mb * MB, "matmul_gflops": 100.0}
    return {"name": name, "status": status, "hardware": hardware if status == "up" else None,
            "serving": [{"model": "tiny", "start": a, "end": b, "embed": a == 0, "head": b == 7, "dtype": dtype,
                         "param_bytes": (b - a) * MB} for a, b, dtype in serving]}


ROWS = [_row("a", 100, [(0, 3, "float32")]), _row("b", 1, [(3, 7, "bfloat16")]), _row("c", 50),
        _row("gone", 0, [(0, 7, "bfloat16")], status="down")]


def test_capacities_count_the_replaced_span_as_free_and_skip_nodes_that_are_down():
    assert [(c.name, c.free_memory_bytes // MB) for c in capacities_for(ROWS, "tiny")] == [("a", 103), ("b", 5),
                                                                                          ("c", 50)]


def test_live_spans_replicas_and_dtype_come_from_the_nodes_that_are_up():
    shape = ModelShape.uniform("tiny", 7, MB, MB, MB)
    current = live_spans(shape, ROWS, "tiny")
    assert [(s.node, s.start, s.end) for s in current] == [("a", 0, 3), ("b", 3, 7)]
    assert current_replicas(shape, current) == 1 and current_replicas(shape, []) == 1
    assert served_dtype(ROWS, "tiny") == "bfloat16"  # a tie between float32 and bfloat16: by name
    assert served_dtype(ROWS, "other") == ""


def test_a_node_whose_new_span_does_not_fit_beside_the_old_one_unloads_first():
    spans = [Span("a", 0, 4, True, False, 60 * MB), Span("b", 4, 7, False, True, 3 * MB),
             Span("c", 0, 7, True, True, 40 * MB)]
    result = Rebalance(Layout("tiny", 2, spans), [Move("a", (0, 3), (0, 4)), Move("b", (3, 7), (4, 7)),
                                                  Move("c", None, (0, 7))])
    # a: 60 MiB fits in 80 % of 100 MiB; b: 3 MiB does not fit in 80 % of 1 MiB; c holds nothing now.
    assert unload_first(result, ROWS) == {"b"}
