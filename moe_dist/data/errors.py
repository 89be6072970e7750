"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem; the one-line message names the file, field or value and what to do."""
