"""Checkpoint errors a user can act on."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which file and what to do."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is intact but of another architecture or global batch: never skipped silently."""
