"""Pairing a new machine: 'dllmctl nodes invite' on the admin's side, 'dllmd join CODE' on the new
machine, against a real local cluster of two daemons (and real daemons for the new nodes)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from dllmd import hardware
from dllmd.config import ConfigError, NodeConfig
from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys
from dllmd.net.messages.node import PEERS_PING, PeerArgs, PingPeersArgs
from dllmd.pairing.channel import PairingFailed
from dllmd.pairing.code import InviteCode, InviteCodeError
from dllmd.pairing.join import join
from dllmctl.cluster.discover import discover
from dllmctl.cluster.registry import Registry
from tests.conftest import cli_user_cluster, run_cli, start_daemon


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairing")
    with cli_user_cluster(root, 2) as directory:
        yield {"root": root, "dir": directory, "user": Identity.load(root / "config" / "identity"),
               "homes": {name: directory / name for name in ("local-1", "local-2")}}


class Invite:
    """A running 'dllmctl nodes invite' and the code it printed."""

    def __init__(self, *options: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "dllmctl", "nodes", "invite", "--listen", "127.0.0.1:0",
                                      "--json", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        self.shown = json.loads(line)
        self.code = InviteCode.decode(self.shown["code"])

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _ok(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _snapshot(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file() and p.name != "dllmd.log"}


def _roles(home: Path) -> dict[str, str]:
    return {k.public_key: k.role.value for k in AuthorizedKeys(home / "authorized_keys.toml").all()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_invite_and_join_a_running_daemon(cluster, tmp_path):
    user, old = cluster["user"], cluster["homes"]
    old_keys = {name: Identity.load(home / "identity").public_key for name, home in old.items()}
    home = tmp_path / "newbie"
    new = _ok(run_cli("dllmd", "init", "--home", str(home), "--listen", "tcp://127.0.0.1:0", "--name", "newbie", "--json"))
    # Announced over mDNS, on loopback only.
    dataclasses.replace(NodeConfig.load(home), discoverable=True, discovery_interfaces=["127.0.0.1"]).save(home)
    # Same machine as the cluster's daemons: share their hardware measurement (as 'cluster up' does).
    shutil.copyfile(old["local-1"] / hardware.CACHE_FILE, home / hardware.CACHE_FILE)
    daemon = start_daemon(home)
    invite = Invite("--role", "peer", "--expires", "60s")
    try:
        # Announced, not registered: discovery shows it and grants nothing.
        seen = [r for r in discover(Registry(cluster["root"] / "config" / "cluster.toml"), 3.0, ["127.0.0.1"])
                if r.node_id == new["node_id"]]
        assert [(r.name, r.endpoint, r.registered_as) for r in seen] == [("newbie", daemon.address, "")]
        assert _roles(home) == {}
        joined = _ok(run_cli("dllmd", "join", invite.shown["code"], "--home", str(home), "--json"))
        rc, out, err = invite.finish()
        assert rc == 0, err
        done = json.loads(out)
        assert done["joined"]["public_key"] == new["public_key"] and done["registered_as"] == "newbie"
        assert sorted(done["authorized_on"]) == sorted(joined["authorized_on"]) == ["local-1", "local-2"]
        assert joined["role"] == "peer" and joined["endpoint"] == daemon.address and not joined["failed"]

        # The old nodes authorize the new one as a peer; it trusts the admin and them.
        for name in old:
            assert _roles(old[name])[new["public_key"]] == "peer"
        assert _roles(home) == {user.public_key: "admin", **{k: "peer" for k in old_keys.values()}}
        entry = Registry(cluster["root"] / "config" / "cluster.toml").nodes["newbie"]
        assert (entry.address, entry.public_key) == (daemon.address, new["public_key"])

        # The running daemon picked the keys up: the admin reaches it, and so does a peer link both ways.
        rows = {r["name"]: r for r in _ok(run_cli("dllmctl", "nodes", "list", "--json"))}
        assert rows["newbie"]["status"] == "up"
        found = _ok(run_cli("dllmctl", "nodes", "discover", "--interface", "127.0.0.1", "--timeout", "2", "--json"))
        assert {"name": "newbie", "node_id": new["node_id"], "endpoint": daemon.address, "registered_as": "newbie",
                "address_matches": True} in found

        async def ping_newbie_from_local_1():
            local_1 = Registry(cluster["root"] / "config" / "cluster.toml").nodes["local-1"]
            async with RpcClient(user, local_1.address, local_1.public_key) as client:
                reply, _ = await client.invoke(PEERS_PING, PingPeersArgs([PeerArgs(new["public_key"], daemon.address)], 3), timeout=20)
            return reply.peers[0]

        rtt = asyncio.run(ping_newbie_from_local_1())
        assert rtt.error == "" and rtt.samples == 3 and rtt.rtt_ms > 0

        # The code is used: nobody serves it any more, and a second join changes nothing.
        before = _snapshot(home)
        again = run_cli("dllmd", "join", invite.shown["code"], "--home", str(home))
        assert again.returncode == 1 and "unreachable" in again.stderr and "Traceback" not in again.stderr
        assert _snapshot(home) == before
    finally:
        invite.kill()
        daemon.stop()
        run_cli("dllmctl", "nodes", "remove", "newbie")


def _frame(reply: bytes) -> dict:
    (length,) = struct.unpack(">I", reply[:4])
    assert reply[4] == 0 and len(reply) == 4 + length  # a clear frame: the refusal
    return msgpack.unpackb(reply[5:])


def _exchange(port: int, payload: bytes) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return _frame(b"".join(chunks))


def test_hostile_pairing_socket_wrong_secret_then_a_client_joins_without_its_daemon(cluster, tmp_path):
    user, old = cluster["user"], cluster["homes"]
    invite = Invite("--role", "client", "--expires", "60s")
    port = invite.code.port
    try:
        huge = struct.pack(">I", 64 * 1024 * 1024) + b"x" * 1000
        for payload, code in [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad_message"), (huge, "bad_message"),
                              (struct.pack(">IB", 9, 0) + b"\x93\x01\x02\x03" + b"\0" * 4, "bad_message"),
                              (struct.pack(">IB", 3, 7) + b"ab", "bad_message")]:
            assert _exchange(port, payload)["body"]["code"] == code
        hello = msgpack.packb({"kind": "Hello", "body": {"protocol": 1, "pake": b"A" + os.urandom(40)}})
        refused = _exchange(port, struct.pack(">IB", len(hello) + 1, 0) + hello)
        assert refused["kind"] == "PairingError" and refused["body"]["code"] == "bad_message"

        # A flood: the bucket and the cap on connections say 'busy' to the excess; memory stays bounded.
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        time.sleep(0.5)
        busy = 0
        for s in flood:
            s.settimeout(0.2)
            try:
                busy += bool(s.recv(4096))
            except TimeoutError:
                pass
            s.close()
        assert busy >= 25 and invite.proc.poll() is None

        # A wrong secret (the right address and fingerprint): refused, counted, nothing written.
        stranger = tmp_path / "stranger"
        _ok(run_cli("dllmd", "init", "--home", str(stranger), "--listen", f"tcp://127.0.0.1:{_free_port()}",
                    "--name", "stranger", "--json"))
        before = _snapshot(stranger)
        wrong = dataclasses.replace(invite.code, secret=os.urandom(12)).encode()
        time.sleep(2.5)  # the bucket refills after the flood
        refused = run_cli("dllmd", "join", wrong, "--home", str(stranger))
        assert refused.returncode == 1 and "wrong_secret" in refused.stderr and "2 attempt(s) left" in refused.stderr
        assert _snapshot(stranger) == before
        assert all(Identity.load(stranger / "identity").public_key not in _roles(h) for h in old.values())

        # 'dllmd init --join' on a machine whose daemon is not running yet: a client is authorized only.
        box = tmp_path / "box"
        box_port = _free_port()
        joined = _ok(run_cli("dllmd", "init", "--home", str(box), "--listen", f"tcp://127.0.0.1:{box_port}",
                             "--name", "box", "--join", invite.shown["code"], "--json"))
        rc, out, err = invite.finish()
        assert rc == 0, err
        assert json.loads(out)["refused"]["wrong_secret"] == 1
        box_key = Identity.load(box / "identity").public_key
        assert joined["role"] == "client" and joined["registered_as"] == "" and joined["endpoint"] == f"tcp://127.0.0.1:{box_port}"
        assert all(_roles(h)[box_key] == "client" for h in old.values())
        assert _roles(box) == {user.public_key: "admin"}  # a client trusts no node as a peer
        assert "box" not in Registry(cluster["root"] / "config" / "cluster.toml").nodes
    finally:
        invite.kill()


def test_wrong_secrets_burn_the_invite_and_bad_or_expired_codes_change_nothing(cluster, tmp_path):
    invite = Invite("--expires", "60s")
    identity = Identity.generate()
    (tmp_path / "j").mkdir()
    try:
        wrong = dataclasses.replace(invite.code, secret=os.urandom(12))
        codes = []
        for _ in range(3):
            with pytest.raises(PairingFailed) as failed:
                asyncio.run(join(wrong, tmp_path / "j", identity, "j", "tcp://127.0.0.1:9"))
            codes.append((failed.value.code, failed.value.attempts_left))
        assert codes == [("wrong_secret", 2), ("wrong_secret", 1), ("burnt", 0)]
        rc, _, err = invite.finish()
        assert rc == 1 and "burnt" in err
        with pytest.raises(PairingFailed) as failed:  # the right secret now: nobody serves it
            asyncio.run(join(invite.code, tmp_path / "j", identity, "j", "tcp://127.0.0.1:9"))
        assert failed.value.code == "unreachable"
        assert list((tmp_path / "j").iterdir()) == []
    finally:
        invite.kill()

    expiring = Invite("--expires", "1s")
    rc, _, err = expiring.finish()
    assert rc == 1 and "expired" in err
    home = tmp_path / "late"
    done = run_cli("dllmd", "join", expiring.shown["code"], "--home", str(home))
    assert done.returncode == 1 and "expired" in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = run_cli("dllmd", "init", "--home", str(home), "--join", "not a code!")  # mistyped codes: below
    assert done.returncode == 1 and "not an invite code" in done.stderr and not home.exists(), done.stderr


def test_code_round_trips_and_refuses_typos():
    key = Identity.generate().public_key
    for host in ("192.168.1.20", "fe80::1", "box.local"):
        code = InviteCode.new(host, 7741, key, 600)
        text = code.encode()
        assert InviteCode.decode(text.lower().replace("-", " ")) == code
        typo = text[:10] + ("A" if text[10] != "A" else "B") + text[11:]
        with pytest.raises(InviteCodeError, match="mistyped"):
            InviteCode.decode(typo)
    with pytest.raises(InviteCodeError):
        InviteCode.decode("x" * 10_000)


def test_joiner_refuses_an_inviter_whose_key_is_not_the_codes(tmp_path):
    """An inviter that holds the secret but answers with another admin key than the code pins: the
    joiner writes nothing and says why; the invite stays pending."""
    from dllmctl.cluster.invite import PairingServer
    from dllmd.net.keys import Role
    from dllmd.pairing.code import key_fingerprint

    async def scenario():
        server = PairingServer(Identity.generate(), tmp_path / "cluster.toml", Role.PEER, 30, "127.0.0.1", 0)
        code = await server.start()
        server.code = dataclasses.replace(code, fingerprint=key_fingerprint(Identity.generate().public_key))
        try:
            with pytest.raises(PairingFailed) as failed:
                await join(server.code, tmp_path, Identity.generate(), "j", "tcp://127.0.0.1:9")
            for _ in range(100):  # the joiner's refusal (a sealed JoinAck) reaches the inviter
                if server.state == "pending" and server.outcome.refused:
                    break
                await asyncio.sleep(0.05)
        finally:
            await server.stop()
        return failed.value, server.state, server.outcome.refused

    failure, state, refused = asyncio.run(scenario())
    assert failure.code == "refused" and "fingerprint" in failure.message
    assert state == "pending" and refused == {"refused": 1} and not (tmp_path / "authorized_keys.toml").exists()


def test_discovery_settings_are_checked():
    for bad in ("127.0.0.1", [], ["not-an-ip"], [1]):
        with pytest.raises(ConfigError, match="discovery_interfaces"):
            NodeConfig(name="n", discovery_interfaces=bad)
    with pytest.raises(ConfigError, match="discoverable"):
        NodeConfig(name="n", discoverable="yes")
