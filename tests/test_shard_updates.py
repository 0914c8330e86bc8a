"""Re-sharding a changed source through real daemons: only the changed pieces move, the nodes build
their new shards from what they hold plus what they are sent, and the result holds what a fresh
shard of the new source would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from dllmctl.cluster.registry import NodeEntry
from dllmctl.data.progress import ShardProgress
from dllmctl.data.push import ShardUpload, push_shards
from dllmctl.data.records import DatasetRecords
from dllmctl.data.sharding import ShardRequest, shard_and_push
from dllmd.data import DataError, load_data_tokenizer, pack, read_samples, split_samples, tokenize_samples
from dllmd.data.pieces import piece_digest
from dllmd.data.shards import read_shard, shard_payload
from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.messages import data as M
from dllmd.net.messages.node import PING
from dllmd.net.wire import ErrorCode
from tests.conftest import local_daemons
from tests.tiny_models import make_tiny_model

SEQ_LEN = 64


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("updates")
    with local_daemons(root, 3) as cluster:
        homes = {n.name: Path(n.home) for n in cluster["nodes"]}
        entries = sorted(cluster["registry"].nodes.values(), key=lambda e: e.name)
        yield {**cluster, "homes": homes, "entries": entries, "model": make_tiny_model("llama", root / "model")}


def write_corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(10):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i % 4 + 1))
    (root / "big.py").write_text("".join(f"def step_{i}(state):\n    return state + {i}\n" for i in range(40)))
    return root


def shard(cluster, source: Path, name: str, strategy: str, **options) -> dict:
    request = ShardRequest(uri=str(source), model="tiny", model_dir=cluster["model"], strategy=strategy, name=name,
                           seq_len=SEQ_LEN, **options)
    return shard_and_push(cluster["user"], cluster["entries"], request, ShardProgress())


def held(cluster, name: str) -> dict[str, dict[str, list[int]]]:
    """Node name -> piece id -> its tokens, as the node's committed shard holds them."""
    contents = {}
    for node, home in cluster["homes"].items():
        path = home / "datasets" / name / "shard.safetensors"
        if path.exists():
            tokens, meta = read_shard(path)
            flat = tokens.reshape(-1).tolist()
            contents[node] = {row[0]: flat[row[1]:row[1] + row[2]] for row in meta["samples"]}
    return contents


def expected_pieces(cluster, source: Path) -> dict[str, str]:
    """Piece id -> digest of the source as a fresh read would cut it."""
    tokenizer = load_data_tokenizer(cluster["model"])
    samples = tokenize_samples(tokenizer, read_samples(str(source)).samples)
    return {p.id: piece_digest(p.ids) for p in split_samples(samples, SEQ_LEN).samples}


def node_of(contents: dict[str, dict]) -> dict[str, str]:
    return {piece: node for node, pieces in contents.items() for piece in pieces}


def change(source: Path) -> None:
    """Two files added, big.py grown (its last piece edited, new pieces after it), mod5 edited in
    place, mod7 removed."""
    (source / "added_a.py").write_text("print('a new module')\n" * 3)
    (source / "added_b.py").write_text("VALUE = 17\n")
    with (source / "big.py").open("a") as f:
        f.write("".join(f"def extra_{i}(state):\n    return state - {i}\n" for i in range(12)))
    (source / "mod5.py").write_text((source / "mod5.py").read_text().replace("return x * 5", "return x ** 5"))
    (source / "mod7.py").unlink()


