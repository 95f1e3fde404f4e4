"""What a person watching a run sees: a live rich progress bar, epoch lines and a summary table.

Only the main process reports (`enabled=False` on other ranks turns every method into a no-op),
so a torchrun job prints one bar, not one per process.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class Reporter:
    """Live progress of the training steps plus one printed line per epoch."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console, self.enabled = console, enabled
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def start(self, total_steps: int, completed: int, description: str) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  acc {task.fields[acc]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            escape(description), total=total_steps, completed=completed, loss="-", acc="-", lr="-", ips="-"
        )

    def step(self, completed: int, loss: float, acc: float, lr: float, images_per_s: float) -> None:
        if self.progress is None or self.task is None:
            return
        self.progress.update(
            self.task,
            completed=completed,
            loss=f"{loss:.4f}",
            acc=f"{100 * acc:5.1f}%",
            lr=f"{lr:.2e}",
            ips=f"{images_per_s:,.0f}",
        )

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        (self.progress.console if self.progress is not None else self.console).print(text)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def summary_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column table (what, value) for the end of a run or an evaluation."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(value))  # values quote paths and names a user chose: not markup
    return table


def make_console() -> Console:
    """The console of the `overlock` commands: piped output (logs, CI) is not squeezed into 80 columns."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)
