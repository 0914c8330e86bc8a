"""`dllmctl shard-data` through real daemons: shards land on their nodes (verified, all or nothing),
local-only shards never travel, and `data list|show|rm` manage them."""

from __future__ import annotations

import hashlib
import json
import os
import signal

from tests.conftest import run_cli
from tests.test_cli_inference import _ok, cluster3  # noqa: F401  (fixture)
from tests.tiny_models import make_tiny_model


def _corpus(root):
    root.mkdir()
    for i in range(12):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    (root / "blob.bin").write_bytes(b"\x00\x01" * 100)
    (root / ".gitignore").write_text("ignored.py\n")
    (root / "ignored.py").write_text("secret = 1\n")
    return root


def test_shard_data_places_verifies_and_removes(cluster3, tmp_path):  # noqa: F811
    _ok(run_cli("dllmctl", "model", "import", str(make_tiny_model("llama", tmp_path / "src")), "--name", "tiny",
                "--json"))
    corpus = _corpus(tmp_path / "repo")
    report = _ok(run_cli("dllmctl", "shard-data", str(corpus), "-m", "tiny", "--strategy", "round_robin",
                         "--seq-len", "64", "--json"))
    assert report["dataset"] == "repo" and report["samples"] == 13 and report["skew"] >= 1.0
    # 12 .py files and the .gitignore; the longer files cut into pieces of one sequence, balanced by tokens.
    assert sum(n["samples"] for n in report["nodes"]) == report["pieces"] > 13 and report["skew"] <= 1.10
    assert report["changes"]["added"] == report["pieces"] and report["bytes_sent"] > 0
    assert sum(n["tokens"] for n in report["nodes"]) == report["tokens"]
    assert any(s["kind"] == "binary" for s in report["skipped"])
    # Each node holds exactly the shard the report names.
    for row in report["nodes"]:
        shard = tmp_path / "c" / row["node"] / "datasets" / "repo" / "shard.safetensors"
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == row["sha256"]
    listed = _ok(run_cli("dllmctl", "data", "list", "--json"))
    assert [d["dataset"] for d in listed] == ["repo"]
    assert _ok(run_cli("dllmctl", "data", "show", "repo", "--json"))["nodes"] == report["nodes"]
    # Run again on the same source: an update with nothing to do.
    again = run_cli("dllmctl", "shard-data", str(corpus), "-m", "tiny", "--strategy", "round_robin", "--seq-len", "64")
    assert again.returncode == 0, again.stderr
    summary = f"0 added, 0 removed, 0 edited, 0 moved, {report['pieces']} unchanged; sent 0 B"
    assert summary in " ".join(again.stdout.split())

    # Local-only: every node reads its own path, under its data roots (by default a 'datasets' folder
    # beside its home: here all three share it); same data, so the same counts on each.
    shared = _corpus(tmp_path / "c" / "datasets")
    local = _ok(run_cli("dllmctl", "shard-data", str(shared), "-m", "tiny", "--local-only", "--name", "priv",
                        "--seq-len", "64", "--json"))
    assert local["strategy"] == "local" and [n["samples"] for n in local["nodes"]] == [13, 13, 13]
    # Anything else is refused by every node before it reads a byte: outside the roots, through a
    # symlink or '..' out of them, or the node's own home (its secret key).
    (shared / "escape").symlink_to(corpus)
    for path in (corpus, shared / "escape", shared / ".." / ".." / "repo", tmp_path / "c" / "local-1"):
        done = run_cli("dllmctl", "shard-data", str(path), "-m", "tiny", "--local-only", "--name", "stolen",
                       "--seq-len", "64")
        said = " ".join(done.stderr.split())
        assert done.returncode != 0 and "forbidden: " in said and "data_roots" in said, (path, said)
        assert "no node's data was changed" in said
        assert not any((tmp_path / "c" / f"local-{i}" / "datasets" / "stolen").exists() for i in (1, 2, 3))

    # A shard whose description (the per-sample table) is far over a message header's 64 KiB.
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": f"record-with-a-long-stable-identifier-{i:06d}" + "x" * 40,
                                           "text": f"sample {i}"}) + "\n" for i in range(3000)))
    big = _ok(run_cli("dllmctl", "shard-data", str(records), "-m", "tiny", "--strategy", "hash", "--seq-len", "256",
                      "--json"))
    assert big["samples"] == 3000 and sum(n["samples"] for n in big["nodes"]) == 3000

    # The benchmark: every strategy asked for, on its own temporary nodes, figures per strategy.
    bench = _ok(run_cli("dllmctl", "bench", "shard-data", "-m", "tiny", "--source", str(corpus), "--nodes", "2",
                        "--strategies", "round_robin,dht", "--seq-len", "64", "--json"))
    assert bench["files"] == 12 and [r["strategy"] for r in bench["strategies"]] == ["round_robin", "dht"]
    assert bench["strategies"][0]["tokens_per_node"] and sum(bench["strategies"][0]["tokens_per_node"]) == bench["tokens"]
    assert sum(bench["strategies"][1]["tokens_per_node"]) == 2 * bench["tokens"]  # dht keeps 2 copies
    assert all(r["tokens_per_second"] > 0 and r["skew"] >= 1.0 for r in bench["strategies"])

    # Bad input: a clear message, no traceback.
    for args, needle in ((["shard-data", str(tmp_path / "none"), "-m", "tiny"], "does not exist"),
                         (["shard-data", str(corpus), "-m", "tiny", "--strategy", "nope"], "unknown strategy"),
                         (["shard-data", str(corpus), "-m", "tiny", "--strategy", "hash", "--replicas", "2"], "dht"),
                         (["data", "show", "ghost"], "no dataset")):
        done = run_cli("dllmctl", *args)
        assert done.returncode != 0 and needle in " ".join(done.stderr.split()) and "Traceback" not in done.stderr, (args, done.stderr)

    # An unreachable node: refused, and no node got a new dataset.
    state = json.loads((tmp_path / "c" / "cluster.json").read_text())["nodes"]
    os.kill(state[2]["pid"], signal.SIGKILL)
    done = run_cli("dllmctl", "shard-data", str(corpus), "-m", "tiny", "--name", "partial", "--seq-len", "64")
    assert done.returncode != 0 and "no node's data was changed" in " ".join(done.stderr.split())
    for node in ("local-1", "local-2"):
        assert not (tmp_path / "c" / node / "datasets" / "partial").exists()

    removed = _ok(run_cli("dllmctl", "data", "rm", "repo", "--json"))
    assert removed["nodes"]["local-1"] == "removed"
    assert not (tmp_path / "c" / "local-1" / "datasets" / "repo").exists()
