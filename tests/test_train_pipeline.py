"""`dllmctl train --parallelism model|hybrid` through four real daemons: pipelines of 2 and 3 stages
(GPipe and 1F1B, tied and untied embeddings) and a 2 x 2 hybrid end with the weights of
single-process training; the two schedules give bitwise the same weights; a killed stage interrupts
the job and `jobs resume` (the stage moved onto another node) ends bitwise where an uninterrupted run
ends; a killed replica of a hybrid
job is dropped and the job finishes; the exported checkpoint loads in transformers and serves
`dllmctl infer`. Deaths are failpoints at an exact step, not kills racing the job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import cli_user_cluster, run_cli
from tests.test_cli_inference import _ok
from tests.test_train import LR, _corpus, _max_diff, _restart, _shards, _wait_exited, _wait_finished
from dllmd.train.local import train_locally
from dllmd.train.optim import OptimConfig
from tests.tiny_models import make_tiny_model

STEPS, BATCH, MICRO = 4, 6, 2  # three micro-batches per step and pipeline
NODES = "local-1,local-2,local-3,local-4"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Four daemons, a user, the tiny Llama (tied; 5 layers) and an untied twin, and datasets of the
    same corpus on 2, 3 and 4 nodes; node name -> public key."""
    root = tmp_path_factory.mktemp("pipeline")
    with cli_user_cluster(root, 4) as cluster:
        for name, tied in (("tiny", True), ("untied", False)):
            source = make_tiny_model("llama", root / f"src-{name}", tie_word_embeddings=tied)
            _ok(run_cli("dllmctl", "model", "import", str(source), "--name", name, "--json"))
        corpus = _corpus(root / "repo")
        for name, model, nodes in (("two", "tiny", 2), ("three", "tiny", 3), ("four", "tiny", 4),
                                   ("two-u", "untied", 2), ("three-u", "untied", 3)):
            _ok(run_cli("dllmctl", "shard-data", str(corpus), "-m", model, "--strategy", "random", "--seq-len",
                        "32", "--nodes", ",".join(NODES.split(",")[:nodes]), "--name", name, "--json"))
        yield cluster


def _keys(cluster: Path) -> dict[str, str]:
    return {n["name"]: n["public_key"] for n in json.loads((cluster / "cluster.json").read_text())["nodes"]}


def _train(model: str, dataset: str, nodes: int, *extra: str, steps: int = STEPS) -> dict:
    return _ok(run_cli("dllmctl", "train", "-m", model, "-d", dataset, "--nodes", ",".join(NODES.split(",")[:nodes]),
                       "--max-steps", str(steps), "--batch-size", str(BATCH), "--micro-batch-size", str(MICRO),
                       "--lr", str(LR), "--json", *extra, timeout=300))


def _export(job: str, name: str, directory: Path) -> dict:
    exported = _ok(run_cli("dllmctl", "checkpoints", "export", job, "--name", name, "--dir", str(directory), "--json"))
    assert exported["parts"] > 0
    return load_file(str(directory / "model.safetensors"))


def _reference(cluster: Path, model: str, dataset: str, steps: int = STEPS) -> dict:
    store = Path(os.environ["DLLM_DATA_DIR"]) / "models" / model
    return train_locally(store, _shards(cluster, _keys(cluster), dataset), steps, BATCH, MICRO, OptimConfig(lr=LR))


CASES = [  # model, dataset, stages, extra options
    ("tiny", "two", 2, ["--schedule", "gpipe", "--stage-layers", "3,2"]),
    ("tiny", "two", 2, ["--schedule", "1f1b", "--stage-layers", "3,2"]),
    ("tiny", "three", 3, ["--stage-layers", "2,2,1"]),
    ("untied", "two-u", 2, ["--stage-layers", "2,3", "--recompute"]),
    ("untied", "three-u", 3, ["--schedule", "gpipe", "--stage-layers", "1,2,2"]),
]


