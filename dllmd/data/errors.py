"""The one error of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Input that cannot be sharded; the message says what is wrong and what to do about it."""
