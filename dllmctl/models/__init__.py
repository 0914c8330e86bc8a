"""Models from the client's side: the local store (``local_store``, ``local_model``), importing into
it (``importer``), placing spans on the live nodes (``layouts``) and shipping them there (``deploy``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dllmctl.paths import model_store_root

if TYPE_CHECKING:
    from dllmd.models.store import Manifest, ModelStore


def local_store() -> ModelStore:
    """This user's model store (under the dllm data dir)."""
    from dllmd.models.store import ModelStore  # here, not at the top: the CLI's help imports .catalog

    return ModelStore(model_store_root())


def local_model(name: str) -> tuple[Path, Manifest]:
    """The directory and typed manifest of ``name`` in the local store; raises ModelNotFound (or
    ModelStoreError for a damaged one) with a message saying what to do."""
    store = local_store()
    manifest = store.get(name)
    return store.path(name), manifest
