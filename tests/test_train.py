"""`dllmctl train` through real daemons: data-parallel weights equal single-process training on 2 and
3 nodes, a checkpoint exports into the model store and serves `dllmctl infer`, a resumed job ends where
an uninterrupted one ends, two nodes killed at once mid-job are survived (both deaths are failpoints, at an exact
step, not kills racing the job), and bad jobs are refused up front."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dllmd.data.shards import read_shard
from dllmd.train.local import train_locally
from dllmd.train.optim import OptimConfig
from dllmd.train.worker import ShardRows
from tests.conftest import cli_user_cluster, restart_stopped, run_cli
from tests.test_cli_inference import _ok
from tests.tiny_models import make_tiny_model

STEPS, BATCH, MICRO, LR = 4, 6, 2, 1e-4  # a usual fine-tuning rate


def _corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(40):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 5))
    return root


def import_and_shard(root: Path, datasets: dict[str, str]) -> None:
    """Import the tiny Llama as ``tiny`` and shard the corpus onto each dataset's nodes (name -> nodes)."""
    _ok(run_cli("dllmctl", "model", "import", str(make_tiny_model("llama", root / "src")), "--name", "tiny", "--json"))
    corpus = _corpus(root / "repo")
    for name, nodes in datasets.items():
        _ok(run_cli("dllmctl", "shard-data", str(corpus), "-m", "tiny", "--strategy", "random", "--seq-len", "32",
                    "--nodes", nodes, "--name", name, "--json"))


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    """Three local daemons, the tiny model imported and the corpus sharded onto 2 and onto 3 of them,
    shared by the module's tests (each names its exports and jobs apart)."""
    root = tmp_path_factory.mktemp("train")
    with cli_user_cluster(root, 3) as directory:
        import_and_shard(root, {"two": "local-1,local-2", "three": "local-1,local-2,local-3"})
        yield directory


@pytest.fixture(autouse=True)
def every_node_running(cluster3):
    """A test that kills or hangs nodes leaves the next one a whole cluster: what it left down starts again."""
    yield
    restart_stopped(cluster3)


def _keys(cluster: Path) -> dict[str, str]:
    """Node name -> public key."""
    state = json.loads((cluster / "cluster.json").read_text())["nodes"]
    return {n["name"]: n["public_key"] for n in state}


def _shards(cluster: Path, keys: dict[str, str], dataset: str) -> dict[str, ShardRows]:
    shards = {}
    for name, key in keys.items():
        path = cluster / name / "datasets" / dataset / "shard.safetensors"
        if path.exists():
            tokens, meta = read_shard(path)
            shards[key] = ShardRows(tokens, int(meta["tokens"]))
    return shards


def _reference(model_dir: Path, shards: dict[str, ShardRows], steps: int) -> dict:
    """The same training in one process: same global batches, same loss, same AdamW."""
    return train_locally(model_dir, shards, steps, BATCH, MICRO, OptimConfig(lr=LR))


def _max_diff(exported: dict, reference: dict) -> float:
    assert set(exported) == set(reference)
    worst = max(reference, key=lambda k: float((exported[k] - reference[k]).abs().max()))
    diff = float((exported[worst] - reference[worst]).abs().max())
    print(f"max abs difference {diff:.3g} in {worst}")
    return diff


def _train(dataset: str, nodes: str, *extra: str) -> dict:
    return _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", dataset, "--nodes", nodes, "--max-steps", str(STEPS),
                       "--batch-size", str(BATCH), "--micro-batch-size", str(MICRO), "--lr", str(LR), "--json", *extra,
                       timeout=300))


def _export(job: str, name: str, directory: Path) -> dict:
    _ok(run_cli("dllmctl", "checkpoints", "export", job, "--name", name, "--dir", str(directory), "--json"))
    return load_file(str(directory / "model.safetensors"))


