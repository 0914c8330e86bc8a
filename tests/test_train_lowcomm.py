"""Training that communicates less, through real daemons: DiLoCo (``--sync-every``) against its
one-process reference, compressed all-reduces (int8, PowerSGD, with error feedback) against exact
ones, all-reduces overlapped with the backward against ones after it, a node lost between syncs, a
resumed DiLoCo job, and the combinations that are not built, refused before any job exists."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllmd.train.collective import LocalGroup
from dllmd.train.compression.powersgd import PowerSGDReducer, orthogonalize
from dllmd.train.compression.reducers import Fp16Reducer, Int8Reducer, Reducer, agreed_levels
from dllmd.train.diloco.local import train_diloco_locally
from dllmd.train.local import train_locally
from dllmd.train.optim import OptimConfig
from dllmd.train.overlap import plan_buckets
from tests.conftest import assert_coordinator_refuses, cli_user_cluster, run_cli
from tests.test_cli_inference import _ok
from tests.test_train import LR, _max_diff, _restart, _shards, _wait_exited, _wait_finished, import_and_shard

BATCH, MICRO = 6, 2
TWO, THREE = "local-1,local-2", "local-1,local-2,local-3"


# --- without daemons ------------------------------------------------------------------------------

SHAPES = [torch.Size([96, 64]), torch.Size([64]), torch.Size([48, 96])]


def _reduce_once(make, members: int = 3, seed: int = 0) -> tuple[list[torch.Tensor], list, torch.Tensor]:
    """Every member's buffer after one reduction, the reducers, and the exact sum."""
    group = LocalGroup(members)
    reducers = [make(group.member(r)) for r in range(members)]
    generator = torch.Generator().manual_seed(seed)
    count = sum(s.numel() for s in SHAPES)
    given = [torch.cat([torch.randn(count, generator=generator) * (1 + r), torch.tensor([1.5 + r, 10.0])])
             for r in range(members)]
    exact = sum(given)
    buffers = [g.clone() for g in given]

    async def run():
        return await asyncio.gather(*(red.reduce(b, 0) for red, b in zip(reducers, buffers)))

    asyncio.run(run())
    return buffers, reducers, exact


@pytest.mark.parametrize("make", [Reducer, Fp16Reducer, lambda c: Int8Reducer(c, 64),
                                  lambda c: PowerSGDReducer(c, SHAPES, 4, seed=7)],
                         ids=["none", "fp16", "int8", "powersgd"])
def test_every_member_decodes_the_same_sum_and_keeps_what_it_lost(make):
    buffers, reducers, exact = _reduce_once(make)
    assert all(torch.equal(b, buffers[0]) for b in buffers[1:])  # bitwise, on every member
    assert torch.equal(buffers[0][-2:], exact[-2:])  # the loss sum and token count travel exact
    for reducer in reducers:
        reducer.commit()
    if type(reducers[0]) is Reducer:
        assert torch.equal(buffers[0], exact) and reducers[0].state() == {}
        return
    # Error feedback: what the sum lacks is what the members kept for next time (float16's own additions
    # in the ring round too, within its precision; int8 adds integers, PowerSGD's shares add up exactly).
    lost = torch.stack([r.feedback.residual for r in reducers]).sum(0)
    tolerance = 2 ** -9 * float(exact.abs().max()) if isinstance(reducers[0], Fp16Reducer) else 1e-4
    assert float((buffers[0][:-2] + lost - exact[:-2]).abs().max()) < tolerance
    assert float(lost.abs().max()) > 0  # it did compress


def test_int8_sums_never_overflow_even_when_every_member_peaks_together():
    members = 5
    group = LocalGroup(members)
    reducers = [Int8Reducer(group.member(r), 4) for r in range(members)]
    peak = torch.cat([torch.full((8,), 3.0), torch.tensor([0.0, 1.0])])  # every member at its block's maximum
    buffers = [peak.clone() for _ in range(members)]

    async def run():
        await asyncio.gather(*(red.reduce(b, 0) for red, b in zip(reducers, buffers)))

    asyncio.run(run())
    assert torch.allclose(buffers[0][:-2], torch.full((8,), 15.0), rtol=1 / agreed_levels(members))
    assert agreed_levels(members) == 124


