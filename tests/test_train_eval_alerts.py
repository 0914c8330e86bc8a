"""Held-out evaluation and alerts through three real daemons.

Evaluation: a data-parallel job's eval loss, perplexity and accuracy equal a local computation of the
same held-out rows with the exported weights, and its training equals one process trained on the
other rows only (the held-out rows were never trained on); a pipeline scores forward through its
stages and a federated job on each client, both equal to the local computation too; --eval-data
scores another dataset; bad settings are refused.

Alerts: failpoints make a NaN and a diverging loss, a slow worker (straggler), a hung worker (stall,
node_hung), a dead worker (node_lost); a huge disk threshold makes disk_low, a small budget
epsilon_budget. The coordinator's [alerts] command receives each as JSON, and so does the user's
own `dllmctl jobs watch --alert-command`.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

from dllmd.alerts import CODES
from dllmd.net.messages import training as S
from dllmd.train.heldout import EvalSums, score_rows, split
from dllmd.train.local import train_locally
from dllmd.train.model import load_causal_lm
from dllmd.train.optim import OptimConfig
from dllmd.train.privacy.accountant import PrivacyAccountant
from tests.conftest import assert_coordinator_refuses, cli_user_cluster, run_cli
from tests.test_cli_inference import _ok
from tests.test_train import _corpus, _max_diff, _restart, _shards, _wait_finished
from tests.tiny_models import make_tiny_model

STEPS, BATCH, MICRO, LR, FRACTION = 4, 6, 2, 1e-4, 0.25
RECORDER = "import sys, uuid, pathlib; pathlib.Path(sys.argv[1], uuid.uuid4().hex).write_bytes(sys.stdin.buffer.read())"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three daemons, the tiny Llama, its corpus on 1 node ("one"), 2 ("two") and 3 ("three"), and
    another dataset on 2 ("other", for --eval-data)."""
    root = tmp_path_factory.mktemp("evalalerts")
    with cli_user_cluster(root, 3) as cluster:
        _ok(run_cli("dllmctl", "model", "import", str(make_tiny_model("llama", root / "src")), "--name", "tiny",
                    "--json"))
        corpus = _corpus(root / "repo")
        other = root / "other"
        other.mkdir()
        for i in range(12):
            (other / f"other{i}.py").write_text(f"class C{i}:\n    value = {i * 3}\n" * (2 + i % 3))
        for name, source, nodes in (("two", corpus, "local-1,local-2"), ("three", corpus, "local-1,local-2,local-3"),
                                    ("other", other, "local-1,local-2"), ("one", corpus, "local-1")):
            _ok(run_cli("dllmctl", "shard-data", str(source), "-m", "tiny", "--strategy", "random", "--seq-len", "32",
                        "--nodes", nodes, "--name", name, "--json"))
        yield cluster


def _keys(cluster: Path) -> dict[str, str]:
    return {n["name"]: n["public_key"] for n in json.loads((cluster / "cluster.json").read_text())["nodes"]}


def _train(dataset: str, nodes: str, *extra: str, steps: int = STEPS, check: bool = True):
    done = run_cli("dllmctl", "train", "-m", "tiny", "-d", dataset, "--nodes", nodes, "--max-steps", str(steps),
                   "--batch-size", str(BATCH), "--micro-batch-size", str(MICRO), "--lr", str(LR), "--json", *extra,
                   timeout=300)
    return _ok(done) if check else done


def _export(job: str, directory: Path) -> torch.nn.Module:
    _ok(run_cli("dllmctl", "checkpoints", "export", job, "--name", directory.name, "--dir", str(directory), "--json"))
    return load_causal_lm(directory, sorted(directory.glob("*.safetensors")))


def _local_eval(model: torch.nn.Module, shards: dict, fraction: float | None) -> dict:
    """The held-out rows (a seeded fraction of each shard, or every row) scored here."""
    rows = []
    for key, shard in shards.items():
        held = split(0, key, shard.tokens.shape[0], fraction)[1] if fraction else range(shard.tokens.shape[0])
        rows += [(key, int(i)) for i in held]
    return score_rows(model, shards, rows, MICRO).metrics()


def _assert_same_eval(reported: dict, local: dict) -> None:
    assert reported["eval_tokens"] == local["eval_tokens"] > 0
    assert math.isclose(reported["eval_loss"], local["eval_loss"], rel_tol=1e-5), (reported, local)
    assert math.isclose(reported["eval_perplexity"], local["eval_perplexity"], rel_tol=1e-4)
    assert abs(reported["eval_accuracy"] - local["eval_accuracy"]) <= 1 / local["eval_tokens"]


