"""The exception types of the data pipeline: a user's mistake, or a store that failed mid-run."""

from __future__ import annotations

from ..exit_codes import InfraError


class DataError(ValueError):
    """A user-facing data problem; the one-line message names the file, field or value and what to do."""


class StoreReadError(DataError, InfraError):
    """The token store changed under a running job (a file cut short, gone): worth a retry, which checks it."""
