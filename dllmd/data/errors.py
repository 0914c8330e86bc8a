"""The data pipeline's errors, and the names of its placement strategies (all light: the CLI's help needs them)."""

from __future__ import annotations


class DataError(ValueError):
    """Input that cannot be sharded; the message says what is wrong and what to do about it."""


class ShardError(ValueError):
    """A shard operation that cannot be done; the message says why and what to do."""


class StaleBase(ShardError):
    """A patch names a base shard this node does not hold (any more): send the whole shard instead."""


class PatchTooLarge(ShardError):
    """The shard a patch would build is larger than a node rebuilds in memory: send the whole shard instead."""


STRATEGIES = ("round_robin", "hash", "random", "semantic", "dht")  # see dllmd.data for why each exists


class PathForbidden(DataError):
    """A path outside the directories the node's owner lets ``data.local`` read (``data_roots``)."""
