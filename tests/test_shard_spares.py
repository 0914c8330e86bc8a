"""A training job's spare copies of other nodes' shards (dllmd/train/spares.py): on disk until a node
takes the shard over, written atomically, removed with the job."""

from __future__ import annotations

import torch

from dllmd.train.spares import ShardSet
from dllmd.train.worker import ShardRows


def test_spare_shards_wait_on_disk_until_they_are_needed(tmp_path):
    own = ShardRows(torch.arange(12, dtype=torch.int32).reshape(3, 4), 11)
    spare = ShardRows(torch.arange(100, 108, dtype=torch.int32).reshape(2, 4), 8)
    shards = ShardSet(tmp_path / "spares")
    shards["me"] = own
    shards.keep_spare("peer/key+=", spare)  # any key: the file is named by its digest
    assert "peer/key+=" in shards and len(shards) == 2 and shards.row_count("peer/key+=") == 2
    assert shards.in_memory() == {"me"}  # the spare costs disk, not memory
    assert len(list((tmp_path / "spares").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "spares").glob("*.partial"))
    taken = shards["peer/key+="]  # taken over: read once, then held
    assert torch.equal(taken.tokens, spare.tokens) and taken.valid_tokens == 8
    assert shards.in_memory() == {"me", "peer/key+="}
    shards.close()
    assert not (tmp_path / "spares").exists() and len(shards) == 0
