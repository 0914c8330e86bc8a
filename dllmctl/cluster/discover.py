"""``dllmctl nodes discover``: the daemons announcing themselves on the LAN (mDNS, ``_dllm._tcp``),
marked with what the registry knows of them. What an announcement says is unchecked input: it is
shown, never trusted (registering a node pins its key; pairing is how a key is learned safely)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dllmd.config import ConfigError, validate_endpoint, validate_name
from dllmd.discovery import SERVICE_TYPE, TXT_ENDPOINT, TXT_ID, TXT_NAME
from dllmctl.cluster.registry import Registry

_HEX = set("0123456789abcdef")


@dataclass
class Discovered:
    name: str
    node_id: str  # the fingerprint it announces (the first 12 hex digits of its key's sha256)
    endpoint: str  # where it says it listens, with an address its announcement carried
    registered_as: str  # the registered node with that id, "" if none
    address_matches: bool  # the registered address is one it announces


def browse(timeout_s: float, interfaces: list[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, node id, endpoints) of every well-formed announcement seen within ``timeout_s``."""
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    seen: set[str] = set()

    class Collect(ServiceListener):
        def add_service(self, zc, type_, name):
            if len(seen) < 1024:  # a LAN that announces more is not one we list
                seen.add(name)

        def update_service(self, zc, type_, name):
            self.add_service(zc, type_, name)

        def remove_service(self, zc, type_, name):
            seen.discard(name)

    zeroconf = Zeroconf(interfaces=interfaces or "all")
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, Collect())
        time.sleep(timeout_s)
        browser.cancel()
        found = []
        for instance in sorted(seen):
            info = zeroconf.get_service_info(SERVICE_TYPE, instance, timeout=1000)
            parsed = _parse(info) if info is not None else None
            if parsed is not None:
                found.append(parsed)
        return found
    finally:
        zeroconf.close()


def _parse(info) -> tuple[str, str, list[str]] | None:
    props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
    name, node_id, announced = props.get(TXT_NAME, ""), props.get(TXT_ID, ""), props.get(TXT_ENDPOINT, "")
    try:
        validate_name(name)
        validate_endpoint(announced)
    except ConfigError:
        return None
    if len(node_id) != 12 or not set(node_id) <= _HEX or not info.port:
        return None
    endpoints = [f"tcp://[{a}]:{info.port}" if ":" in a else f"tcp://{a}:{info.port}" for a in info.parsed_addresses()]
    return name, node_id, endpoints or [announced]


def discover(registry: Registry, timeout_s: float, interfaces: list[str] | None = None) -> list[Discovered]:
    """The announcements, each marked with the registered node of the same id."""
    by_id = {e.node_id: e for e in registry.nodes.values()}
    rows = []
    for name, node_id, endpoints in browse(timeout_s, interfaces):
        entry = by_id.get(node_id)
        rows.append(Discovered(name, node_id, endpoints[0], entry.name if entry else "",
                               entry is not None and entry.address in endpoints))
    return rows
