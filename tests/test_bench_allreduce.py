"""`dllmctl bench allreduce`: gloo and our all-reduce (encrypted and plaintext) in one run, checked sums,
figures and ratios, and a sweep of the ring against the tree by size; the daemon's ring.* operations
refuse plaintext unless node.toml allows it."""

from __future__ import annotations

import asyncio
import json

import pytest

from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import Role
from tests.conftest import run_cli


def test_bench_allreduce_reports_gloo_and_both_rings(user_env, user):
    done = run_cli("dllmctl", "bench", "allreduce", "--size", "1MB", "--nodes", "3", "--iterations", "2", "--rounds",
                   "2", "--sweep", "4KB,1MB", "--json", timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["nodes"] == 3 and report["bytes"] == 1_000_000 and report["elements"] == 250_000
    assert report["iterations"] == 2 and report["rounds"] == 2
    for key in ("gloo", "encrypted", "plaintext"):
        row = report[key]
        assert row["median_ms"] > 0 and row["bus_gb_per_s"] > 0 and row["ratio_to_gloo"] > 0, (key, row)
        assert len(row["iteration_ms"]) == 4 and len(row["rank_median_ms"]) == 3  # 2 rounds of 2
        # bus bandwidth: 2(n-1)/n * bytes / seconds
        assert row["bus_gb_per_s"] == pytest.approx(4 / 3 * 1e6 / (row["median_ms"] / 1000) / 1e9, rel=1e-2)
    assert report["gloo"]["ratio_to_gloo"] == 1.0
    assert report["encrypted"]["target_ratio"] == 0.6 and report["plaintext"]["target_ratio"] == 0.9
    assert report["encrypted"]["bucket_bytes"] == 4 * 2**20 and report["plaintext"]["bucket_bytes"] == 16 * 2**20
    assert report["algorithm"] == "auto" and report["encrypted"]["algorithm"] == "ring"  # 1 MB: above the tree's
    # The sweep: gloo, the ring and the tree at each size, which was faster, and what auto takes there.
    assert [row["bytes"] for row in report["sweep"]] == [4000, 1_000_000]
    for row in report["sweep"]:
        assert row["ring"]["algorithm"] == "ring" and row["tree"]["algorithm"] == "tree", row
        assert row["faster"] == min(("ring", "tree"), key=lambda key: row[key]["median_ms"])
        assert all(row[key]["median_ms"] > 0 for key in ("gloo", "ring", "tree"))
    assert [row["auto"] for row in report["sweep"]] == ["tree", "ring"]
    for key in ("encrypted", "plaintext"):
        row = report[key]
        assert row["ratio_to_gloo"] == pytest.approx(report["gloo"]["median_ms"] / row["median_ms"], rel=1e-2)
        assert row["meets_target"] == (row["ratio_to_gloo"] >= row["target_ratio"])

    # Bad options: a clear message before any node starts.
    for option, size, needle in (("--size", "12XB", "like 64MB"), ("--size", "3GB", "between"),
                                 ("--size", "5", "multiple of 4"), ("--sweep", "4KB,x", "like 64MB"),
                                 ("--algorithm", "star", "one of auto, ring, tree")):
        bad = run_cli("dllmctl", "bench", "allreduce", option, size)
        assert bad.returncode != 0 and needle in " ".join(bad.stderr.split()) and "Traceback" not in bad.stderr, \
            (size, bad.stderr)


def test_ring_ops_refuse_plaintext_unless_allowed_and_check_their_arguments(daemon_factory):
    admin, client_key = Identity.generate(), Identity.generate()
    node = daemon_factory("ring", keys={admin.public_key: Role.ADMIN, client_key.public_key: Role.CLIENT},
                          config={"bench_operations": True})

    async def main():
        async with RpcClient(admin, node.address, node.public_key) as c:
            with pytest.raises(RemoteError) as refused:
                await c.call("ring.open", {"plaintext": True}, timeout=10)
            assert refused.value.code == "bad_args" and "allow_plaintext_ring = true" in refused.value.message
            with pytest.raises(RemoteError) as unopened:
                await c.call("ring.form", {"members": [], "rank": 0}, timeout=10)
            assert unopened.value.code == "conflict" and "ring.open" in unopened.value.message

            opened, _ = await c.call("ring.open", {"plaintext": False}, timeout=10)
            assert opened["endpoint"].startswith("tcp://127.0.0.1:") and opened["plaintext"] is False
            other = Identity.generate()
            members = [{"public_key": node.public_key, "endpoint": opened["endpoint"]},
                       {"public_key": other.public_key, "endpoint": "tcp://127.0.0.1:9"}]
            run = {"members": members, "rank": 0, "elements": 1000, "iterations": 1}
            for change, needle in (({"iterations": 0}, "iterations must be >= 1"),
                                   ({"iterations": 101}, "iterations must be <= 100"),
                                   ({"elements": 512 * 1024 * 1024 + 1}, "elements must be <="),
                                   ({"rank": 1}, "is not this node"),
                                   ({"algorithm": "star"}, "algorithm must be one of"),
                                   ({"rank": 2}, "not below the member count"),
                                   ({"members": members[:1]}, "at least 2 members"),
                                   ({"members": [members[0], {**members[1], "public_key": "zz"}]}, "public_key"),
                                   ({"members": [members[0], {**members[1], "endpoint": "ipc:///x"}]}, "tcp://")):
                with pytest.raises(RemoteError) as bad:
                    await c.call("ring.run", {**run, **change}, timeout=10)
                assert bad.value.code == "bad_args" and needle in bad.value.message, (change, bad.value.message)
            assert (await c.call("ring.close", timeout=10))[0] == {"closed": True}
            assert (await c.call("ring.close", timeout=10))[0] == {"closed": False}
            await c.call("ring.open", {"plaintext": False}, timeout=10)  # left open: must not hold up a stop

        async with RpcClient(client_key, node.address, node.public_key) as c:
            with pytest.raises(RemoteError) as forbidden:
                await c.call("ring.open", {"plaintext": False}, timeout=10)
            assert forbidden.value.code == "forbidden"

    asyncio.run(main())
    assert node.stop(timeout=15) == 0  # the open ring socket is closed with the server, not left to hang


def test_a_production_node_does_not_serve_the_benchmark_operations(daemon_factory):
    admin = Identity.generate()
    node = daemon_factory("plain", keys={admin.public_key: Role.ADMIN})

    async def main():
        async with RpcClient(admin, node.address, node.public_key) as c:
            with pytest.raises(RemoteError) as unknown:
                await c.call("ring.open", {"plaintext": False}, timeout=10)
            assert unknown.value.code == "unknown_op"

    asyncio.run(main())
