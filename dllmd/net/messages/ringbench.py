"""The ring benchmark's operations (``dllmctl bench allreduce``): ``ring.open`` / ``form`` / ``run`` / ``close``.
Admin only, and served only by daemons started for benchmarks (``bench_operations`` in node.toml)."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import NoArgs, Op, bounded

MAX_ELEMENTS = 512 * 1024 * 1024  # 2 GiB of float32
MAX_MEMBERS = 64


@dataclass
class OpenArgs:
    plaintext: bool = False


@dataclass
class MemberArgs:
    public_key: str = bounded(max_len=64)
    endpoint: str = bounded(max_len=256)


@dataclass
class FormArgs:
    members: list[MemberArgs] = bounded(max_len=MAX_MEMBERS)
    rank: int = bounded(lo=0, hi=MAX_MEMBERS - 1)
    generation: int = bounded(1, lo=1, hi=2**62)  # the same on every rank; a new one for each formation


@dataclass
class RunArgs:
    members: list[MemberArgs] = bounded(max_len=MAX_MEMBERS)
    rank: int = bounded(lo=0, hi=MAX_MEMBERS - 1)
    elements: int = bounded(lo=1, hi=MAX_ELEMENTS)
    iterations: int = bounded(lo=1, hi=100)
    bucket_bytes: int = bounded(0, lo=0, hi=256 * 1024 * 1024)  # 0: the ring's default (as training uses)
    generation: int = bounded(1, lo=1, hi=2**62)  # the same on every rank of one run
    timeout_s: float = bounded(60.0, lo=1.0, hi=600.0)  # the longest wait without progress
    algorithm: str = bounded("auto", max_len=8)  # ring, tree, or auto: what training would take


RING_OPEN = Op("ring.open", OpenArgs, dict)
RING_FORM = Op("ring.form", FormArgs, dict)
RING_RUN = Op("ring.run", RunArgs, dict)
RING_CLOSE = Op("ring.close", NoArgs, dict)