def test_an_update_moves_only_the_changed_pieces(cluster, tmp_path):
    source = write_corpus(tmp_path / "repo")
    first = shard(cluster, source, "code", "hash")
    old = expected_pieces(cluster, source)
    assert first["pieces"] == len(old) > first["samples"] == 11  # big.py was cut
    assert first["changes"] == {"added": len(old), "removed": 0, "edited": 0, "moved": 0, "unchanged": 0}
    assert first["bytes_sent"] == sum(row["bytes"] for row in first["nodes"])
    before = held(cluster, "code")

    change(source)
    new = expected_pieces(cluster, source)
    report = shard(cluster, source, "code", "hash")
    edited = {p for p in new if p in old and new[p] != old[p]}
    assert report["changes"] == {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()),
                                 "edited": len(edited), "moved": 0,
                                 "unchanged": len(new.keys() & old.keys()) - len(edited)}
    assert report["changes"]["added"] >= 3 and report["changes"]["removed"] >= 1 and len(edited) >= 2

    after = held(cluster, "code")
    was, now = node_of(before), node_of(after)
    assert all(now[p] == was[p] for p in new if p in old)  # every remaining piece on the node it was on
    # Each node was sent the tokens of its new and edited pieces, and nothing else.
    for row in report["nodes"]:
        received = [p for p in after[row["node"]] if p not in before[row["node"]] or p in edited]
        assert row["received"] == len(received)
        assert row["sent_bytes"] == 4 * sum(len(after[row["node"]][p]) for p in received) < row["bytes"]
    # What the nodes hold is what a fresh shard of the new source gives, piece by piece.
    shard(cluster, source, "code-fresh", "hash")
    assert after == held(cluster, "code-fresh")

    # The record names the shards the nodes hold, for training to find and check.
    records = DatasetRecords(tmp_path / "records")
    records.save(report)
    for row in records.load("code")["nodes"]:
        path = cluster["homes"][row["node"]] / "datasets" / "code" / "shard.safetensors"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]
        assert read_shard(path)[0].shape[0] == row["sequences"]

    # Nothing changed: nothing is sent, no shard is rewritten.
    def mtimes() -> dict[str, int]:
        return {n: (h / "datasets" / "code" / "shard.safetensors").stat().st_mtime_ns
                for n, h in cluster["homes"].items()}

    written = mtimes()
    again = shard(cluster, source, "code", "hash")
    assert again["bytes_sent"] == 0 and again["changes"]["unchanged"] == len(new) and mtimes() == written

    # An emptied source is refused before any node is touched.
    for path in source.iterdir():
        path.unlink()
    with pytest.raises(DataError, match="no text samples"):
        shard(cluster, source, "code", "hash")
    assert held(cluster, "code") == after


def test_round_robin_keeps_pieces_where_they_are_and_rebalances_with_few_moves(cluster, tmp_path):
    source = write_corpus(tmp_path / "repo")
    shard(cluster, source, "rr", "round_robin")
    was = node_of(held(cluster, "rr"))
    for name in ("mod1.py", "mod2.py", "mod3.py"):
        (source / name).unlink()
    (source / "added.py").write_text("def added():\n    return 'new'\n" * 6)

    report = shard(cluster, source, "rr", "round_robin")
    now = node_of(held(cluster, "rr"))
    moved = [p for p in now if p in was and now[p] != was[p]]
    assert report["changes"]["moved"] == len(moved) <= 2
    assert report["changes"]["unchanged"] == sum(p in was for p in now) - len(moved)
    assert set(now) == set(expected_pieces(cluster, source))
    assert report["skew"] <= 1.10

    # --fresh places everything anew (as a first run would), still sending only what nodes lack.
    fresh = shard(cluster, source, "rr", "round_robin", fresh=True)
    shard(cluster, source, "rr-fresh", "round_robin")
    assert held(cluster, "rr") == held(cluster, "rr-fresh")
    assert fresh["bytes_sent"] < sum(row["bytes"] for row in fresh["nodes"])


