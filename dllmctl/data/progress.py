"""What shard-data tells a progress display (kept apart: the CLI imports it before anything heavy)."""

from __future__ import annotations


class ShardProgress:
    """What a progress display hears: stages ("reading", "tokenizing", "push NODE") and amounts done.

    ``unit`` is "items" (files, samples) or "bytes"; ``total`` is None when not known up front.
    The base class shows nothing (scripts, the MCP server, benchmarks).
    """

    def stage(self, what: str, total: int | None = None, unit: str = "items") -> None:
        pass

    def advance(self, what: str, amount: int) -> None:
        pass
