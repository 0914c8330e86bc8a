"""A node's shard store: staged, resumable, verified, published only on commit."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from dllmd.data import TokenizedSample, pack
from dllmd.data.pieces import piece_digest
from dllmd.data.shards import SHARD, ShardError, ShardStore, read_shard, shard_payload

BLOB = bytes(range(256)) * 40
SHA = hashlib.sha256(BLOB).hexdigest()


def staged(tmp_path, name="ds") -> ShardStore:
    store = ShardStore(tmp_path / "datasets")
    assert store.stage(name, {"tokens": 5}, len(BLOB), SHA) == {"received": 0, "complete": False}
    return store


def test_a_shard_is_invisible_until_committed(tmp_path):
    store = staged(tmp_path)
    assert store.put("ds", 0, BLOB[:1000]) == {"received": 1000, "complete": False}
    assert store.put("ds", 1000, BLOB[1000:]) == {"received": len(BLOB), "complete": True}
    assert store.list() == []
    assert store.commit("ds")["tokens"] == 5
    [listed] = store.list()
    assert listed["dataset"] == "ds" and listed["sha256"] == SHA and listed["bytes"] == len(BLOB)
    assert store.shard_path("ds").read_bytes() == BLOB


def test_an_interrupted_push_resumes_where_it_stopped(tmp_path):
    store = staged(tmp_path)
    store.put("ds", 0, BLOB[:700])
    again = ShardStore(tmp_path / "datasets")  # e.g. after a daemon restart
    assert again.stage("ds", {"tokens": 5}, len(BLOB), SHA) == {"received": 700, "complete": False}
    with pytest.raises(ShardError, match="resume from 700"):
        again.put("ds", 0, BLOB)
    assert again.put("ds", 700, BLOB[700:])["complete"]


def test_a_corrupted_shard_is_refused(tmp_path):
    store = staged(tmp_path)
    bad = bytearray(BLOB)
    bad[10] ^= 1
    with pytest.raises(ShardError, match="does not match its sha256"):
        store.put("ds", 0, bytes(bad))
    with pytest.raises(ShardError, match="not completely staged"):
        store.commit("ds")
    assert store.stage("ds", {}, len(BLOB), SHA)["received"] == 0  # the bad bytes are gone


def test_abort_leaves_the_committed_shard_alone(tmp_path):
    store = staged(tmp_path)
    store.put("ds", 0, BLOB)
    store.commit("ds")
    other = b"x" * 100
    store.stage("ds", {}, len(other), hashlib.sha256(other).hexdigest())
    store.put("ds", 0, other)
    assert store.abort("ds")
    assert store.shard_path("ds").read_bytes() == BLOB
    # A new version replaces the old one only at commit.
    store.stage("ds", {}, len(other), hashlib.sha256(other).hexdigest())
    store.put("ds", 0, other)
    store.commit("ds")
    assert store.shard_path("ds").read_bytes() == other
    assert store.remove("ds") and store.list() == []


@pytest.mark.parametrize("name", ["../x", ".incoming", "", "a/b", "x" * 200])
def test_hostile_names_are_refused(tmp_path, name):
    with pytest.raises(ShardError, match="invalid dataset name"):
        ShardStore(tmp_path).stage(name, {}, 10, SHA)


def test_bad_sizes_and_hashes(tmp_path):
    store = ShardStore(tmp_path)
    with pytest.raises(ShardError, match="sha256"):
        store.stage("ds", {}, 10, "nothex")
    store.stage("ds", {}, 4, hashlib.sha256(b"abcd").hexdigest())
    with pytest.raises(ShardError, match="more bytes"):
        store.put("ds", 0, b"abcdef")
    with pytest.raises(ShardError, match="no staged shard"):
        store.put("other", 0, b"a")
    assert not (tmp_path / "ds" / SHARD).exists()


def test_a_shard_is_the_same_bytes_in_every_process_and_lists_each_pieces_digest(tmp_path):
    samples = [TokenizedSample("a", np.arange(1, 6, dtype=np.int32)),
               TokenizedSample("b", np.arange(7, 9, dtype=np.int32))]
    blob, meta = shard_payload(pack(samples, seq_len=4, eos_id=0), dataset="ds")
    # A node rebuilding a shard must arrive at the client's sha256: safetensors' own writer orders its
    # metadata differently in every process.
    code = ("import hashlib, numpy as np; from dllmd.data.shards import shard_blob; "
            "tokens = np.array([[1, 2, 3, 4], [5, 0, 7, 8], [0, 0, 0, 0]], dtype=np.int32); "
            "print(hashlib.sha256(shard_blob(tokens, 9)).hexdigest())")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert done.stdout.strip() == hashlib.sha256(blob).hexdigest()
    assert meta["samples"] == [["a", 0, 5, piece_digest(samples[0].ids)], ["b", 6, 2, piece_digest(samples[1].ids)]]
    assert meta["eos_id"] == 0 and meta["tokens"] == 9 and meta["sequences"] == 3
    (tmp_path / "shard.safetensors").write_bytes(blob)
    (tmp_path / "shard.json").write_text(json.dumps(meta))
    tokens, read = read_shard(tmp_path / "shard.safetensors")
    assert tokens.tolist() == [[1, 2, 3, 4], [5, 0, 7, 8], [0, 0, 0, 0]] and read["seq_len"] == 4


# --- patches: an update sends only the pieces a node lacks -----------------------------------------

def pieces(*specs):
    """TokenizedSamples from (id, first token, length)."""
    return [TokenizedSample(i, np.arange(first, first + n, dtype=np.int32)) for i, first, n in specs]


def payload(samples):
    return shard_payload(pack(samples, seq_len=8, eos_id=0), dataset="ds", strategy="round_robin")


def committed(tmp_path, samples) -> tuple[ShardStore, dict]:
    store = ShardStore(tmp_path / "datasets")
    blob, meta = payload(samples)
    store.stage("ds", meta, len(blob), hashlib.sha256(blob).hexdigest())
    store.put("ds", 0, blob)
    store.commit("ds")
    return store, store.describe("ds")


def stage_patch(store, base_meta, samples, patch=None):
    from dllmd.data.patch import make_patch

    blob, meta = payload(samples)
    if patch is None:
        patch = make_patch(samples, [row[3] for row in meta["samples"]], base_meta["samples"])
    data = patch.astype("<i4").tobytes()
    meta = {**meta, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    state = store.stage_patch("ds", meta, len(data), hashlib.sha256(data).hexdigest(), base_meta["sha256"])
    return blob, data, state


BASE = pieces(("a", 1, 5), ("b#0", 10, 7), ("b#1", 20, 3), ("c", 30, 2))


def test_a_patch_sends_only_new_pieces_and_the_node_builds_the_same_shard(tmp_path):
    store, base = committed(tmp_path, BASE)
    # b#1 edited, c removed, d added; a and b#0 kept (and now packed at other offsets).
    new = pieces(("d", 40, 4)) + BASE[:2] + pieces(("b#1", 50, 3))
    blob, data, state = stage_patch(store, base, new)
    assert len(data) == 4 * (4 + 3)  # d and the new b#1 only
    assert state == {"received": 0, "complete": False}
    assert store.put("ds", 0, data[:12]) == {"received": 12, "complete": False}
    assert store.put("ds", 12, data[12:]) == {"received": len(data), "complete": True}
    assert store.describe("ds")["sha256"] == base["sha256"]  # nothing changes before the commit
    store.commit("ds")
    assert store.shard_path("ds").read_bytes() == blob
    assert [row[0] for row in store.describe("ds")["samples"]] == ["d", "a", "b#0", "b#1"]
    assert sorted(p.name for p in store.shard_path("ds").parent.iterdir()) == ["shard.json", "shard.safetensors"]


def test_a_patch_that_only_removes_is_built_at_once_and_a_resumed_stage_finds_it(tmp_path):
    store, base = committed(tmp_path, BASE)
    blob, data, state = stage_patch(store, base, BASE[:2])
    assert data == b"" and state["complete"]
    assert stage_patch(store, base, BASE[:2])[2]["complete"]
    store.commit("ds")
    assert store.shard_path("ds").read_bytes() == blob


def test_a_patch_on_another_shard_is_refused_as_stale(tmp_path):
    from dllmd.data.errors import StaleBase

    store, base = committed(tmp_path, BASE)
    with pytest.raises(StaleBase, match="push it whole"):
        stage_patch(store, {**base, "sha256": "0" * 64}, BASE[:2])
    with pytest.raises(StaleBase):
        stage_patch(ShardStore(tmp_path / "elsewhere"), base, BASE[:2])


@pytest.mark.parametrize("patch, message", [
    ([61, 60], "piece 'e' .* does not match its digest"),  # e's tokens swapped
    ([60, 61, 62], "holds 3 tokens, but its new pieces take 2"),
])
def test_a_patch_that_does_not_add_up_is_refused_and_nothing_is_staged(tmp_path, patch, message):
    store, base = committed(tmp_path, BASE)
    new = BASE[:3] + pieces(("e", 60, 2))
    _, data, state = stage_patch(store, base, new, patch=np.array(patch, dtype=np.int32))
    # The patch file arrives intact (its own sha256 matches); what it holds does not fit.
    with pytest.raises(ShardError, match=message):
        store.put("ds", 0, data)
    with pytest.raises(ShardError, match="not completely staged"):
        store.commit("ds")
    assert store.describe("ds")["sha256"] == base["sha256"]


def test_a_whole_shard_staged_after_a_patch_starts_over(tmp_path):
    store, base = committed(tmp_path, BASE)
    new = BASE[:3] + pieces(("e", 60, 2))
    blob, _, _ = stage_patch(store, base, new)
    _, meta = payload(new)
    assert store.stage("ds", meta, len(blob), hashlib.sha256(blob).hexdigest()) == {"received": 0, "complete": False}
    assert store.put("ds", 0, blob)["complete"]
    store.commit("ds")
    assert store.shard_path("ds").read_bytes() == blob
