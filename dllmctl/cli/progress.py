"""The progress bars that more than one dllmctl command shows (on stderr). Imported by the commands
that show them, not at the top of the ``dllmctl.cli`` modules: ``rich.progress`` is not needed to
print help."""

from __future__ import annotations

from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID,
                           TextColumn, TimeElapsedColumn, TransferSpeedColumn)
from rich.text import Text

from dllmctl.cli.common import err
from dllmctl.data.progress import ShardProgress


def transfer_progress(transient: bool) -> Progress:
    """Bytes per node, as deploys and rebalances show them."""
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=err, transient=transient)


class StageProgress:
    """A bar per named stage (``progress(stage, done, total)``), shown once the first report comes,
    so that an early error prints alone. ``stop()`` when the work ends."""

    def __init__(self, transient: bool):
        self.bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=transient)
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.tasks:
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def stop(self) -> None:
        if self.tasks:  # stopping a display that never started prints a blank line
            self.bar.stop()


class _Amount(ProgressColumn):
    """Counts for items (files, samples, shards), sizes for bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.size = MofNCompleteColumn(), DownloadColumn()

    def render(self, task: Task) -> Text:
        return (self.size if task.fields.get("unit") == "bytes" else self.count).render(task)


class RichShardProgress(ShardProgress):
    """One line per stage on stderr; a stage is marked complete when the next one starts."""

    def __init__(self, transient: bool) -> None:
        self.bar = Progress(TextColumn("{task.description:<16}"), BarColumn(), _Amount(), TimeElapsedColumn(),
                            console=err, transient=transient)
        self.tasks: dict[str, TaskID] = {}
        self.current: TaskID | None = None
        self.started = False

    def stage(self, what: str, total: int | None = None, unit: str = "items") -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        if self.current is not None and not what.startswith("push "):
            task = self.bar.tasks[self.current]  # stages run one after another (pushes concurrently)
            self.bar.update(self.current, total=task.completed if task.total is None else task.total,
                            completed=task.completed if task.total is None else task.total)
        self.tasks[what] = self.bar.add_task(what, total=total, unit=unit)
        if not what.startswith("push "):
            self.current = self.tasks[what]

    def advance(self, what: str, amount: int) -> None:
        if what in self.tasks:
            self.bar.advance(self.tasks[what], amount)

    def stop(self) -> None:
        if self.started:
            self.bar.stop()
