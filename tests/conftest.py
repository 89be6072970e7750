"""Suite-wide set-up: token stores the tests prepare go to one session folder, not ~/.cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _token_store_dir(tmp_path_factory):  # noqa: ANN001, ANN202
    # Runs without --store-dir (most training tests) prepare the built-in corpus's store on first use;
    # rank processes inherit the variable, so the whole session shares one prepared store.
    if "MOE_DIST_STORE_DIR" not in os.environ:
        os.environ["MOE_DIST_STORE_DIR"] = str(tmp_path_factory.mktemp("token_stores"))
    yield
