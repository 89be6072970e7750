"""The error every export step raises for a user-facing problem (the output, the flags); the CLI prints it
on one line and exits 2 (1 for a ``--verify`` difference)."""


class ConsolidateError(RuntimeError):
    """A user-facing problem with the output or the flags; the message says what to do."""
