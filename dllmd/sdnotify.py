"""systemd's readiness protocol (``Type=notify``) without a dependency: one datagram to
``$NOTIFY_SOCKET``. Outside systemd the variable is unset and this does nothing."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("dllmd")


def notify(state: str) -> bool:
    """Send e.g. ``"READY=1"`` or ``"STOPPING=1"``; True if systemd was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)
        return False
