"""The client's dataset records: ``<data dir>/datasets/<name>.json``, one report per dataset, as pushed.

A record is what ``dllmctl train`` consumes: which node holds which shard, with its sha256. It is
written atomically, after every node committed its shard.
"""

from __future__ import annotations

import json
from pathlib import Path

from dllmd.data.errors import DataError
from dllmd.data.shards import NAME
from dllmd.storage import atomic_write
from dllmctl.paths import data_dir

class DatasetRecords:
    """``<data dir>/datasets/<name>.json``: one report per dataset, as pushed."""

    def __init__(self, root: Path):
        self.root = root

    def save(self, report: dict) -> None:
        atomic_write(self.root / f"{report['dataset']}.json", json.dumps(report, indent=1).encode())

    def load(self, name: str) -> dict:
        if not NAME.match(name):
            raise DataError(f"invalid dataset name {name!r}")
        try:
            return json.loads((self.root / f"{name}.json").read_bytes())
        except FileNotFoundError:
            raise DataError(f"no dataset {name!r}; see 'dllmctl data list'") from None
        except ValueError as exc:
            raise DataError(f"the record of {name!r} is corrupt ({exc}); remove it with 'dllmctl data rm {name}'") from None

    def list(self) -> list[dict]:
        if not self.root.exists():
            return []
        records = []
        for path in sorted(self.root.glob("*.json")):
            try:
                records.append(json.loads(path.read_bytes()))
            except ValueError:
                records.append({"dataset": path.stem, "error": "corrupt record"})
        return records

    def remove(self, name: str) -> bool:
        path = self.root / f"{name}.json"
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed


def dataset_records() -> DatasetRecords:
    """The records of this user (under the dllm data dir)."""
    return DatasetRecords(data_dir() / "datasets")