def test_data_parallel_eval_equals_local_scoring_of_rows_never_trained_on(cluster, tmp_path):
    keys = _keys(cluster)
    job = _train("two", "local-1,local-2", "--eval-fraction", str(FRACTION), "--eval-every", "2")
    assert job["state"] == "done"
    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json", "--plot", str(tmp_path / "loss.png")))
    assert [("eval_loss" in m) for m in metrics] == [False, True, False, True]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert job["last_eval"]["step"] == STEPS - 1
    shards = _shards(cluster, keys, "two")
    model = _export(job["job"], tmp_path / "dp-eval")
    _assert_same_eval(metrics[-1], _local_eval(model, shards, FRACTION))
    # Training saw only the other rows: one process trained on them alone ends with the same weights.
    trained = {k: s.subset(split(0, k, s.tokens.shape[0], FRACTION)[0]) for k, s in shards.items()}
    reference = train_locally(Path(cluster.parent / "data" / "models" / "tiny"), trained, STEPS, BATCH, MICRO,
                              OptimConfig(lr=LR))
    exported = {n: p.detach() for n, p in model.named_parameters()}
    assert _max_diff({k: exported[k] for k in reference}, reference) <= 1e-5
    table = run_cli("dllmctl", "metrics", job["job"], env={"COLUMNS": "300"})
    assert table.returncode == 0 and "eval ppl" in table.stdout


def test_eval_data_pipeline_and_federated_jobs_evaluate(cluster, tmp_path):
    keys = _keys(cluster)
    job = _train("two", "local-1,local-2", "--eval-data", "other", steps=2)
    model = _export(job["job"], tmp_path / "other-eval")
    _assert_same_eval(job["last_metrics"], _local_eval(model, _shards(cluster, keys, "other"), None))

    diloco = _train("two", "local-1,local-2", "--sync-every", "2", "--eval-fraction", str(FRACTION), steps=4)
    assert diloco["state"] == "done" and diloco["last_eval"]["step"] == 1  # the second outer step

    pipe = _train("two", "local-1,local-2", "--parallelism", "model", "--eval-fraction", str(FRACTION), steps=2)
    assert pipe["state"] == "done" and "eval_loss" in pipe["last_metrics"]
    model = _export(pipe["job"], tmp_path / "pipe-eval")  # the stages' parts merged: the whole model
    _assert_same_eval(pipe["last_metrics"], _local_eval(model, _shards(cluster, keys, "two"), FRACTION))

    fed = _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", "three", "--parallelism", "federated", "--nodes",
                      "local-1,local-2,local-3", "--rounds", "2", "--batch-size", "4", "--micro-batch-size", "2",
                      "--eval-fraction", str(FRACTION), "--eval-every", "1", "--json", timeout=300))
    rounds = _ok(run_cli("dllmctl", "metrics", fed["job"], "--json"))
    assert all("eval_loss" in r for r in rounds)
    model = _export(fed["job"], tmp_path / "fed-eval")
    _assert_same_eval(rounds[-1], _local_eval(model, _shards(cluster, keys, "three"), FRACTION))


@pytest.mark.parametrize("fraction, dataset, every, message", [
    (0.6, None, None, "must be in (0, 0.5]"),
    (0.0, None, None, "must be in (0, 0.5]"),
    (None, None, 2, "held-out data"),
    (None, "missing", None, "no dataset 'missing'"),
    (0.1, "other", None, "not both"),
])
def test_bad_eval_settings_are_refused_by_the_client(cluster, fraction, dataset, every, message):
    from dllmctl.training.jobs import TrainError, eval_options

    with pytest.raises(TrainError, match=re.escape(message)):
        eval_options(fraction, dataset, every, "tiny", "data")


def test_bad_eval_and_alert_settings_are_refused_by_the_cli_and_the_coordinator(cluster):
    for extra, message in ((("--eval-every", "0"), "greater than or equal to 1"),
                           (("--alert-command", "'unclosed"), "--alert-command"),
                           (("--eval-data", "other", "--parallelism", "model"), "use --eval-fraction for pipeline")):
        done = _train("two", "local-1,local-2", *extra, check=False)
        assert done.returncode != 0 and message in done.stderr + done.stdout, done.stderr
    # A client that skips dllmctl's checks meets the coordinator's, as bad_args; no job is created.
    assert_coordinator_refuses(cluster, (
        ({"eval_fraction": 0.7}, "must be in (0, 0.5]"), ({"eval_every": 3}, "held-out data"),
        ({"eval_dataset": "other", "eval_shards": [S.ShardRef(id="x" * 64, node="far", rows=5)]}, "not in the job")))


def _alerts(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.iterdir())] if directory.exists() else []


