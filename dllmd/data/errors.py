"""The data pipeline's error, and the names of its placement strategies (both light: the CLI's help needs them)."""

from __future__ import annotations


class DataError(ValueError):
    """Input that cannot be sharded; the message says what is wrong and what to do about it."""


STRATEGIES = ("round_robin", "hash", "random", "semantic", "dht")  # see dllmd.data for why each exists


class PathForbidden(DataError):
    """A path outside the directories the node's owner lets ``data.local`` read (``data_roots``)."""