def test_pipelines_equal_single_process_training(cluster, tmp_path):
    weights = {}
    for i, (model, dataset, stages, extra) in enumerate(CASES):
        job = _train(model, dataset, stages, "--parallelism", "model", *extra)
        assert job["state"] == "done" and job["step"] == STEPS, job
        last = job["last_metrics"]
        assert [s["stage"] for s in last["stages"]] == list(range(stages))
        assert sorted(n["stage"] for n in last["nodes"].values()) == list(range(stages))
        assert last["bytes_between_stages"] > 0 and 0 <= last["bubble"] < 1
        assert last["bubble_theoretical"] == pytest.approx((stages - 1) / (BATCH // MICRO + stages - 1))
        weights[i] = _export(job["job"], f"pipe-{i}", tmp_path / f"export-{i}")
        assert _max_diff(weights[i], _reference(cluster, model, dataset)) <= 1e-5, (model, stages, extra)
    # Both schedules run each stage's backwards in the same order: the same sums, bit for bit.
    assert _max_diff(weights[0], weights[1]) == 0

    # The merged checkpoint is a model like any other: transformers loads it, dllmctl serves it.
    exported = tmp_path / "export-2"
    _ok(run_cli("dllmctl", "deploy", "pipe-2", "--json"))
    answer = _ok(run_cli("dllmctl", "infer", "def f(x):", "-m", "pipe-2", "--raw", "--max-new-tokens", "4",
                         "--temperature", "0", "--json"))
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    want = AutoModelForCausalLM.from_pretrained(exported).eval().generate(
        ids, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    assert answer["token_ids"] == want
    _ok(run_cli("dllmctl", "undeploy", "pipe-2", "--json"))


def test_hybrid_replicas_of_a_pipeline_equal_single_process_training(cluster, tmp_path):
    job = _train("tiny", "four", 4, "--parallelism", "hybrid", "--dp", "2", "--pp", "2", "--stage-layers", "3,2")
    assert job["state"] == "done" and job["step"] == STEPS, job
    nodes = job["last_metrics"]["nodes"]
    assert sorted((n["replica"], n["stage"]) for n in nodes.values()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sum(n["rows"] for n in nodes.values()) == BATCH  # each replica reads its own part of the batch
    weights = _export(job["job"], "hybrid", tmp_path / "export")
    assert _max_diff(weights, _reference(cluster, "tiny", "four")) <= 1e-5


def test_torch_distributed_pipelines_equal_single_process_training(cluster, tmp_path):
    """--backend torch: the same stages over one gloo process group (point-to-point activations, a
    group per stage and per tied pair) end with the weights of one process, as the zmq links do."""
    for name, dataset, nodes, extra in (
            ("torch-pipe", "three", 3, ["--parallelism", "model", "--stage-layers", "2,2,1"]),
            ("torch-hybrid", "four", 4, ["--parallelism", "hybrid", "--pp", "2", "--schedule", "gpipe",
                                         "--stage-layers", "3,2"])):
        job = _train("tiny", dataset, nodes, "--backend", "torch", *extra)
        assert job["state"] == "done" and job["step"] == STEPS, job
        assert job["last_metrics"]["bytes_between_stages"] > 0
        weights = _export(job["job"], name, tmp_path / name)
        assert _max_diff(weights, _reference(cluster, "tiny", dataset)) <= 1e-5, name

    # A process group cannot lose a rank: a dead stage interrupts the job, and resume (a new group)
    # ends with the weights of one process.
    steps, common = 6, ("--parallelism", "model", "--stage-layers", "3,2", "--checkpoint-every", "2", "--backend",
                        "torch")
    lost = _restart(cluster, "local-2", failpoints="train.stage_step@4=exit")
    job = _train("tiny", "two", 2, *common, "--detach", steps=steps)["job"]
    shown = _wait_finished(job)
    _wait_exited(lost)
    assert shown["state"] == "interrupted" and shown["step"] == 4, shown
    _restart(cluster, "local-2")
    resumed = _ok(run_cli("dllmctl", "jobs", "resume", job, "--follow", "--json", timeout=300))
    assert resumed["state"] == "done" and resumed["step"] == steps, resumed
    weights = _export(job, "torch-resumed", tmp_path / "resumed")
    assert _max_diff(weights, _reference(cluster, "tiny", "two", steps)) <= 1e-5


def test_a_killed_stage_interrupts_the_job_and_resume_ends_where_an_uninterrupted_run_ends(cluster, tmp_path):
    steps = 12
    common = ("--parallelism", "model", "--stage-layers", "3,2", "--checkpoint-every", "4")
    straight = _train("tiny", "two", 2, *common, steps=steps)
    # Stage 1 dies as it starts step 6: armed, not raced.
    lost = _restart(cluster, "local-2", failpoints="train.stage_step@6=exit")
    job = _train("tiny", "two", 2, *common, "--detach", steps=steps)["job"]
    shown = _wait_finished(job)
    _wait_exited(lost)
    assert shown["state"] == "interrupted" and shown["step"] == 6, shown
    stage_lost = next(e for e in shown["events"] if e["kind"] == "stage_lost")
    assert stage_lost["message"].startswith("stage 1 (local-2, layers 3-4)")
    # local-2 stays down: stage 1 moves to local-3, which loads its part of step 4 from the coordinator's
    # copy (signed by local-2, still trusted as a retired node of the job).
    try:
        resumed = _ok(run_cli("dllmctl", "jobs", "resume", job, "--replace", "local-2=local-3", "--follow", "--json",
                              timeout=300))
    finally:
        _restart(cluster, "local-2")  # back, disarmed, for the tests after
    assert resumed["state"] == "done" and resumed["step"] == steps, resumed["events"][-6:]
    assert any(e["kind"] == "resumed" and e["message"] == "from step 4" for e in resumed["events"])
    moved = next(e for e in resumed["events"] if e["kind"] == "stage_moved")
    assert moved["message"] == "stage 1 (layers 3-4) moved from local-2 to local-3"
    assert [n["name"] for n in resumed["spec"]["nodes"]] == ["local-1", "local-3"]
    a = _export(straight["job"], "straight", tmp_path / "a")
    b = _export(job, "resumed", tmp_path / "b")
    assert _max_diff(a, b) == 0


def test_a_killed_replica_of_a_hybrid_job_is_dropped_and_the_job_finishes(cluster, tmp_path):
    steps = 8
    lost = _restart(cluster, "local-4", failpoints="train.stage_step@3=exit")  # stage 1 of replica 1
    job = _train("tiny", "four", 4, "--parallelism", "hybrid", "--pp", "2", "--stage-layers", "3,2", "--detach",
                 steps=steps)["job"]
    shown = _wait_finished(job)
    _wait_exited(lost)
    assert shown["state"] == "done" and shown["step"] == steps, shown
    kinds = [e["kind"] for e in shown["events"]]
    assert "stage_lost" in kinds and "replica_lost" in kinds and "shard_moved" in kinds
    metrics = _ok(run_cli("dllmctl", "metrics", job, "--json"))
    assert [len(m["nodes"]) for m in metrics] == [4] * 3 + [2] * (steps - 3)
    # The lost replica's rows were still trained on, in the same order: the weights of one process.
    weights = _export(job, "survivor", tmp_path / "export")
    assert _max_diff(weights, _reference(cluster, "tiny", "four", steps)) <= 1e-5
    _restart(cluster, "local-4")


def test_bad_pipeline_jobs_are_refused_before_anything_starts(cluster):
    for args, needle in (
            (["-d", "two", "--parallelism", "model", "--pp", "3"], "--pp 3 needs 3 nodes"),
            (["-d", "two", "--parallelism", "model", "--stage-layers", "3,3"], "adds up to 6 layers"),
            (["-d", "two", "--parallelism", "model", "--stage-layers", "a,b"], "layer counts"),
            (["-d", "two", "--parallelism", "model", "--stage-layers", "5", "--pp", "2"], "gives 1 stages"),
            (["-d", "two", "--parallelism", "model", "--schedule", "zb", "--stage-layers", "3,2"],
             "schedule must be one of"),
            (["-d", "two", "--parallelism", "hybrid"], "needs --pp"),
            (["-d", "three", "--parallelism", "hybrid", "--dp", "2"], "needs 2 nodes")):
        done = run_cli("dllmctl", "train", "-m", "tiny", "--max-steps", "2", *args)
        message = " ".join(done.stderr.split())
        assert done.returncode != 0 and needle in message and "Traceback" not in done.stderr, (args, message)
