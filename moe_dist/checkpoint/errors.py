"""Checkpoint errors a user can act on."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which file and what to do."""
