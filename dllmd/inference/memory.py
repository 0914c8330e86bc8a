"""The owner's memory cap at a node (``[limits] memory`` in node.toml): what dllm may hold there in
all, RAM or VRAM, so that a desktop stays usable while it serves.

What counts: the weights of the spans loaded and being loaded, and the KV caches sessions reserved
(a session reserves its whole cache when it opens). Activations are not counted here: they are
small next to those and short-lived, and the planner leaves a fifth of each node's room for them
and for caches. A load or a session that would push the total past the cap is refused up front
with the numbers, never discovered half-way.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.units import mib


class NoRoom(Exception):
    """Memory for a span or a session is not there: a budget or the cap would be exceeded."""


@dataclass(frozen=True)
class MemoryCap:
    limit_bytes: int = 0  # 0: no cap

    def check(self, what: str, need_bytes: int, in_use_bytes: int) -> None:
        """Raise NoRoom with the numbers unless ``need_bytes`` more fit beside ``in_use_bytes``."""
        if self.limit_bytes and in_use_bytes + need_bytes > self.limit_bytes:
            raise NoRoom(f"{what}: {mib(need_bytes)} needed, but this node's owner caps dllm at "
                         f"{mib(self.limit_bytes)} ([limits] memory in node.toml) and {mib(in_use_bytes)} "
                         f"are in use (weights and reserved KV caches)")
