"""Checkpoint errors a user can act on."""

from ..exit_codes import InfraError


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which file and what to do."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is intact but of another architecture or global batch: never skipped silently."""


class CheckpointWriteError(CheckpointError, InfraError):
    """A save failed on the machine's side (disk full, read-only, the folder gone): worth a retry."""
