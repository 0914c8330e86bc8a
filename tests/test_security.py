"""Nobody without an authorized key can talk to a node, and roles limit what keys may do."""

from __future__ import annotations

import asyncio
import time

import pytest

from dllmd.net.client import CallTimeout, NodeKeyMismatch, NodeUnauthorized, RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.keys import Role
from tests.conftest import run_cli


async def _ping(identity: Identity, daemon, timeout: float = 5.0) -> dict:
    async with RpcClient(identity, daemon.address, daemon.public_key) as client:
        result, _ = await client.call("ping", timeout=timeout)
        return result


def test_unknown_key_gets_no_reply_and_changes_nothing(daemon_factory, user):
    daemon = daemon_factory(keys={user.public_key: Role.ADMIN})
    before = (daemon.home / "authorized_keys.toml").read_bytes()
    stranger = Identity.generate()

    async def scenario():
        async with RpcClient(stranger, daemon.address, daemon.public_key) as client:
            with pytest.raises(NodeUnauthorized):
                await client.call("keys.authorize", {"public_key": stranger.public_key, "role": "admin"}, timeout=5)
            with pytest.raises(NodeUnauthorized):
                await client.call("ping", timeout=5)

    asyncio.run(scenario())
    assert (daemon.home / "authorized_keys.toml").read_bytes() == before
    assert asyncio.run(_ping(user, daemon))["pong"] is True
    assert "refused unknown key" in daemon.log()


def test_wrong_server_key_is_detected(daemon_factory, user):
    daemon = daemon_factory(keys={user.public_key: Role.ADMIN})
    impostor_key = Identity.generate().public_key

    async def scenario():
        async with RpcClient(user, daemon.address, impostor_key) as client:
            with pytest.raises(NodeKeyMismatch, match="public key"):
                await client.call("ping", timeout=5)

    asyncio.run(scenario())


def test_client_role_cannot_call_admin_operations(daemon_factory, user):
    client_key = Identity.generate()
    daemon = daemon_factory(keys={user.public_key: Role.ADMIN, client_key.public_key: Role.CLIENT})
    before = (daemon.home / "authorized_keys.toml").read_bytes()

    async def scenario():
        async with RpcClient(client_key, daemon.address, daemon.public_key) as client:
            info, _ = await client.call("info")
            assert info["role"] == "client"
            for op, args in (("keys.list", {}), ("keys.authorize", {"public_key": client_key.public_key, "role": "admin"}),
                             ("keys.revoke", {"public_key": user.public_key})):
                with pytest.raises(RemoteError) as exc:
                    await client.call(op, args)
                assert exc.value.code == "forbidden"
                assert "admin" in exc.value.message

    asyncio.run(scenario())
    assert (daemon.home / "authorized_keys.toml").read_bytes() == before


def test_admin_manages_keys_remotely(daemon_factory, user):
    daemon = daemon_factory(keys={user.public_key: Role.ADMIN})
    newcomer = Identity.generate()

    async def scenario():
        async with RpcClient(user, daemon.address, daemon.public_key) as admin:
            await admin.call("keys.authorize", {"public_key": newcomer.public_key, "role": "client", "name": "laptop"})
            listed, _ = await admin.call("keys.list")
            assert {"public_key": newcomer.public_key, "role": "client", "name": "laptop", "models": None} in listed["keys"]
            with pytest.raises(RemoteError) as exc:
                await admin.call("keys.revoke", {"public_key": user.public_key})
            assert exc.value.code == "conflict"
            with pytest.raises(RemoteError) as exc:
                await admin.call("keys.authorize", {"public_key": "zz", "role": "client"})
            assert exc.value.code == "bad_args"
        async with RpcClient(newcomer, daemon.address, daemon.public_key) as client:
            info, _ = await client.call("info")
            assert info["role"] == "client"

    asyncio.run(scenario())


def test_revoke_and_authorize_apply_to_a_running_daemon(daemon_factory, user):
    member = Identity.generate()
    daemon = daemon_factory(keys={user.public_key: Role.ADMIN, member.public_key: Role.CLIENT})
    home = str(daemon.home)

    async def scenario():
        async with RpcClient(member, daemon.address, daemon.public_key) as client:
            await client.call("ping")
            done = run_cli("dllmd", "revoke", member.public_key, "--home", home)
            assert done.returncode == 0, done.stderr
            # The daemon looks at its keys file at most every 0.25 s: wait until it ignores the same,
            # already-encrypted connection, while it still answers the admin.
            await _until_ignored(client, user, daemon)
            with pytest.raises(CallTimeout):
                await client.call("ping", timeout=1.5)
        async with RpcClient(member, daemon.address, daemon.public_key) as client:
            with pytest.raises(NodeUnauthorized):
                await client.call("ping", timeout=5)
        done = run_cli("dllmd", "authorize", member.public_key, "--role", "client", "--home", home)
        assert done.returncode == 0, done.stderr
        async with RpcClient(member, daemon.address, daemon.public_key) as client:
            assert (await client.call("ping", timeout=5))[0]["pong"]

    asyncio.run(scenario())
    assert daemon.proc.poll() is None


async def _until_ignored(client: RpcClient, admin: Identity, daemon, timeout: float = 60.0) -> None:
    """Ping over ``client`` until the daemon stops answering it. Every round also pings as ``admin``: a
    round where the admin got no answer either only says the machine is slow, and is not counted."""
    deadline = time.monotonic() + timeout
    async with RpcClient(admin, daemon.address, daemon.public_key) as control:
        while time.monotonic() < deadline:
            probe, alive = await asyncio.gather(client.call("ping", timeout=2), control.call("ping", timeout=2),
                                                return_exceptions=True)
            if isinstance(alive, CallTimeout):
                continue  # too slow to tell: the next round
            if isinstance(alive, BaseException):
                raise alive
            if isinstance(probe, CallTimeout):
                return  # answered the admin, not the revoked key, sent first
            if isinstance(probe, BaseException):
                raise probe
    raise AssertionError(f"the daemon still answered a revoked key after {timeout:.0f} s")


def test_broken_keys_file_keeps_the_last_good_table(tmp_path):
    from dllmd.net.identity import InvalidKey
    from dllmd.net.keys import AuthorizedKeys

    keys = AuthorizedKeys(tmp_path / "authorized_keys.toml")
    member = Identity.generate()
    keys.authorize(member.public_key, Role.PEER, "p")
    (tmp_path / "authorized_keys.toml").write_text("keys = [ {broken")
    keys.refresh(force=True)
    assert keys.by_public_key(member.public_key).role == Role.PEER
    with pytest.raises(InvalidKey, match="not valid TOML"):
        AuthorizedKeys(tmp_path / "authorized_keys.toml").all()
