"""Who may talk to a node: authorized public keys, each with one role.

Roles:
    admin   deploy, train, manage keys (and everything a client may do)
    client  inference
    peer    another daemon: forwarding hidden states, all-reduce
    relay   a relay node: passes sealed session traffic on (client rights, nothing else)

The file (``authorized_keys.toml``) is edited by ``dllmd authorize/revoke`` while the daemon runs;
the daemon re-reads it whenever it changes on disk. It looks (one ``stat``) at most every
``RECHECK_S`` seconds, because a syscall per message is a measurable share of a loopback round
trip; so a revoke takes effect within a quarter second, without a restart.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import tomli_w

from dllmd.net.identity import InvalidKey, curve_public_z85, parse_public_key
from dllmd.storage import atomic_write


log = logging.getLogger("dllmd.keys")

RECHECK_S = 0.25


class Role(str, Enum):
    ADMIN = "admin"
    CLIENT = "client"
    PEER = "peer"
    # Another organization's coordinator: may drive federated rounds (``fed.*``) on the datasets the
    # owner opened to federation (``federated_datasets`` in node.toml), and nothing else.
    FEDERATION = "federation"
    # A relay node (dllmd/inference/relay.py): its key carries other people's sealed session traffic,
    # with a client's rights only, and may call nothing but the relay and session operations.
    RELAY = "relay"


@dataclass(frozen=True)
class AuthorizedKey:
    public_key: str
    role: Role
    name: str = ""
    models: tuple[str, ...] | None = None  # the models this key may run here; None: every model

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class AuthorizedKeys:
    """The authorized_keys.toml of one home, reloaded when the file changes."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._loaded = False
        self._by_key: dict[str, AuthorizedKey] = {}
        self._by_curve: dict[bytes, AuthorizedKey] = {}

    # --- reading -------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Reload if the file changed (inode, size or mtime), looking at most every RECHECK_S."""
        now = time.monotonic()
        if not force and now - self._checked_at < RECHECK_S:
            return
        self._checked_at = now
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp and self._stamp is not None:
            return
        if stamp is None:
            self._set({})
            self._stamp = stamp
            return
        try:
            table = self._parse(self.path.read_bytes())
        except InvalidKey as exc:
            if not self._loaded:
                raise
            # A running daemon keeps its last good table rather than lock everyone out over a typo.
            log.error("%s; keeping the previously loaded keys until it is fixed", exc)
            self._stamp = stamp
            return
        self._set(table)
        self._stamp = stamp

    def _parse(self, blob: bytes) -> dict[str, AuthorizedKey]:
        try:
            data = tomllib.loads(blob.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidKey(f"{self.path} is not valid TOML: {exc}") from None
        entries = data.get("keys", [])
        if not isinstance(entries, list):
            raise InvalidKey(f"{self.path}: 'keys' must be an array of tables")
        table: dict[str, AuthorizedKey] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise InvalidKey(f"{self.path}: keys[{i}] must be a table")
            try:
                key = parse_public_key(str(entry.get("public_key", ""))).hex()
                role = Role(entry.get("role"))
                models = _models(entry.get("models"))
            except ValueError as exc:
                raise InvalidKey(f"{self.path}: keys[{i}]: {exc}") from None
            table[key] = AuthorizedKey(key, role, str(entry.get("name", "")), models)
        return table

    def _set(self, table: dict[str, AuthorizedKey]) -> None:
        self._loaded = True
        self._by_key = table
        self._by_curve = {curve_public_z85(k): entry for k, entry in table.items()}

    def all(self) -> list[AuthorizedKey]:
        self.refresh()
        return sorted(self._by_key.values(), key=lambda e: (e.role.value, e.name, e.public_key))

    def by_public_key(self, public_key: str) -> AuthorizedKey | None:
        self.refresh()
        return self._by_key.get(public_key)

    def authorized_as(self, public_key: str, roles) -> bool:
        """Whether ``public_key`` is authorized here with one of ``roles`` (what a node checks before it
        dials a key: no outbound connection to a stranger)."""
        entry = self.by_public_key(public_key)
        return entry is not None and entry.role in roles

    def admits(self, public_key: str) -> bool:
        """Whether ``public_key`` may connect at all (any role), as ZAP decides for CURVE: the ring's
        bulk links ask this at every handshake, so a revoked key cannot join a ring it is named in."""
        self.refresh(force=True)
        return public_key in self._by_key

    def by_curve_key(self, z85_key: bytes) -> AuthorizedKey | None:
        """Look up a CURVE client key as ZAP presents it (z85). Handshakes are rare, so this always
        looks at the file: a key authorized a moment ago can connect at once."""
        self.refresh(force=True)
        return self._by_curve.get(z85_key)

    # --- writing (atomic; the daemon notices through refresh) -----------------------------------

    def authorize(self, public_key: str, role: Role | str, name: str = "",
                  models: list[str] | None = None) -> AuthorizedKey:
        return self.authorize_all([(public_key, role, name, models)])[0]

    def authorize_all(self, grants: list[tuple[str, Role | str, str, list[str] | None]]) -> list[AuthorizedKey]:
        """Authorize several keys (public key, role, name, models) in one atomic write: a pairing trusts
        its admin and the cluster's nodes at once, or none of them. Every key is checked before anything
        is written."""
        entries = [AuthorizedKey(parse_public_key(key).hex(), Role(role), name, _models(models))
                   for key, role, name, models in grants]
        self.refresh(force=True)
        table = dict(self._by_key)
        table.update((e.public_key, e) for e in entries)
        self._write(table)
        return entries

    def revoke(self, public_key: str) -> bool:
        key = parse_public_key(public_key).hex()
        self.refresh(force=True)
        if key not in self._by_key:
            return False
        table = {k: v for k, v in self._by_key.items() if k != key}
        self._write(table)
        return True

    def _write(self, table: dict[str, AuthorizedKey]) -> None:
        doc = {
            "keys": [
                {"public_key": e.public_key, "role": e.role.value, "name": e.name,
                 **({"models": list(e.models)} if e.models is not None else {})}
                for e in sorted(table.values(), key=lambda e: e.public_key)
            ]
        }
        atomic_write(self.path, tomli_w.dumps(doc).encode(), mode=0o600)
        self._stamp = None
        self.refresh(force=True)


def _models(value) -> tuple[str, ...] | None:
    """A key's ``models`` list as stored (absent: every model)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
        raise InvalidKey(f"models must be a list of model names, got {value!r}")
    return tuple(sorted(set(value)))
