"""Sizes and durations as people write them: ``64MB``, ``512KiB``, ``6GiB``, ``4M``, ``4096``; ``90s``,
``10m``, ``2h`` (node.toml, CLI options)."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes of a size: decimal units (``MB``: 10^6), binary ones (``MiB``: 2^20), and a bare ``K``,
    ``M``, ``G`` as binary (as nccl-tests and ``free -h`` mean them). ValueError if it is not one."""
    match = _SIZE.match(text or "")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ValueError(f"expected a size like 512MiB, 6GiB or 64MB, got {text!r}")
    return int(float(match.group(1)) * UNITS[unit])


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds of a duration: ``90``, ``90s``, ``10m``, ``2h``. ValueError if it is not one."""
    match = _DURATION.match((text or "").lower())
    if match is None:
        raise ValueError(f"expected a duration like 90s, 10m or 2h, got {text!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def mib(n: int | float) -> str:
    """Bytes in MiB, as refusals and notes about memory state their numbers (``4.0 MiB``)."""
    return f"{n / 2**20:.1f} MiB"
