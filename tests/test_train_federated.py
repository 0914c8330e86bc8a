"""`dllmctl train --parallelism federated` through real daemons: two of the three nodes belong to
"other organizations" (they know the coordinator only by the federation role, and opened one dataset
to it), the job equals a one-process simulation of the same rounds, no operation sends a token of a
client's rows, the federation role reaches nothing but federated rounds, and stragglers and refused
jobs are handled."""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from dllmd.data.shards import read_shard
from dllmd.net import tap
from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages import training as S
from dllmd.net.schema import parse_args
from dllmd.train.federated.client import ClientModel
from dllmd.train.federated.simulate import simulate_rounds
from dllmd.train.federated.weights import layout_digest
from dllmd.train.privacy.accountant import PrivacyAccountant
from dllmd.train.worker import ShardRows
from tests.conftest import cli_user_cluster, restart_stopped, run_cli
from tests.test_cli_inference import _ok
from tests.test_train import _corpus, _max_diff, _pid, _wait_exited
from tests.test_train_dp import _stored_spec
from tests.tiny_models import make_tiny_model

ORGS = ("local-2", "local-3")  # nodes that authorize the coordinator (local-1) with the federation role only


def _nodes(cluster: Path) -> dict[str, dict]:
    return {n["name"]: n for n in json.loads((cluster / "cluster.json").read_text())["nodes"]}


def _federate(cluster: Path, tap_dir: Path, failpoints: dict[str, str] | None = None) -> None:
    """local-2 and local-3 become other organizations' nodes: the coordinator's key has only the
    federation role there, and only dataset "fed" is open to it; their daemons record what they send."""
    coordinator = _nodes(cluster)["local-1"]["public_key"]
    for name in ORGS:
        home = cluster / name
        config = tomllib.loads((home / "node.toml").read_text())
        config["federated_datasets"] = ["fed"]
        (home / "node.toml").write_text(tomli_w.dumps(config))
        _ok(run_cli("dllmd", "authorize", coordinator, "--role", "federation", "--home", str(home), "--json"))
        pid = _pid(cluster, name)
        os.kill(pid, 15)
        _wait_exited(pid)
        env = {tap.ENV: str(tap_dir / f"{name}.tap")}
        if (failpoints or {}).get(name):
            env["DLLMD_FAILPOINTS"] = failpoints[name]
        _ok(run_cli("dllmctl", "cluster", "restart", name, "--dir", str(cluster), "--json", env=env))


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    """Three local daemons, the tiny model imported and the corpus sharded onto all three as "fed" and
    "closed", shared by the module's tests; each test federates the organizations' nodes itself."""
    root = tmp_path_factory.mktemp("federated")
    with cli_user_cluster(root, 3) as directory:
        _ok(run_cli("dllmctl", "model", "import", str(make_tiny_model("llama", root / "src")), "--name", "tiny",
                    "--json"))
        corpus = _corpus(root / "repo")
        for name in ("fed", "closed"):
            _ok(run_cli("dllmctl", "shard-data", str(corpus), "-m", "tiny", "--strategy", "random", "--seq-len",
                        "32", "--nodes", "local-1,local-2,local-3", "--name", name, "--json"))
        yield directory


@pytest.fixture(autouse=True)
def every_node_running(request):
    yield
    if "cluster3" in request.fixturenames:
        restart_stopped(request.getfixturevalue("cluster3"))


def _shards_of(cluster: Path) -> dict[str, ShardRows]:
    shards = {}
    for name, node in _nodes(cluster).items():
        tokens, meta = read_shard(cluster / name / "datasets" / "fed" / "shard.safetensors")
        shards[node["public_key"]] = ShardRows(tokens, int(meta["tokens"]))
    return shards


def _train(*extra: str, dataset: str = "fed") -> dict:
    return run_cli("dllmctl", "train", "-m", "tiny", "-d", dataset, "--parallelism", "federated",
                   "--nodes", "local-1,local-2,local-3", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
                   "--json", *extra, timeout=300)


