"""Registers `overlock train` and `overlock eval` on the CLI app (filled in by the training work)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the training commands to `app`."""
