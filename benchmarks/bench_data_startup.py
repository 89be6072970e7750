"""Section ``data_startup``: train.py's start-up on a 10M- and a 500M-token store (see ``bench_data``)."""

from __future__ import annotations

from .bench_data import TITLE, run_startup_only as run  # noqa: F401  (run.py calls run(ctx))