def test_powersgd_keeps_its_warm_start_only_for_applied_steps_and_orthogonalizes():
    columns = orthogonalize(torch.randn(50, 4, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(columns.T @ columns, torch.eye(4), atol=1e-5)
    _, reducers, _ = _reduce_once(lambda c: PowerSGDReducer(c, SHAPES, 4, seed=7))
    assert reducers[0].q is None  # pending until the step is applied
    reducers[0].commit()
    assert [q.shape for q in reducers[0].q] == [(64, 4), (96, 4)]
    state = reducers[0].state()
    again = PowerSGDReducer(None, SHAPES, 4, seed=7)
    again.load(state)
    assert all(torch.equal(a, b) for a, b in zip(again.q, reducers[0].q))
    assert torch.equal(again.feedback.residual, reducers[0].feedback.residual)


def test_buckets_run_backwards_through_the_buffer_and_the_first_carries_the_extras():
    buckets = plan_buckets([10, 20, 30, 5], bucket_bytes=80)
    assert [(b.lo, b.hi, b.params) for b in buckets] == [(30, 67, (3, 2)), (10, 30, (1,)), (0, 10, (0,))]


# --- through daemons ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three daemons, a user, the tiny Llama and a dataset sharded over two and over three of them."""
    root = tmp_path_factory.mktemp("lowcomm")
    with cli_user_cluster(root, 3) as cluster:
        import_and_shard(root, {"two": TWO, "three": THREE})
        yield cluster


def _keys(cluster: Path) -> dict[str, str]:
    return {n["name"]: n["public_key"] for n in json.loads((cluster / "cluster.json").read_text())["nodes"]}


def _model_dir(cluster: Path) -> Path:
    return cluster.parent / "data" / "models" / "tiny"


def _train(dataset: str, nodes: str, steps: int, *extra: str, lr: float = LR) -> dict:
    return _ok(run_cli("dllmctl", "train", "-m", "tiny", "-d", dataset, "--nodes", nodes, "--max-steps", str(steps),
                       "--batch-size", str(BATCH), "--micro-batch-size", str(MICRO), "--lr", str(lr), "--json", *extra,
                       timeout=300))


def _export(job: str, directory: Path) -> dict:
    _ok(run_cli("dllmctl", "checkpoints", "export", job, "--name", directory.name, "--dir", str(directory), "--json"))
    return load_file(str(directory / "model.safetensors"))


def _diloco_reference(cluster: Path, dataset: str, nodes: str, steps: int, every: int, outer_lr: float,
                      outer_momentum: float) -> dict:
    keys = _keys(cluster)
    return train_diloco_locally(_model_dir(cluster), _shards(cluster, keys, dataset),
                                [[keys[n]] for n in nodes.split(",")], steps, BATCH, MICRO, OptimConfig(lr=LR),
                                every, outer_lr, outer_momentum)


def test_diloco_at_one_step_averages_the_workers_adamw_steps_which_is_not_synchronous_training(cluster, tmp_path):
    """H = 1, outer lr 1, no momentum: the new weights are the token-weighted mean of the workers' weights
    after one AdamW step each on its own mean gradient. Synchronous training takes one AdamW step on the
    mean gradient instead; AdamW divides by each worker's own second moment, so the two differ (by about
    the learning rate): what equals what is the job and its one-process reference."""
    steps = 4
    job = _train("two", TWO, steps, "--sync-every", "1", "--outer-lr", "1", "--outer-momentum", "0")
    assert job["state"] == "done" and job["step"] == steps and job["total_steps"] == steps
    weights = _export(job["job"], tmp_path / "h1")
    assert _max_diff(weights, _diloco_reference(cluster, "two", TWO, steps, 1, 1.0, 0.0)) <= 1e-5
    synchronous = train_locally(_model_dir(cluster), _shards(cluster, _keys(cluster), "two"), steps, BATCH, MICRO,
                                OptimConfig(lr=LR))
    assert _max_diff(weights, synchronous) > 10 * 1e-5


def test_diloco_equals_its_one_process_reference_and_sends_once_per_outer_step(cluster, tmp_path):
    steps, every = 7, 3  # the last outer step is one inner step
    job = _train("three", THREE, steps, "--sync-every", str(every))
    assert job["state"] == "done" and job["step"] == 3 and job["total_steps"] == 3, job
    weights = _export(job["job"], tmp_path / "h3")
    assert _max_diff(weights, _diloco_reference(cluster, "three", THREE, steps, every, 0.7, 0.9)) <= 1e-5
    metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
    assert [m["step"] for m in metrics] == [0, 1, 2] and [m["inner_steps"] for m in metrics] == [3, 3, 1]
    params = sum(t.numel() for t in weights.values())
    for m in metrics:  # one float32 all-reduce of the pseudo-gradient and two extras: a ring sends 2(n-1) times it
        assert m["bytes_sent"] == 2 * 2 * 4 * (params + 2)
        assert m["loss"] > 0 and sorted(m["nodes"]) == ["local-1", "local-2", "local-3"]
    table = run_cli("dllmctl", "metrics", job["job"], env={"COLUMNS": "200"})
    assert table.returncode == 0 and "outer step" in table.stdout and "sent" in table.stdout


HELDOUT = "".join(f"def g{i}(y):\n    return y - {i % 5} * {i}\n" for i in range(60))  # not in the corpus


def test_int8_and_powersgd_with_error_feedback_converge_like_exact_sums_for_a_fraction_of_the_bytes(
        cluster, tmp_path):
    steps = 24
    (tmp_path / "heldout.txt").write_text(HELDOUT)
    runs = {}
    for compress in ("none", "int8", "powersgd:8"):
        job = _train("two", TWO, steps, "--compress", compress, "--eval-text", str(tmp_path / "heldout.txt"), lr=1e-3)
        assert job["state"] == "done" and job["step"] == steps, job
        metrics = _ok(run_cli("dllmctl", "metrics", job["job"], "--json"))
        runs[compress] = {"heldout": metrics[-1]["heldout_loss"], "bytes": sum(m["bytes_sent"] for m in metrics),
                          "first": metrics[0]["loss"]}
    print({k: {n: round(v, 4) for n, v in r.items()} for k, r in runs.items()})
    exact = runs["none"]
    assert exact["heldout"] < 0.8 * exact["first"]  # it learned: the comparison means something
    # int8 loses little per step and error feedback delivers it one step late; rank-8 factors of 64-wide
    # matrices lag more over so short a run (a power iteration per step, warm-started from a random Q)
    for compress, within in (("int8", 0.01), ("powersgd:8", 0.05)):
        assert abs(runs[compress]["heldout"] - exact["heldout"]) <= within * exact["heldout"], compress
    assert 3.5 < exact["bytes"] / runs["int8"]["bytes"] < 4  # 1 + 4/64 bytes per value against 4
    assert exact["bytes"] / runs["powersgd:8"]["bytes"] > 4


def test_buckets_overlapped_with_the_backward_sum_what_the_step_after_it_sums(cluster, tmp_path):
    steps = 4
    plain = _train("two", TWO, steps)
    overlapped = _train("two", TWO, steps, "--overlap", "--overlap-bucket-mb", "0.02")  # about 8 buckets
    assert overlapped["state"] == "done", overlapped
    a, b = _export(plain["job"], tmp_path / "plain"), _export(overlapped["job"], tmp_path / "overlapped")
    assert _max_diff(a, b) == 0  # two members add each element in either order: the same bits
    reference = train_locally(_model_dir(cluster), _shards(cluster, _keys(cluster), "two"), steps, BATCH, MICRO,
                              OptimConfig(lr=LR))
    assert _max_diff(b, reference) <= 1e-5
    params = sum(t.numel() for t in b.values())
    for m in _ok(run_cli("dllmctl", "metrics", overlapped["job"], "--json")):
        assert 0 <= m["comm_exposed_s"] <= m["comm_s"] + 1e-3 and m["bytes_sent"] == 2 * 4 * (params + 2)


def test_a_resumed_diloco_job_with_int8_continues_every_workers_inner_state_exactly(cluster, tmp_path):
    common = ("--sync-every", "2", "--compress", "int8", "--checkpoint-every", "2")
    straight = _train("two", TWO, 6, *common)
    coordinator = _restart(cluster, "local-1", failpoints="jobs.step@2=exit")  # dies as it starts outer step 2
    job = _train("two", TWO, 6, *common, "--detach")["job"]
    _wait_exited(coordinator)
    _restart(cluster, "local-1")
    resumed = _ok(run_cli("dllmctl", "jobs", "resume", job, "--follow", "--json", timeout=300))
    assert resumed["state"] == "done" and resumed["step"] == 3
    assert any(e["kind"] == "resumed" and e["message"] == "from step 2" for e in resumed["events"])
    state = json.loads((cluster / "local-1" / "jobs" / job / "checkpoints" / "step-000002" / "state.json").read_text())
    assert sorted(state["local_steps"]) == sorted(_keys(cluster)[n] for n in TWO.split(","))
    assert _max_diff(_export(straight["job"], tmp_path / "a"), _export(job, tmp_path / "b")) == 0


def test_a_node_killed_between_syncs_is_dropped_and_the_job_goes_on(cluster):
    every, steps = 3, 12
    lost = _restart(cluster, "local-3", failpoints="train.step@4=exit")  # inner step 4: in outer step 1
    try:
        job = _train("three", THREE, steps, "--sync-every", str(every), "--detach")["job"]
        shown = _wait_finished(job)
        assert shown["state"] == "done" and shown["step"] == steps // every, shown
        kinds = [e["kind"] for e in shown["events"]]
        assert {"node_lost", "inner_progress_lost", "shard_moved"} <= set(kinds)
        _wait_exited(lost)
        metrics = _ok(run_cli("dllmctl", "metrics", job, "--json"))
        assert [m["step"] for m in metrics] == [0, 1, 2, 3]
        # outer step 1 is synced by the survivors alone; local-3's shard is computed by another node from then on
        assert [sorted(n for n, v in m["nodes"].items() if "bytes_sent" in v) for m in metrics] == \
            [["local-1", "local-2", "local-3"]] + [["local-1", "local-2"]] * 3
        assert all(m["rows"] == BATCH * every for m in metrics[2:])
    finally:
        _restart(cluster, "local-3")


def test_what_is_not_built_is_refused_before_a_job_exists(cluster):
    before = _ok(run_cli("dllmctl", "jobs", "list", "--json"))
    for args, needle in (
            (["--sync-every", "2", "--dp-clip", "1", "--dp-noise-multiplier", "1"],
             "--sync-every is not built with differential privacy"),
            (["--compress", "int8", "--backend", "torch"], "--compress is built on the zmq ring"),
            (["--overlap", "--compress", "int8"], "--overlap is not built with --compress"),
            (["--overlap", "--sync-every", "4"], "--overlap has nothing to hide under --sync-every"),
            (["--compress", "int4"], "--compress must be none, fp16, int8 or powersgd:RANK"),
            (["--compress", "powersgd"], "--compress powersgd needs a rank"),
            (["--outer-lr", "0.5"], "give --sync-every too"),
            (["--sync-every", "2", "--parallelism", "model"], "is built for --parallelism data, not model")):
        done = run_cli("dllmctl", "train", "-m", "tiny", "-d", "two", "--nodes", TWO, "--max-steps", "2", *args)
        message = " ".join(done.stderr.split())
        assert done.returncode == 1 and needle in message and "Traceback" not in done.stderr, (args, message)

    # A client that skips dllmctl's checks meets the coordinator's: the same words, code bad_args.
    assert_coordinator_refuses(cluster, (
        ({"sync_every": 2, "dp_clip": 1.0, "dp_noise_multiplier": 1.0}, "differential privacy"),
        ({"compress": "powersgd:0"}, "needs a rank from 1"),
        ({"overlap": True, "backend": "torch"}, "--overlap is built on the zmq ring"),
        ({"eval_tokens": [1]}, "at least 2 tokens")))
    assert _ok(run_cli("dllmctl", "jobs", "list", "--json")) == before
