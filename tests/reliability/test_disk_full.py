"""A full disk while importing a model, staging a shard or writing a checkpoint: the write is refused
(or cut short and removed), what was there before is intact, and the error says so.

The disk is a real small filesystem (a tmpfs mounted for the test; that needs root, as CI has) with
a filler file taking all but a little of it; the daemon of the shard test has its home on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from dllmctl.cluster.registry import NodeEntry
from dllmctl.data.push import PushError, ShardUpload, push_shards
from dllmctl.models.importer import ModelImportError, import_model
from dllmd.data.packing import TokenizedSample, pack
from dllmd.data.shards import read_shard, shard_payload
from dllmd.models.store import ModelStore
from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages import data as M
from dllmd.net.messages.node import PING
from dllmd.net.wire import ErrorCode
from dllmd.storage import DiskFull
from dllmd.storage.room import free_bytes
from dllmd.train.checkpoint import Checkpoints, NoRoomForCheckpoint
from tests.conftest import make_home, start_daemon
from tests.tiny_models import make_tiny_model

DISK = "24m"


@pytest.fixture
def disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); these tests need root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk, leave: int):
    """Take all of ``disk`` but ``leave`` bytes; returns the filler (unlink it to free the space)."""
    filler = disk / "filler"
    size = free_bytes(disk) - leave
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return filler


def test_an_import_that_does_not_fit_leaves_the_store_as_it_was(disk, tmp_path):
    user = Identity.generate()
    store = ModelStore(disk / "models")
    import_model(make_tiny_model("llama", tmp_path / "a"), store, user, name="a")
    bigger = make_tiny_model("llama", tmp_path / "b", hidden_size=256, intermediate_size=512)
    filler = _fill(disk, leave=2 * 2**20)
    with pytest.raises(ModelImportError) as refused:
        import_model(bigger, store, user, name="b")
    assert isinstance(refused.value.__cause__, DiskFull)
    assert [m.name for m in store.list()] == ["a"] and store.verify("a").name == "a"
    assert sorted(p.name for p in store.root.iterdir()) == ["a"]  # no half-written import left behind
    filler.unlink()
    assert import_model(bigger, store, user, name="b").name == "b"


def test_a_checkpoint_that_does_not_fit_keeps_the_last_one_and_the_job_can_go_on_from_it(disk):
    checkpoints = Checkpoints(disk / "checkpoints", Identity.generate())
    weights = {"model.w": torch.randn(512, 512), "optim.m": torch.randn(512, 512)}  # 2 MiB
    checkpoints.write(1, weights, b"{}", {"seed": 0})
    filler = _fill(disk, leave=2 * 2**20)
    with pytest.raises(NoRoomForCheckpoint):
        checkpoints.write(2, {k: v + 1 for k, v in weights.items()}, b"{}", {"seed": 0})
    assert checkpoints.steps() == [1] and not list(checkpoints.root.glob(".partial-*"))
    tensors, state = checkpoints.read(1)  # verified against its signed manifest
    assert torch.equal(tensors["model.w"], weights["model.w"]) and state["step"] == 1
    filler.unlink()
    checkpoints.write(2, weights, b"{}", {"seed": 0})
    assert checkpoints.steps() == [1, 2]


def _shard(rows: int, seed: int) -> tuple[bytes, dict]:
    tokens = np.random.default_rng(seed).integers(5, 300, rows * 64, dtype=np.int32)
    return shard_payload(pack([TokenizedSample(f"s{seed}", tokens)], 64, 2), dataset="d")


def test_a_shard_that_does_not_fit_is_refused_with_no_space_and_the_node_keeps_the_old_one(disk):
    user = Identity.generate()
    home = disk / "node"
    identity = make_home(home, "small")
    AuthorizedKeys(home / "authorized_keys.toml").authorize(user.public_key, Role.ADMIN, "user")
    daemon = start_daemon(home)
    try:
        node = NodeEntry("small", daemon.address, identity.public_key)
        old_blob, old_meta = _shard(64, 1)  # 16 KiB
        asyncio.run(push_shards(user, "d", [ShardUpload(node, old_blob, old_meta)]))
        filler = _fill(disk, leave=3 * 2**20)
        new_blob, new_meta = _shard(16_384, 2)  # 4 MiB
        with pytest.raises(PushError) as refused:
            asyncio.run(push_shards(user, "d", [ShardUpload(node, new_blob, new_meta)]))
        assert "no space left" in str(refused.value)

        async def stage_then_ping():
            async with RpcClient(user, node.address, node.public_key) as client:
                meta = torch.frombuffer(bytearray(json.dumps(new_meta).encode()), dtype=torch.int8)
                with pytest.raises(RemoteError) as stage:
                    await client.invoke(M.DATA_STAGE, M.StageArgs(dataset="d", bytes=len(new_blob),
                                                                  sha256=hashlib.sha256(new_blob).hexdigest()), [meta])
                assert stage.value.code == ErrorCode.NO_SPACE
                return await client.invoke(PING, timeout=5)

        assert asyncio.run(stage_then_ping())  # refused with its code, and the daemon serves on
        tokens, _ = read_shard(home / "datasets" / "d" / "shard.safetensors")
        assert (home / "datasets" / "d" / "shard.safetensors").read_bytes() == old_blob and len(tokens)
        assert not (home / "datasets" / ".incoming" / "d").exists()  # nothing half-staged holds the space
        filler.unlink()
        asyncio.run(push_shards(user, "d", [ShardUpload(node, new_blob, new_meta)]))
        assert (home / "datasets" / "d" / "shard.safetensors").read_bytes() == new_blob
    finally:
        daemon.stop()