def test_data_parallel_equals_single_process_and_exports(cluster3, tmp_path):
    keys = _keys(cluster3)
    store_dir = Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny"
    for dataset, nodes, backend in (("two", "local-1,local-2", "torch"), ("two", "local-1,local-2", "zmq"),
                                    ("three", "local-1,local-2,local-3", "zmq")):
        job = _train(dataset, nodes, "--backend", backend)
        assert job["state"] == "done" and job["step"] == STEPS
        assert len(job["last_metrics"]["nodes"]) == len(nodes.split(","))
        weights = _export(job["job"], f"tuned-{dataset}", tmp_path / f"export-{dataset}")
        reference = _reference(store_dir, _shards(cluster3, keys, dataset), STEPS)
        assert _max_diff(weights, reference) <= 1e-5, (dataset, backend)

    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json", "--plot", str(tmp_path / "loss.png")))
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 and m["comm_s"] >= 0 for m in metrics)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = _ok(run_cli("dllmctl", "jobs", "list", "--json"))
    assert {j["job"] for j in listed} >= {job["job"]} and all(j["coordinator"] == "local-1" for j in listed)
    assert _ok(run_cli("dllmctl", "checkpoints", "list", job["job"], "--json"))[-1]["step"] == STEPS

    # The fine-tuned model is a model like any other: deploy it and generate with it.
    _ok(run_cli("dllmctl", "deploy", "tuned-three", "--json"))
    answer = _ok(run_cli("dllmctl", "infer", "def f(x):", "-m", "tuned-three", "--raw", "--max-new-tokens", "4",
                         "--temperature", "0", "--json"))
    exported = tmp_path / "export-three"  # a transformers directory: the same greedy tokens locally
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    want = AutoModelForCausalLM.from_pretrained(exported).eval().generate(
        ids, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    assert answer["token_ids"] == want


def test_resume_ends_where_an_uninterrupted_run_ends(cluster3, tmp_path):
    steps = 36  # past an epoch boundary (~28 steps); the failpoint, not the length, puts the kill mid-job
    common = ("--max-steps", str(steps), "--batch-size", "4", "--micro-batch-size", "2", "--lr", str(LR),
              "--checkpoint-every", "12", "--json")
    straight = _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", "two", "--nodes", "local-1,local-2", *common,
                           timeout=300))
    # The coordinator dies as it starts step 30, as a power cut would stop it: armed, not raced.
    coordinator = _restart(cluster3, "local-1", failpoints="jobs.step@30=exit")
    started = _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", "two", "--nodes", "local-1,local-2", "--detach",
                          *common))
    job = started["job"]
    _wait_exited(coordinator)
    assert "failpoint jobs.step@30" in (cluster3 / "local-1" / "dllmd.log").read_text()
    # While the coordinator is down, the other worker goes for good: the resumed job goes on without it,
    # its shard read from the spare the coordinator's node kept on disk through its own crash.
    worker = _pid(cluster3, "local-2")
    os.kill(worker, signal.SIGKILL)
    _wait_exited(worker)
    assert list((cluster3 / "local-1" / "jobs" / job / "spares").glob("*.safetensors"))
    _restart(cluster3, "local-1")  # disarmed; the restart marks the job interrupted
    shown = _ok(run_cli("dllmctl", "jobs", "show", job, "--json"))
    assert shown["state"] == "interrupted" and shown["step"] == 30, shown
    resumed = _ok(run_cli("dllmctl", "jobs", "resume", job, "--follow", "--json", timeout=300))
    assert resumed["state"] == "done" and resumed["step"] == steps
    kinds = [e["kind"] for e in resumed["events"]]
    assert any(e["kind"] == "resumed" and e["message"] == "from step 24" for e in resumed["events"])
    assert "resumed_without" in kinds and "shard_moved" in kinds
    assert sorted(resumed["last_metrics"]["nodes"]) == ["local-1"]
    a = _export(straight["job"], "straight", tmp_path / "a")
    b = _export(job, "resumed", tmp_path / "b")
    assert _max_diff(a, b) <= 1e-6
    _restart(cluster3, "local-2")


def _pid(cluster: Path, name: str) -> int:
    return next(n["pid"] for n in json.loads((cluster / "cluster.json").read_text())["nodes"] if n["name"] == name)


def _wait_exited(pid: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} is still running after {timeout:.0f} s")


def _restart(cluster: Path, name: str, failpoints: str = "") -> int:
    """Start node ``name`` again (stopping it first if it runs), with these failpoints armed; its pid."""
    pid = _pid(cluster, name)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _wait_exited(pid)
    env = {"DLLMD_FAILPOINTS": failpoints} if failpoints else None
    return _ok(run_cli("dllmctl", "cluster", "restart", name, "--dir", str(cluster), "--json", env=env))["pid"]


def _wait_finished(job: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (shown := _ok(run_cli("dllmctl", "jobs", "show", job, "--json")))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {job} still {shown['state']} after {timeout:.0f} s"
        time.sleep(0.5)
    return shown


def test_two_nodes_killed_at_once_mid_job_are_survived(cluster3, tmp_path):
    """local-2 and local-3, ring neighbours, die as they start step 5: local-1 holds spare copies of
    both their shards (--shard-copies 2 by default, on disk) and finishes the job alone."""
    keys = _keys(cluster3)
    steps = 30  # past an epoch boundary (~19 steps); the failpoint, not the length, puts the kill mid-job
    lost = [_restart(cluster3, name, failpoints="train.step@5=exit") for name in ("local-2", "local-3")]
    started = _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", "three", "--nodes", "local-1,local-2,local-3",
                          "--max-steps", str(steps), "--batch-size", str(BATCH), "--micro-batch-size", str(MICRO),
                          "--lr", str(LR), "--detach", "--json"))
    job = started["job"]
    shown = _wait_finished(job)
    assert shown["state"] == "done" and shown["step"] == steps, shown
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds.count("node_lost") == 2 and kinds.count("shard_moved") == 2
    assert sorted(shown["last_metrics"]["nodes"]) == ["local-1"]
    for pid in lost:
        _wait_exited(pid)
    assert "failpoint train.step@5" in (cluster3 / "local-3" / "dllmd.log").read_text()
    # Mid-job: steps 0-4 ran on three nodes, every later one on the survivor.
    metrics = _ok(run_cli("dllmctl", "metrics", job, "--json"))
    assert [sorted(m["nodes"]) for m in metrics] == [["local-1", "local-2", "local-3"]] * 5 + [["local-1"]] * (steps - 5)
    node_lost = [e for e in shown["events"] if e["kind"] == "node_lost"]
    assert {"local-2", "local-3"} == {name for e in node_lost for name in ("local-2", "local-3") if name in e["message"]}
    assert all(metrics[4]["time"] <= e["time"] <= metrics[5]["time"] for e in node_lost)
    assert kinds.index("node_lost") < kinds.index("done")
    assert not (cluster3 / "local-1" / "jobs" / job / "spares").exists()  # released with the job
    # The lost nodes' rows were still trained on, in the same order: same weights as one process.
    weights = _export(job, "survivor", tmp_path / "export")
    store_dir = Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny"
    assert _max_diff(weights, _reference(store_dir, _shards(cluster3, keys, "three"), steps)) <= 1e-5
    _restart(cluster3, "local-2")


