"""A pipeline job's checkpoints as its coordinator sees them: one part per stage.

Each stage writes its part on its own node; the coordinator keeps a copy of every part (and its own
part is copied to another node), under ``<home>/jobs/<job>/parts/stage-K/step-N/``. A checkpoint is
complete when the coordinator holds every stage's part of that step; only complete checkpoints are
listed, resumed from and exported. Each part is a :class:`~dllmd.train.checkpoint.Checkpoints`
checkpoint signed by the node that wrote it, which must be one of the job's.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from dllmd.net.identity import Identity
from dllmd.net.messages.training import CheckpointChunk
from dllmd.train.checkpoint import CheckpointError, Checkpoints


def part_root(home: Path, job: str, stage: int) -> Path:
    return home / "jobs" / job / "parts" / f"stage-{stage}"


class PartCheckpoints:
    def __init__(self, home: Path, job: str, stages: int, identity: Identity, trusted: Collection[str]):
        self.parts = [Checkpoints(part_root(home, job, s), identity, trusted) for s in range(stages)]

    def steps(self) -> list[int]:
        complete = set(self.parts[0].steps())
        for part in self.parts[1:]:
            complete &= set(part.steps())
        return sorted(complete)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _check(self, step: int) -> None:
        if step not in self.steps():
            raise CheckpointError(f"no complete checkpoint at step {step}; steps with one: {self.steps() or 'none'}")

    def describe(self, step: int) -> dict:
        self._check(step)
        described = [part.describe(step) for part in self.parts]
        signers = [part.manifest(step).signer for part in self.parts]
        return {"step": step, "path": str(Path(described[0]["path"]).parent.parent), "created": described[-1]["created"],
                "bytes": sum(d["bytes"] for d in described), "loss": described[-1]["loss"], "parts": len(described),
                "signers": signers}

    def signer(self, step: int, stage: int) -> str:
        """The node that wrote stage ``stage``'s part of checkpoint ``step`` (its manifest checked)."""
        self._check(step)
        return self.parts[stage].manifest(step).signer

    def read_chunk(self, step: int, file: str, offset: int, stage: int) -> tuple[CheckpointChunk, bytes]:
        self._check(step)
        if not 0 <= stage < len(self.parts):
            raise CheckpointError(f"a checkpoint of this job has parts 0-{len(self.parts) - 1}, not {stage}")
        return self.parts[stage].read_chunk(step, file, offset)
