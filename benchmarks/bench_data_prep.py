"""Section ``data_prep``: the preparation-throughput part of section 7 alone (see ``bench_data``)."""

from __future__ import annotations

from .bench_data import TITLE, run_prep_only as run  # noqa: F401  (run.py calls run(ctx))
