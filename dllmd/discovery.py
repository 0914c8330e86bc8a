"""LAN discovery: a daemon with ``discoverable = true`` in node.toml announces itself over mDNS
(zeroconf) as ``_dllm._tcp.local.``, with its name, node id (the fingerprint of its key) and
endpoint. ``dllmctl nodes discover`` browses for them (dllmctl/cluster/discover.py).

An announcement is a hint for the admin, never trust: anyone on the LAN can announce anything, and
a daemon's CURVE socket still refuses every key it has not authorized. Trust comes from pairing
(``dllmctl nodes invite`` / ``dllmd join``) or keys given by hand.
"""

from __future__ import annotations

import logging
import socket

from dllmd.config import WILDCARD_HOSTS, listen_host

log = logging.getLogger("dllmd.discovery")

SERVICE_TYPE = "_dllm._tcp.local."
TXT_NAME, TXT_ID, TXT_ENDPOINT = "name", "id", "endpoint"


class Advertiser:
    """This daemon's mDNS announcement, registered in ``start`` and withdrawn in ``stop`` (both block
    for a moment: mDNS probes the name first; run them off the event loop)."""

    def __init__(self, name: str, node_id: str, endpoint: str, interfaces: list[str] | None):
        from zeroconf import IPVersion, ServiceInfo, Zeroconf

        host, port = listen_host(endpoint), int(endpoint.rsplit(":", 1)[1])
        addresses = None if host in WILDCARD_HOSTS else [host]  # None: zeroconf announces every interface's
        self._zeroconf = Zeroconf(interfaces=interfaces or "all", ip_version=IPVersion.All)
        self._info = ServiceInfo(SERVICE_TYPE, f"{name}-{node_id}.{SERVICE_TYPE}", port=port,
                                 parsed_addresses=addresses or _interface_addresses(interfaces),
                                 properties={TXT_NAME: name, TXT_ID: node_id, TXT_ENDPOINT: endpoint},
                                 server=f"dllm-{node_id}.local.")

    def start(self) -> None:
        try:
            self._zeroconf.register_service(self._info, allow_name_change=True)
            log.info("announced on the LAN as %s", self._info.name)
        except Exception as exc:  # noqa: BLE001 - discovery is a convenience: the node serves without it
            log.warning("cannot announce this node over mDNS: %s", exc)

    def stop(self) -> None:
        try:
            self._zeroconf.unregister_service(self._info)
        except Exception as exc:  # noqa: BLE001 - as above: stopping goes on
            log.debug("mDNS withdrawal failed: %s", exc)
        self._zeroconf.close()


def _interface_addresses(interfaces: list[str] | None) -> list[str]:
    """The addresses to announce for a daemon listening on every interface."""
    if interfaces:
        return list(interfaces)
    import ifaddr

    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    return [a for a in found if not a.startswith("127.")] or [socket.gethostbyname("localhost")]