def _no_rows_sent(tap_file: Path, shard: ShardRows) -> int:
    """Every message the node sent, searched for any 8 consecutive tokens of its rows (as the int32
    bytes a tensor would carry them in, and as int64); the number of messages looked at."""
    rows = shard.tokens
    windows = set()
    for row in rows:
        for start in range(0, rows.shape[1] - 8, 4):
            piece = row[start:start + 8]
            windows.add(piece.numpy().tobytes())
            windows.add(piece.long().numpy().tobytes())
    count = 0
    for frames in tap.messages(tap_file):
        count += 1
        blob = b"".join(frames)
        for window in windows:
            assert window not in blob, "a client sent tokens of its rows"
    return count


def test_federated_rounds_equal_the_simulation_and_send_no_rows(cluster3, tmp_path):
    shards = _shards_of(cluster3)
    _federate(cluster3, tmp_path)
    job = _ok(_train("--rounds", "3", "--local-steps", "2", "--clients-per-round", "2", "--strategy", "fedavgm",
                     "--proximal-mu", "0.01", "--checkpoint-every", "2"))
    assert job["state"] == "done" and job["step"] == 3, job
    assert job["parallelism"] == "federated"
    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all(len(m["sampled"]) == 2 and len(m["nodes"]) == 2 and m["loss"] > 0 for m in metrics)
    assert all(n["loss_before"] > 0 and n["rows"] > 0 for m in metrics for n in m["nodes"].values())
    shown = run_cli("dllmctl", "jobs", "show", job["job"])
    assert "federated (fedavgm): round 3/3" in shown.stdout and "local-3" in shown.stdout, shown.stdout
    assert "global" in run_cli("dllmctl", "metrics", job["job"]).stdout
    assert job["federation"]["round"] == 3 and sum(c["rounds"] for c in job["federation"]["clients"]) == 6
    exported = tmp_path / "export"
    _ok(run_cli("dllmctl", "checkpoints", "export", job["job"], "--name", "fed-tuned", "--dir", str(exported),
                "--json"))
    spec = parse_args(S.JobSpec, job["spec"])
    reference = simulate_rounds(Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny", shards, spec)
    assert _max_diff(load_file(str(exported / "model.safetensors")), reference) <= 1e-5

    # FedAdam with every client and update clipping: the simulation again.
    adam = _ok(_train("--rounds", "2", "--strategy", "fedadam", "--server-lr", "0.01", "--update-clip", "0.5"))
    assert adam["state"] == "done" and all(len(m["nodes"]) == 3 for m in
                                           _ok(run_cli("dllmctl", "metrics", adam["job"], "--json")))
    _ok(run_cli("dllmctl", "checkpoints", "export", adam["job"], "--name", "fed-adam", "--dir",
                str(tmp_path / "adam"), "--json"))
    reference = simulate_rounds(Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny", shards,
                                parse_args(S.JobSpec, adam["spec"]))
    assert _max_diff(load_file(str(tmp_path / "adam" / "model.safetensors")), reference) <= 1e-5

    # On the wire: the organizations' daemons sent updates, losses and counts, never a token of their rows.
    for name in ORGS:
        key = _nodes(cluster3)[name]["public_key"]
        assert _no_rows_sent(tmp_path / f"{name}.tap", shards[key]) > 10

    # A dataset the organizations did not open is refused before any job exists.
    closed = _train("--rounds", "1", dataset="closed")
    assert closed.returncode != 0 and "not open to federation" in " ".join(closed.stderr.split())
    assert all(j["dataset"] != "closed" for j in _ok(run_cli("dllmctl", "jobs", "list", "--json")))


def test_federation_role_reaches_only_federated_rounds_and_a_job_resumes(cluster3, tmp_path):
    shards = _shards_of(cluster3)
    _federate(cluster3, tmp_path)
    nodes = _nodes(cluster3)
    coordinator = Identity.load(cluster3 / "local-1" / "identity")
    org = nodes["local-2"]
    config = json.loads((Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny" / "config.json").read_text())
    layout = layout_digest(ClientModel.from_config(config).model)
    forbidden = [("data.list", {}), ("model.offer", {"model": "x", "manifest": b"", "signature": b""}),
                 ("train.rows", {"job": "j", "shard": "s"}), ("train.prepare", {"job": "j", "model": "m",
                                                                                "dataset": "fed"}),
                 ("jobs.submit", {}), ("keys.list", {}), ("session.open", {}), ("info", {}),
                 ("peers.ping", {})]

    async def scenario():
        async with RpcClient(coordinator, org["address"], org["public_key"]) as client:
            assert (await client.call("ping"))[0]["pong"]
            for op, args in forbidden:
                with pytest.raises(RemoteError) as exc:
                    await client.call(op, args)
                assert exc.value.code == "forbidden", op
            with pytest.raises(RemoteError) as exc:  # reachable, but only for the datasets opened to it
                await client.call("fed.prepare", {"job": "j", "model": "tiny", "dataset": "closed", "config": {},
                                                  "layout": ""})
            assert exc.value.code == "forbidden" and "not open to federation" in exc.value.message
            with pytest.raises(RemoteError) as exc:  # hostile config: refused, the daemon goes on
                await client.call("fed.prepare", {"job": "j", "model": "tiny", "dataset": "fed",
                                                  "config": {"model_type": "evil_remote_code"}, "layout": ""})
            assert exc.value.code == "bad_args" and "model_type" in exc.value.message
            huge = {**config, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 64}
            with pytest.raises(RemoteError) as exc:  # counted on the meta device, refused before allocation
                await client.call("fed.prepare", {"job": "j", "model": "tiny", "dataset": "fed", "config": huge,
                                                  "layout": ""})
            assert exc.value.code == "bad_args" and "GiB" in exc.value.message
            prepared, _ = await client.call("fed.prepare", {"job": "j", "model": "tiny", "dataset": "fed",
                                                            "config": config, "layout": layout})
            numel = prepared["params"]
            for op, args, tensors, needle in (
                    ("fed.load", {"round": 0, "offset": 0, "total": numel + 1}, [torch.zeros(4)], "elements"),
                    ("fed.load", {"round": 0, "offset": 0, "total": numel}, [torch.zeros(4, dtype=torch.int64)],
                     "float32"),
                    ("fed.load", {"round": 0, "offset": numel - 2, "total": numel}, [torch.zeros(4)], "past the end"),
                    ("fed.load", {"round": 0, "offset": 8, "total": numel}, [torch.zeros(4)], "out of order"),
                    ("fed.train", {"round": 0, "local_steps": 1, "lr": 0.1, "seed": 0}, [], "have not all arrived"),
                    ("fed.update", {"round": 0, "offset": 0, "count": 4}, [], "not trained"),
                    ("fed.secagg_share", {"round": 0, "roster": []}, [], "not trained"),
                    ("fed.load", {"round": 0, "offset": 0, "total": numel}, [], "one flat float32")):
                with pytest.raises(RemoteError) as exc:
                    await client.call(op, {"job": "j", **args}, tensors)
                assert exc.value.code == "bad_args" and needle in exc.value.message, (op, exc.value.message)
            with pytest.raises(RemoteError) as exc:
                await client.call("fed.train", {"job": "nope", "round": 0, "local_steps": 1, "lr": 0.1, "seed": 0})
            assert exc.value.code == "bad_args" and "no federated client" in exc.value.message
            assert (await client.call("fed.release", {"job": "j"}))[0]["released"]
            assert (await client.call("ping"))[0]["pong"]

    asyncio.run(scenario())

    # The coordinator dies as it starts round 2 of 4; resumed from its round-1 checkpoint, the job ends
    # where the simulation of 4 rounds ends.
    pid = _pid(cluster3, "local-1")
    os.kill(pid, 15)
    _wait_exited(pid)
    coordinator = _ok(run_cli("dllmctl", "cluster", "restart", "local-1", "--dir", str(cluster3), "--json",
                              env={"DLLMD_FAILPOINTS": "jobs.step@2=exit"}))["pid"]
    job = _ok(_train("--rounds", "4", "--checkpoint-every", "1", "--strategy", "fedadam", "--server-lr", "0.01",
                     "--detach"))["job"]
    _wait_exited(coordinator)
    _ok(run_cli("dllmctl", "cluster", "restart", "local-1", "--dir", str(cluster3), "--json"))
    resumed = _ok(run_cli("dllmctl", "jobs", "resume", job, "--follow", "--json", timeout=300))
    assert resumed["state"] == "done" and resumed["step"] == 4, resumed
    assert any(e["kind"] == "resumed" and e["message"] == "from step 2" for e in resumed["events"])
    _ok(run_cli("dllmctl", "checkpoints", "export", job, "--name", "fed-resumed", "--dir", str(tmp_path / "r"),
                "--json"))
    reference = simulate_rounds(Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny", shards,
                                parse_args(S.JobSpec, resumed["spec"]))
    assert _max_diff(load_file(str(tmp_path / "r" / "model.safetensors")), reference) <= 1e-5


def test_stragglers_are_left_out_and_bad_jobs_refused(cluster3, tmp_path):
    for args, message in ((("--rounds", "2", "--clients-per-round", "5"), "between 1 and"),
                          (("--rounds", "2", "--min-clients", "3", "--clients-per-round", "2"), "--min-clients"),
                          (("--strategy", "fedsgd", "--rounds", "1"), "--strategy"),
                          ((), "--rounds")):
        done = _train(*args)
        assert done.returncode != 0 and message in " ".join(done.stderr.split()), (args, done.stderr)
    # Client-level DP: Poisson-sampled clients, updates clipped and noised; the job stops at its budget.
    accountant = PrivacyAccountant(1.0, 2 / 3, 1e-5)
    budget = (accountant.epsilon(3) + accountant.epsilon(4)) / 2
    job = _ok(_train("--rounds", "6", "--clients-per-round", "2", "--dp-clip", "0.01", "--dp-noise-multiplier", "1.0",
                     "--dp-epsilon-budget", str(budget)))
    assert job["state"] == "done" and job["step"] == 3, job
    assert any(e["kind"] == "privacy_budget" for e in job["events"])
    assert job["privacy"]["epsilon"] == pytest.approx(accountant.epsilon(3), rel=1e-9)
    assert job["privacy"]["sample_rate"] == pytest.approx(2 / 3) and "dp_seed" not in job["spec"]
    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
    assert [m["epsilon"] for m in metrics] == pytest.approx([accountant.epsilon(r + 1) for r in range(3)], rel=1e-9)
    assert all(c["clipped"] and c["weight"] == pytest.approx(0.5) for m in metrics for c in m["nodes"].values())
    spec = parse_args(S.JobSpec, _stored_spec(cluster3, job["job"]))  # with the secret seed only the coordinator has
    spec.rounds = 3  # what ran before the budget stopped it
    _ok(run_cli("dllmctl", "checkpoints", "export", job["job"], "--name", "fed-dp", "--dir", str(tmp_path / "dp"),
                "--json"))
    reference = simulate_rounds(Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny", _shards_of(cluster3), spec)
    assert _max_diff(load_file(str(tmp_path / "dp" / "model.safetensors")), reference) <= 1e-5

    # local-3 takes far longer than the round allows: the round closes with the two others.
    pid = _pid(cluster3, "local-3")
    os.kill(pid, 15)
    _wait_exited(pid)
    _ok(run_cli("dllmctl", "cluster", "restart", "local-3", "--dir", str(cluster3), "--json",
                env={"DLLMD_FAILPOINTS": "fed.train@1=sleep:35"}))
    job = _ok(_train("--rounds", "3", "--round-timeout", "20", "--min-clients", "2"))
    assert job["state"] == "done", job
    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
    assert sorted(metrics[0]["nodes"]) == ["local-1", "local-2", "local-3"]
    assert sorted(metrics[1]["nodes"]) == ["local-1", "local-2"] and metrics[1]["stragglers"] == ["local-3"]
    # Round 2 may or may not wait out local-3's late round 1 (a busy machine decides): the others are in it.
    assert {"local-1", "local-2"} <= set(metrics[2]["nodes"])
    assert any(e["kind"] == "straggler" and "local-3" in e["message"] for e in job["events"])


def _restart(cluster: Path, name: str, failpoints: str = "") -> None:
    pid = _pid(cluster, name)
    os.kill(pid, 15)
    _wait_exited(pid)
    _ok(run_cli("dllmctl", "cluster", "restart", name, "--dir", str(cluster), "--json",
                env={"DLLMD_FAILPOINTS": failpoints} if failpoints else None))


def test_secure_aggregation_sums_recovers_a_death_after_masking_and_fails_cleanly(cluster3, tmp_path):
    shards = _shards_of(cluster3)
    # local-3 (another organization's node) dies when asked to unmask round 1: after its masked update left.
    _federate(cluster3, tmp_path, failpoints={"local-3": "fed.unmask@1=exit"})
    secure = ("--secure-aggregation", "--update-clip", "1.0", "--local-steps", "2")
    job = _ok(_train("--rounds", "2", *secure))
    assert job["state"] == "done" and job["federation"]["secure_aggregation"], job
    assert "failpoint fed.unmask@1" in (cluster3 / "local-3" / "dllmd.log").read_text()
    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
    assert [sorted(m["nodes"]) for m in metrics] == [["local-1", "local-2", "local-3"]] * 2  # its update counted
    assert not any(e["kind"] == "secagg_failed" for e in job["events"])
    # The masked sum equals the plain one within the fixed-point step: the simulation's weights.
    _ok(run_cli("dllmctl", "checkpoints", "export", job["job"], "--name", "fed-secure", "--dir",
                str(tmp_path / "secure"), "--json"))
    reference = simulate_rounds(Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny", shards,
                                parse_args(S.JobSpec, job["spec"]))
    assert _max_diff(load_file(str(tmp_path / "secure" / "model.safetensors")), reference) <= 1e-5

    # Two of three die at the unmask of round 0: local-1's seed has one share left of the two needed.
    _restart(cluster3, "local-2", "fed.unmask@0=exit")
    _ok(run_cli("dllmctl", "cluster", "restart", "local-3", "--dir", str(cluster3), "--json",
                env={"DLLMD_FAILPOINTS": "fed.unmask@0=exit"}))
    failed = _train("--rounds", "2", *secure)
    assert failed.returncode != 0
    shown = _ok(run_cli("dllmctl", "jobs", "show", json.loads(failed.stdout)["job"], "--json"))
    assert shown["state"] == "failed" and "needs at least 3" in shown["error"], shown
    event = next(e for e in shown["events"] if e["kind"] == "secagg_failed")
    assert "round 0: too_few_shares" in event["message"] and "cannot be recovered" in event["message"], event


def test_bench_federated_reports_bytes_secure_aggregation_cost_and_loss(user, tmp_path):
    _ok(run_cli("dllmctl", "model", "import", str(make_tiny_model("llama", tmp_path / "src")), "--name", "tiny",
                "--json"))
    report = _ok(run_cli("dllmctl", "bench", "train", "-m", "tiny", "--parallelism", "federated", "--rounds", "2",
                         "--local-steps", "2", "--seq-len", "32", "--json", timeout=300))
    b = report["bytes_per_round_per_client"]
    assert report["clients"] == 3 and b["plain"] > 0 and b["secure"] == b["plain"] + b["secure_aggregation_protocol"]
    assert 0 < b["secure_aggregation_protocol"] < b["plain"] / 10
    loss = report["heldout_loss"]
    assert loss["federated"] < loss["untrained"] and loss["data_parallel"] < loss["untrained"]
    assert loss["federated_secure"] == pytest.approx(loss["federated"], abs=1e-3)  # the masked sum is the sum