def test_a_node_that_lost_its_shard_gets_it_whole_and_a_stale_patch_falls_back(cluster, tmp_path):
    source = write_corpus(tmp_path / "repo")
    shard(cluster, source, "lost", "hash")
    shutil.rmtree(cluster["homes"]["local-2"] / "datasets" / "lost")
    (source / "added.py").write_text("X = 1\n")
    report = shard(cluster, source, "lost", "hash")
    rows = {row["node"]: row for row in report["nodes"]}
    assert rows["local-2"]["sent_bytes"] == rows["local-2"]["bytes"] and rows["local-2"]["kept"] == 0
    assert held(cluster, "lost") == (shard(cluster, source, "lost-fresh", "hash"), held(cluster, "lost-fresh"))[1]

    # A patch on a base the node no longer has: the node answers conflict, the whole shard goes instead.
    node = next(e for e in cluster["entries"] if e.name == "local-1")
    tokenizer = load_data_tokenizer(cluster["model"])
    samples = split_samples(tokenize_samples(tokenizer, read_samples(str(source)).samples), SEQ_LEN).samples[:3]
    blob, meta = shard_payload(pack(samples, SEQ_LEN, tokenizer.eos_token_id), dataset="lost")
    upload = ShardUpload(NodeEntry(node.name, node.address, node.public_key), blob, meta, patch=b"", base="0" * 64)
    asyncio.run(push_shards(cluster["user"], "lost", [upload]))
    assert upload.patch is None and upload.sent == len(blob)
    assert (cluster["homes"]["local-1"] / "datasets" / "lost" / "shard.safetensors").read_bytes() == blob


def test_hostile_patches_are_refused_with_their_error_codes_and_the_node_keeps_serving(cluster, tmp_path):
    shard(cluster, write_corpus(tmp_path / "repo"), "wire", "hash")
    node = cluster["entries"][0]
    empty = hashlib.sha256(b"").hexdigest()

    async def run() -> dict[str, str]:
        async with RpcClient(cluster["user"], node.address, node.public_key) as client:
            reply, tensors = await client.invoke(M.DATA_DESCRIBE, M.DatasetArgs(dataset="wire"))
            meta = json.loads(tensors[0].numpy().tobytes())
            assert reply.sha256 == meta["sha256"] and all(len(row) == 4 for row in meta["samples"])

            async def code(op, args, description=meta) -> str:
                frame = torch.frombuffer(bytearray(json.dumps(description).encode()), dtype=torch.int8)
                try:
                    await client.invoke(op, args, [frame] if op is M.DATA_STAGE_PATCH else [])
                except RemoteError as exc:
                    return exc.code
                return "accepted"

            def patch(**fields) -> M.PatchArgs:
                return M.PatchArgs(**{"dataset": "wire", "bytes": 0, "sha256": empty, "base": reply.sha256,
                                      "shard_bytes": 4096, "shard_sha256": "0" * 64, **fields})

            codes = {
                "describe a dataset it does not hold": await code(M.DATA_DESCRIBE, M.DatasetArgs(dataset="ghost")),
                "a base it does not hold": await code(M.DATA_STAGE_PATCH, patch(base="1" * 64)),
                "a shard too large to build": await code(M.DATA_STAGE_PATCH, patch(shard_bytes=2**40)),
                "half a token": await code(M.DATA_STAGE_PATCH, patch(bytes=3)),
                "a piece of a billion tokens": await code(
                    M.DATA_STAGE_PATCH, patch(), {**meta, "samples": [["x", 0, 10**9, "0" * 32]]}),
                "rows that are not rows": await code(M.DATA_STAGE_PATCH, patch(), {**meta, "samples": [7, "x"]}),
                "a shard that is not what it claims": await code(M.DATA_STAGE_PATCH, patch()),
            }
            await client.invoke(PING, timeout=5)
            return codes

    assert asyncio.run(run()) == {
        "describe a dataset it does not hold": ErrorCode.NOT_FOUND, "a base it does not hold": ErrorCode.CONFLICT,
        "a shard too large to build": ErrorCode.TOO_LARGE, "half a token": ErrorCode.BAD_ARGS,
        "a piece of a billion tokens": ErrorCode.BAD_ARGS, "rows that are not rows": ErrorCode.BAD_ARGS,
        "a shard that is not what it claims": ErrorCode.BAD_ARGS}
    assert not (cluster["homes"][node.name] / "datasets" / ".incoming" / "wire" / "shard.safetensors").exists()
