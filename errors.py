"""User-facing errors: everything the CLI shows as a one-screen message instead of a traceback.

Raise an `OverlockError` (or a subclass) for anything a user did wrong: a bad spec, a missing
data directory, a checkpoint that does not fit. `cli.main` catches exactly this class, prints its
message and exits with status 2; any other exception is a bug and keeps its traceback.
"""


class OverlockError(Exception):
    """A problem with the user's input, explained in the message (what is wrong, what is valid)."""


class SpecError(OverlockError, ValueError):
    """An invalid architecture spec (YAML syntax, schema, cross-field rules, `extends`)."""


class CheckpointError(OverlockError, ValueError):
    """A state dict or checkpoint that does not match the model it is loaded into."""
