"""User-facing errors: everything the CLI shows as a one-screen message instead of a traceback.

Raise an `OverlockError` (or a subclass) for anything a user did wrong: a bad spec, a missing
data directory, a checkpoint that does not fit. Every command catches this class, prints its
message and exits with status 2; so too an `OSError` that reaches a command (a file name the OS
refuses, a full disk: the user's environment, named with the file) and a failed allocation. Any
other exception is a bug and keeps its traceback.
"""


class OverlockError(Exception):
    """A problem with the user's input, explained in the message (what is wrong, what is valid)."""


class SpecError(OverlockError, ValueError):
    """An invalid architecture spec (YAML syntax, schema, cross-field rules, `extends`)."""


class CheckpointError(OverlockError, ValueError):
    """A state dict or checkpoint that does not match the model it is loaded into."""


_CONTROL = {**{c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}, ord("\n"): "\n"}


def shown(text: object, limit: int = 200) -> str:
    """User text as it may appear in a message: control characters escaped, at most `limit` characters.

    Spec values, file names and `--set` arguments are quoted in messages and summaries; raw escape
    sequences would drive the terminal, and a 1 MB value would bury the message.
    """
    text = str(text)
    if len(text) > limit:
        text = f"{text[: limit - 20]}...({len(text):,} characters)"
    return text.translate(_CONTROL)


def plain(text: object, limit: int = 200) -> str:
    """User text (spec names, paths, descriptions) for a rich console: `shown`, and never read as markup.

    Every place that prints text a user chose goes through here, so an escape sequence in a spec's
    name (YAML's "\\e[2J") is shown, not executed by the terminal.
    """
    from rich.markup import escape

    return escape(shown(text, limit))


def one_screen(message: str, lines: int = 40, width: int = 400) -> str:
    """A message cut to one screen, each line `shown` (the last resort for text quoted unshortened)."""
    rows = message.splitlines() or [""]
    cut = [shown(row, width) for row in rows[:lines]]
    if len(rows) > lines:
        cut.append(f"... ({len(rows) - lines} more lines)")
    return "\n".join(cut)


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: MemoryError, or the RuntimeError torch raises when a CPU allocation fails."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "allocate" in str(exc))


def _os_error_message(exc: OSError) -> str:
    names = [shown(name, 120) for name in (exc.filename, exc.filename2) if name is not None]
    reason = exc.strerror or type(exc).__name__
    return f"cannot use {' -> '.join(names)}: {reason}" if names else f"operating system error: {reason}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return shown(text.splitlines()[0], 160) if text else type(exc).__name__


def exit_on_user_error(func):
    """Decorate a CLI command: an OverlockError becomes a one-screen message and exit status 2.

    Used on every command (ours and `overlock train`), so that `main()` and typer's test runner
    behave alike: no traceback for a user's mistake, a traceback for a bug.
    """
    import functools

    import typer
    from rich.console import Console
    from rich.markup import escape

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OverlockError as exc:
            message = str(exc)
        except OSError as exc:
            # A file the user named that the OS refuses (a name too long, no permission, a full disk):
            # their environment, not our bug; the filename and the OS's reason say it all.
            message = _os_error_message(exc)
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            message = (
                "not enough memory for this command (an allocation failed); use a smaller model, batch or "
                f"image size ({_first_line(exc)})"
            )
        # The message quotes user input (paths, --set values, spec names): never read it as markup.
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(one_screen(message))}", markup=True
        )
        raise typer.Exit(2) from None

    return wrapper
