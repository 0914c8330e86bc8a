"""dllmctl: the command line (and agent/API surface) that drives a dllm cluster."""

from dllmd import __version__

__all__ = ["__version__"]
