"""dllmd: the daemon every contributing machine runs."""

__version__ = "0.1.0"