def test_alerts_reach_the_coordinators_command_and_the_users(cluster, tmp_path):
    received = tmp_path / "received"
    received.mkdir()
    home = cluster / "local-1"
    config = tomllib.loads((home / "node.toml").read_text())
    config["alerts"] = {"command": f"{sys.executable} -c \"{RECORDER}\" {received}", "diverge_factor": 3.0,
                        "diverge_steps": 2, "stall_factor": 3.0, "stall_min_s": 1.0, "straggler_factor": 3.0,
                        "straggler_min_s": 0.6, "disk_min_free_mb": 1e12, "epsilon_fraction": 0.5}
    (home / "node.toml").write_text(tomli_w.dumps(config))
    # local-1 (the coordinator) reports a NaN loss at step 1 and a loss 100 times too high at 3 and 4;
    # local-2 computes slowly at step 2 (a straggler), hangs its daemon at step 5, dies at step 7.
    _restart(cluster, "local-1", "train.loss@1=scale:nan,train.loss@3=scale:100,train.loss@4=scale:100")
    _restart(cluster, "local-2", "train.compute@2=sleep:1.5,train.step@5=sleep:5,train.step@7=exit")
    job = _train("two", "local-1,local-2", "--eval-fraction", str(FRACTION), steps=9, check=False)
    shown = _wait_finished(json.loads(job.stdout)["job"] if job.returncode == 0 else _last_job())
    assert shown["state"] == "done", shown
    kinds = {e["kind"] for e in shown["events"]}
    wanted = {"loss_nan", "loss_diverged", "straggler", "stall", "node_hung", "node_lost", "disk_low"}
    assert {f"alert.{c}" for c in wanted} <= kinds, kinds
    by_code = {}
    for alert in _alerts(received):
        by_code.setdefault(alert["code"], []).append(alert)
    assert wanted <= set(by_code), by_code.keys()
    assert by_code["straggler"][0]["node"] == "local-2" and by_code["node_lost"][0]["node"] == "local-2"
    assert by_code["node_hung"][0]["node"] == "local-2" and by_code["loss_nan"][0]["details"]["step"] == 1
    assert all(a["job"] == shown["job"] and a["severity"] and a["time"] > 0 for a in _alerts(received))

    rows = _shards(cluster, _keys(cluster), "one")
    accountant = PrivacyAccountant(1.0, BATCH / sum(r.tokens.shape[0] for r in rows.values()), 1e-5)
    budget = accountant.epsilon(3) * 1.2  # three steps spend 83% of it: past the alert's 50%, within the budget
    private = _train("one", "local-1", "--dp-clip", "1.0", "--dp-noise-multiplier", "1.0", "--dp-epsilon-budget",
                     f"{budget:.6f}", steps=3)
    assert any(e["kind"] == "alert.epsilon_budget" for e in private["events"])

    mine = tmp_path / "mine"
    mine.mkdir()
    watched = run_cli("dllmctl", "jobs", "watch", shown["job"], "--alert-command",
                      f"{sys.executable} -c \"{RECORDER}\" {mine}", "--json", timeout=60)
    assert watched.returncode == 0, watched.stderr
    assert {a["code"] for a in _alerts(mine)} == {json.loads(line)["code"] for line in watched.stdout.splitlines()}
    assert wanted <= {a["code"] for a in _alerts(mine)} <= set(CODES)
    table = run_cli("dllmctl", "metrics", shown["job"], env={"COLUMNS": "300"})
    assert table.returncode == 0 and "alert node_lost" in table.stdout


def _last_job() -> str:
    return _ok(run_cli("dllmctl", "jobs", "list", "--json"))[-1]["job"]


def test_eval_sums_add_up_to_the_token_weighted_mean():
    a, b = EvalSums(6.0, 3, 1), EvalSums(2.0, 1, 1)
    total = (a + b).metrics()
    assert total["eval_loss"] == 2.0 and total["eval_accuracy"] == 0.5 and total["eval_perplexity"] == math.exp(2.0)
    assert EvalSums().metrics() == {}


def test_delivery_to_a_webhook_and_a_command_and_the_serving_log(tmp_path):
    import http.server
    import threading

    from dllmd.alerts import Alert, AlertError, AlertSettings, AlertSink
    from dllmctl.alerts import recent, record

    bodies = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "out"
        out.mkdir()
        sink = AlertSink.of(AlertSettings(command=f"{sys.executable} -c \"{RECORDER}\" {out}",
                                          webhook=f"http://127.0.0.1:{server.server_port}/hook"))
        alert = Alert.of("node_lost", "tiny", "stage local-2 failed", node="local-2", step=3)
        sink.deliver_now(alert)
        assert bodies == _alerts(out) == [json.loads(alert.to_json())]
        AlertSink(command=f"{sys.executable} -c \"import sys; sys.exit(3)\"", webhook="http://127.0.0.1:9/x",
                  timeout_s=2).deliver_now(alert)  # failures are logged, never raised
    finally:
        server.shutdown()
    record(alert, tmp_path / "alerts.jsonl")
    (tmp_path / "alerts.jsonl").open("a").write("not json\n")
    record(Alert.of("node_lost", "tiny", "again"), tmp_path / "alerts.jsonl")
    assert [a.message for a in recent(path=tmp_path / "alerts.jsonl")] == ["stage local-2 failed", "again"]
    for bad, needle in (({"command": "'open"}, "alerts.command"), ({"webhook": "ftp://x"}, "alerts.webhook"),
                        ({"stall_factor": 1.0}, "above 1"), ({"disk_min_free_mb": -1}, "non-negative"),
                        ({"epsilon_fraction": 2.0}, "epsilon_fraction")):
        with pytest.raises(AlertError, match=re.escape(needle)):
            AlertSettings(**bad)
