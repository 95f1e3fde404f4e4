"""What a person watching a run sees: a live rich progress bar, epoch lines and a summary table.

Only the main process reports (`enabled=False` on other ranks turns every method into a no-op),
so a torchrun job prints one bar, not one per process.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from rich.console import Console
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
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperOption

from ..errors import plain


class Reporter:
    """Live progress of the training steps plus one printed line per epoch."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console, self.enabled = console, enabled
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def start(self, total_steps: int, completed: int, description: str) -> None:
        if not self.enabled:
            return
        # Below ~120 columns rich would cut the row from the right: the step count and the ETA went
        # first. A narrow terminal gets a short bar and drops lr, img/s and the elapsed time instead.
        wide = self.console.width >= 120
        stats = "loss {task.fields[loss]}  acc {task.fields[acc]}"
        stats += "  lr {task.fields[lr]}  {task.fields[ips]} img/s" if wide else ""
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=40 if wide else 10),
            MofNCompleteColumn(),
            TextColumn(stats),
            *([TimeElapsedColumn()] if wide else []),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        ]
        self.progress = Progress(*columns, console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(
            plain(description), total=total_steps, completed=completed, loss="-", acc="-", lr="-", ips="-"
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


_NUMBER = re.compile(r"[-+]?[0-9][0-9,._]*(e[-+]?[0-9]+)?%?|-|")


def fit_table(table: Table) -> Table:
    """Let a table fit a narrow terminal without losing a digit, whatever its columns.

    Rich shrinks a table that is too wide by cutting cells with an ellipsis, numbers included
    (`17,307,2…` at 80 columns). Here every column that holds only numbers keeps its full width,
    and every other column may wrap its text onto a second line instead.
    """
    for column in table.columns:
        cells = [Text.from_markup(c).plain if isinstance(c, str) else str(c) for c in column._cells]
        if cells and all(_NUMBER.fullmatch(cell.strip()) for cell in cells):
            column.no_wrap = True
            column.min_width = max(len(cell) for cell in [*cells, str(column.header)])
        else:
            column.no_wrap = False
            column.overflow = "fold"
    return table


def summary_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column table (what, value) for the end of a run or an evaluation."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, plain(value))  # values quote paths and names a user chose: not markup
    return fit_table(table)


class HelpCommand(TyperCommand):
    """A command whose help reads as people write it: arguments by their NAME, flags with no `<bool>`.

    Every `overlock` command is declared with `cls=HelpCommand` (typer has no app-wide default).
    """

    def get_params(self, ctx):  # noqa: ANN001, ANN201 - typer's vendored click types
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperArgument) and param.metavar is None and param.name:
                param.metavar = param.name.upper()
            elif isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx):  # noqa: ANN001, ANN201
        # `overlock build SPEC`, as man pages write it (typer's own usage line says `{SPEC}`).
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


def make_console() -> Console:
    """The console of the `overlock` commands: piped output (logs, CI) is not squeezed into 80 columns."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)
