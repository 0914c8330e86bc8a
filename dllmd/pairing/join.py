"""The joiner's side of a pairing (``dllmd join CODE``): prove the code's secret, tell the inviter who
this node is and where its daemon listens, and trust what comes back (the admin key as admin, for a
peer the cluster's nodes as peers) in one atomic write of ``authorized_keys.toml``. A running daemon
picks the new keys up by itself (it re-reads the file when it changes: dllmd/net/keys.py)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dllmd.config import DAEMON_FILE, WILDCARD_HOSTS, ConfigError, NodeConfig, listen_host, validate_endpoint
from dllmd.net.identity import Identity, InvalidKey, parse_public_key
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.pairing.channel import MAX_INVITER_FRAME, PairingFailed, Pake, read_frame, unpack, write_frame, pack
from dllmd.pairing.code import InviteCode, InviteCodeError, key_fingerprint
from dllmd.pairing.messages import PROTOCOL, Hello, JoinAck, JoinReply, JoinRequest, JoinResult, PairingErrorCode, PakeReply

CONNECT_TIMEOUT_S = 10.0
STEP_TIMEOUT_S = 15.0
ENROLL_TIMEOUT_S = 120.0  # the inviter authorizes the key on every node of the cluster meanwhile
INVITED_ROLES = (Role.PEER.value, Role.CLIENT.value)


@dataclass
class JoinOutcome:
    role: str
    admin_key: str
    trusted: list[dict]  # what this node now authorizes: name, public_key, role
    result: JoinResult


def daemon_endpoint(home: Path, config: NodeConfig, advertise: str | None) -> str:
    """Where the cluster reaches this node's daemon: the endpoint a running daemon bound (its port
    when node.toml says 0), else node.toml's listen; ``advertise`` replaces the host, and must where
    the daemon listens on every interface."""
    endpoint = config.listen
    try:
        running = json.loads((home / DAEMON_FILE).read_text())
        os.kill(int(running["pid"]), 0)
        endpoint = str(running["endpoint"])
    except (FileNotFoundError, ValueError, KeyError, TypeError, ProcessLookupError, PermissionError):
        pass  # not running (or a stale file): node.toml says where it will listen
    host, port = listen_host(endpoint), endpoint.rsplit(":", 1)[1]
    if port in ("0", "*"):
        raise ConfigError(f"node.toml listens on {config.listen} (a free port chosen at start): start the daemon "
                          f"first ('dllmd start') or set a fixed port in node.toml")
    if advertise:
        host = advertise
    elif host in WILDCARD_HOSTS:
        raise ConfigError(f"the daemon listens on every interface ({endpoint}); give --advertise HOST, the "
                          f"address the cluster reaches this machine at")
    return validate_endpoint(f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}")


async def join(code: InviteCode, home: Path, identity: Identity, name: str, endpoint: str) -> JoinOutcome:
    """Run the pairing with the inviter at the code's address. Nothing is written unless both ends
    proved the secret and the inviter's key matches the code; raises PairingFailed otherwise."""
    if code.expired():
        raise PairingFailed(PairingErrorCode.EXPIRED, "this invite code has expired; ask for a new one "
                                                      "('dllmctl nodes invite')")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(code.host, code.port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise PairingFailed(PairingErrorCode.UNREACHABLE, f"cannot reach the inviter at {code.address} ({exc or 'timed out'}): the "
                                           f"invite was used, expired or stopped, or a firewall is in the way") from None
    try:
        return await _exchange(code, reader, writer, home, identity, name, endpoint)
    finally:
        writer.close()


async def _exchange(code, reader, writer, home, identity, name, endpoint) -> JoinOutcome:
    pake = Pake(code.password(), joiner=True)
    await write_frame(writer, False, pack(Hello(PROTOCOL, pake.message)))
    reply = unpack((await read_frame(reader, MAX_INVITER_FRAME, STEP_TIMEOUT_S)).body, PakeReply)
    channel = pake.finish(reply.pake)
    await write_frame(writer, True, channel.seal(JoinRequest(identity.public_key, name, endpoint)))
    offer = channel.open(await read_frame(reader, MAX_INVITER_FRAME, STEP_TIMEOUT_S), JoinReply,
                         PairingErrorCode.WRONG_SECRET)
    try:
        grants = _grants(code, offer, identity.public_key)
        AuthorizedKeys(home / "authorized_keys.toml").authorize_all(grants)
    except (PairingFailed, InvalidKey, OSError) as exc:
        await write_frame(writer, True, channel.seal(JoinAck(False, str(exc)[:1000])))
        if isinstance(exc, PairingFailed):
            raise
        raise PairingFailed(PairingErrorCode.REFUSED, f"could not trust the cluster's keys: {exc}") from None
    await write_frame(writer, True, channel.seal(JoinAck(True)))
    result = channel.open(await read_frame(reader, MAX_INVITER_FRAME, ENROLL_TIMEOUT_S), JoinResult,
                          PairingErrorCode.BAD_MESSAGE)
    trusted = [{"name": n, "public_key": k, "role": Role(r).value} for k, r, n, _ in grants]
    return JoinOutcome(offer.role, offer.admin_key, trusted, result)


def _grants(code: InviteCode, offer: JoinReply, own_key: str) -> list[tuple[str, Role, str, None]]:
    """What the reply asks this node to trust, checked: the admin key must be the one the code pins."""
    try:
        admin = parse_public_key(offer.admin_key).hex()
    except InvalidKey as exc:
        raise PairingFailed(PairingErrorCode.REFUSED, f"the inviter's admin key is invalid: {exc}") from None
    if key_fingerprint(admin) != code.fingerprint:
        raise PairingFailed(PairingErrorCode.REFUSED, "the inviter's key does not match the fingerprint in the code: "
                                                      "nothing was trusted")
    if offer.role not in INVITED_ROLES:
        raise PairingFailed(PairingErrorCode.REFUSED, f"invited as {offer.role!r}; a pairing grants peer or client")
    grants = [(admin, Role.ADMIN, offer.admin_name or "dllmctl admin", None)]
    if offer.role == Role.PEER.value:  # a client is not dialled by the cluster's nodes: it trusts none of them
        for node in offer.nodes:
            key = parse_public_key(node.public_key).hex()
            if key not in (own_key, admin):
                grants.append((key, Role.PEER, node.name, None))
    return grants


def decode_code(text: str) -> InviteCode:
    """The code as typed, refused with a clear message when it is malformed or expired."""
    code = InviteCode.decode(text)
    if code.expired():
        raise InviteCodeError("this invite code has expired; ask for a new one ('dllmctl nodes invite')")
    return code
