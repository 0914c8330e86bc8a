"""Training's parts without a network: the data schedule, the learning rate, loss masking, the
SQLite job store and signed checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from dllmd.net.identity import Identity
from dllmd.net.messages.training import CheckpointChunk
from dllmd.train import schedule
from dllmd.train.checkpoint import CheckpointError, Checkpoints
from dllmd.train.jobs import JobError, JobStore
from dllmd.train.model import row_targets


def test_the_global_order_covers_every_row_once_per_epoch_and_is_deterministic():
    rows = {"b-node": 7, "a-node": 5}
    order = schedule.global_order(rows, epoch=0, seed=3)
    assert sorted((r.shard, r.index) for r in order) == sorted([("a-node", i) for i in range(5)] +
                                                               [("b-node", i) for i in range(7)])
    assert order == schedule.global_order(dict(reversed(list(rows.items()))), epoch=0, seed=3)  # key order irrelevant
    assert order != schedule.global_order(rows, epoch=1, seed=3)
    assert order != schedule.global_order(rows, epoch=0, seed=4)
    # Steps: 12 rows, batches of 5 -> 2 steps per epoch, the short tail dropped.
    assert schedule.steps_per_epoch(rows, 5) == 2
    assert schedule.batch(rows, 5, 3, 1) == order[5:10]
    assert schedule.batch(rows, 5, 3, 2) == schedule.global_order(rows, 1, 3)[:5]
    assert schedule.total_steps(rows, 5, epochs=3, max_steps=None) == 6
    assert schedule.total_steps(rows, 5, epochs=None, max_steps=11) == 11


def test_every_batch_takes_rows_of_each_shard_in_proportion_to_its_size():
    rows = {"a": 400, "b": 400, "c": 200}
    for step in range(0, 100, 7):
        batch = schedule.batch(rows, 10, seed=1, step=step)
        counts = {s: sum(r.shard == s for r in batch) for s in rows}
        assert 3 <= counts["a"] <= 5 and 3 <= counts["b"] <= 5 and 1 <= counts["c"] <= 3, counts


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [schedule.learning_rate(s, 1.0, warmup_steps=4, total=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert schedule.learning_rate(20, 1.0, 4, 20) == pytest.approx(0.1)
    assert schedule.learning_rate(0, 1.0, 0, 1) == pytest.approx(1.0)


def test_targets_are_masked_after_the_real_stream_and_at_row_ends():
    tokens = torch.arange(12, dtype=torch.int32).reshape(3, 4)  # a shard of 3 rows, 10 real tokens
    labels = row_targets(tokens, torch.tensor([0, 4, 8]), torch.tensor([10, 10, 10]))
    assert labels.tolist() == [[1, 2, 3, -100], [5, 6, 7, -100], [9, -100, -100, -100]]


def test_job_store_is_durable_and_marks_running_jobs_interrupted(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.create("job-1", {"nodes": [{"name": "a"}], "model": "m", "dataset": "d"}, total_steps=10)
    store.set_state("job-1", "running")
    for step in range(3):
        store.record_step("job-1", step, {"loss": 3.0 - step})
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite")  # as after a daemon restart
    assert reopened.mark_interrupted() == ["job-1"]
    job = reopened.get("job-1")
    assert job["state"] == "interrupted" and job["step"] == 3 and "resume" in job["error"]
    assert [m["loss"] for m in reopened.metrics("job-1")] == [3.0, 2.0, 1.0]
    reopened.rewind("job-1", 2)
    assert reopened.get("job-1")["step"] == 2 and [m["step"] for m in reopened.metrics("job-1")] == [0, 1]
    assert [e["kind"] for e in reopened.events("job-1")] == ["submitted", "interrupted"]
    with pytest.raises(JobError, match="no job"):
        reopened.get("job-404")


def test_checkpoints_are_atomic_signed_and_verified(tmp_path):
    node = Identity.generate()
    store = Checkpoints(tmp_path / "ckpt", node)
    tensors = {"model.w": torch.randn(3, 4), "optim.w.exp_avg": torch.zeros(3, 4), "optim.w.exp_avg_sq": torch.ones(3, 4)}
    store.write(5, tensors, b'{"model_type": "llama"}', {"optimizer_step": 5, "metrics": {"loss": 1.5}})
    (tmp_path / "ckpt" / ".partial-step-000009").mkdir()  # an interrupted write is never a checkpoint
    assert store.steps() == [5] and store.latest() == 5 and store.describe(5)["loss"] == 1.5
    read, state = store.read(5)
    assert all(torch.equal(read[k], tensors[k]) for k in tensors) and state["step"] == 5

    # Tampering with a file, or with the manifest, is caught.
    path = tmp_path / "ckpt" / "step-000005"
    config = (path / "config.json").read_bytes()
    (path / "config.json").write_bytes(b'{"model_type": "evil"}')
    with pytest.raises(CheckpointError, match="corrupt"):
        store.read(5)
    (path / "config.json").write_bytes(config)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["step"] = 6
    (path / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    with pytest.raises(CheckpointError, match="signature"):
        store.read(5)
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        store.read(7)
    # Another node's key cannot vouch for this node's checkpoints.
    with pytest.raises(CheckpointError):
        Checkpoints(tmp_path / "ckpt", Identity.generate()).manifest(5)


def test_rewriting_a_checkpoint_of_the_same_step_is_atomic(tmp_path, monkeypatch):
    from dllmd.storage import swap

    node = Identity.generate()
    store = Checkpoints(tmp_path / "ckpt", node)
    first = {"model.w": torch.zeros(2, 2), "optim.w.exp_avg": torch.zeros(2, 2)}
    second = {"model.w": torch.ones(2, 2), "optim.w.exp_avg": torch.ones(2, 2)}
    store.write(3, first, b"{}", {"optimizer_step": 3})

    def power_cut(*_args):
        raise OSError("power cut")

    monkeypatch.setattr(swap, "exchange", power_cut)  # the crash lands between staging and the swap
    with pytest.raises(OSError):
        store.write(3, second, b"{}", {"optimizer_step": 3})
    monkeypatch.undo()
    reopened = Checkpoints(tmp_path / "ckpt", node)  # the next use cleans what the crash left
    assert torch.equal(reopened.read(3)[0]["model.w"], first["model.w"])
    reopened.write(3, second, b"{}", {"optimizer_step": 3})
    assert torch.equal(reopened.read(3)[0]["model.w"], second["model.w"]) and reopened.steps() == [3]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000003"]


def test_a_copy_trusts_only_a_manifest_signed_by_a_pinned_key(tmp_path):
    """What an export (from the coordinator) and a stage's part copy (between nodes) both run."""
    import asyncio

    from dllmd.train.checkpoint import copy_checkpoint_file

    node, mallory = Identity.generate(), Identity.generate()
    store = Checkpoints(tmp_path / "ckpt", node)
    store.write(4, {"model.w": torch.ones(1)}, b"{}", {})

    def copy(trusted, step=4, tamper=lambda reply: reply):
        async def read(file, offset):
            reply, chunk = store.read_chunk(4, file, offset)
            return tamper(reply), chunk
        return asyncio.run(copy_checkpoint_file(read, "config.json", tmp_path / "out", step, trusted))

    blob, _ = copy({node.public_key})
    assert (tmp_path / "out").read_bytes() == b"{}" and json.loads(blob)["signer"] == node.public_key
    # Another key (a node impersonated, or a manifest rewritten and re-signed) is refused ...
    with pytest.raises(CheckpointError, match="outside the job"):
        copy({mallory.public_key})

    def forged(reply):
        forged = reply.manifest.replace(node.public_key.encode(), mallory.public_key.encode())
        return CheckpointChunk(forged, mallory.sign(forged), reply.size)
    with pytest.raises(CheckpointError, match="outside the job"):
        copy({node.public_key}, tamper=forged)
    # ... and so are altered bytes, and a manifest of another step.
    with pytest.raises(CheckpointError, match="signature"):
        copy({node.public_key}, tamper=lambda r: CheckpointChunk(r.manifest.replace(b'"step":4', b'"step":5'),
                                                                 r.signature, r.size))
    with pytest.raises(CheckpointError, match="another checkpoint"):
        copy({node.public_key}, step=5)