def test_hung_nodes_are_dropped_within_the_step_deadline_and_the_job_goes_on(cluster3, tmp_path):
    """As they start step 3, local-3 stops (as SIGSTOP stops a process: alive, connected, answering
    nothing) and local-2's compute thread sleeps for ten minutes (its daemon answers pings: a stuck
    GPU, a deadlocked thread). The others wait in the ring until the coordinator's step deadline (3x
    the usual step, at least 30 s) passes; local-3 does not answer a ping, local-2 does but its step
    does not end after the reset: both are dropped and local-1 finishes the job from its spares."""
    from dllmd.train.run import HUNG_MIN_S, RESET_GRACE_MIN_S

    keys = _keys(cluster3)
    steps = 8
    stuck = _restart(cluster3, "local-2", failpoints="train.compute@3=sleep:600")
    hung = _restart(cluster3, "local-3", failpoints="train.step@3=stop")
    try:
        started = _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", "three", "--nodes", "local-1,local-2,local-3",
                              "--max-steps", str(steps), "--batch-size", str(BATCH), "--micro-batch-size",
                              str(MICRO), "--lr", str(LR), "--detach", "--json"))
        shown = _wait_finished(started["job"])
        assert psutil.Process(hung).status() == psutil.STATUS_STOPPED  # it really hung, it did not die
    finally:
        for pid in (hung, stuck):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_exited(pid)
    assert shown["state"] == "done" and shown["step"] == steps, shown
    metrics = _ok(run_cli("dllmctl", "metrics", started["job"], "--json"))
    assert [sorted(m["nodes"]) for m in metrics] == [["local-1", "local-2", "local-3"]] * 3 + [["local-1"]] * (steps - 3)
    node_lost = next(e for e in shown["events"] if e["kind"] == "node_lost" and "local-3" in e["message"])
    node_hung = next(e for e in shown["events"] if e["kind"] == "alert.node_hung")
    assert json.loads(node_hung["message"])["node"] == "local-2"
    # Dropped at the deadline (plus the ping's 3 s, the reset's grace and a loaded machine's slack), not
    # STEP_TIMEOUT_S's hour.
    assert node_lost["time"] - metrics[2]["time"] <= HUNG_MIN_S + RESET_GRACE_MIN_S + 90, (node_lost, metrics[2])
    weights = _export(started["job"], "after-hang", tmp_path / "export")
    store_dir = Path(os.environ["DLLM_DATA_DIR"]) / "models" / "tiny"
    assert _max_diff(weights, _reference(store_dir, _shards(cluster3, keys, "three"), steps)) <= 1e-5
    _restart(cluster3, "local-2")


def test_bad_jobs_are_refused_before_anything_starts(cluster3):
    jobs_before = _ok(run_cli("dllmctl", "jobs", "list", "--json"))
    for args, needle in (
            (["-d", "ghost"], "no dataset"),
            (["-d", "two", "--parallelism", "federated"], "a federated job needs --nodes"),
            (["-d", "two", "--parallelism", "pipeline"], "must be one of"),
            (["-d", "two", "--batch-size", "5", "--micro-batch-size", "2"], "not divisible"),
            (["-d", "two", "--backend", "torch", "--plaintext"], "never encrypts"),
            (["-d", "two", "--backend", "mpi"], "backend must be one of"),
            (["-d", "three", "--nodes", "local-1,local-2"], "not among the job's nodes"),
            (["-d", "two", "--plaintext"], "does not allow a plaintext ring"),
            (["-d", "two", "--batch-size", "100000"], "fewer than one global batch"),
            (["-d", "two", "--dtype", "float16"], "dtype")):
        done = run_cli("dllmctl", "train", "-m", "tiny", "--max-steps", "2", *args)
        message = " ".join(done.stderr.split())
        assert done.returncode != 0 and needle in message and "Traceback" not in done.stderr, (args, message)
    assert _ok(run_cli("dllmctl", "jobs", "list", "--json")) == jobs_before
