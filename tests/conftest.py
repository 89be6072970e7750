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


# DeepSpeed JIT-compiles its C++ ops on first use, under a lock file that a killed build leaves
# behind (later loads then wait forever). Built inside a test, a compile counts against that test's
# deadline and, on a loaded machine, can be killed half-way. So a session that will run multi-process
# tests builds them first, once, under a deadline of its own (cached afterwards: a no-op, ~5 s).
PREBUILT_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "FusedAdamBuilder")
PREBUILD_TIMEOUT_S = 1200


def pytest_collection_modifyitems(session, config, items):  # noqa: ANN001, ANN201
    if any(item.get_closest_marker("distributed") for item in items):
        config._moe_dist_prebuild = True


@pytest.fixture(scope="session", autouse=True)
def _deepspeed_ops_built(request):  # noqa: ANN001, ANN202
    if not getattr(request.config, "_moe_dist_prebuild", False):
        yield
        return
    import subprocess
    import sys

    code = ("from deepspeed.accelerator import get_accelerator as g\n"
            f"for op in {PREBUILT_OPS!r}:\n    g().create_op_builder(op).load()\n")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    try:
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=PREBUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.exit(f"building DeepSpeed's ops {PREBUILT_OPS} took over {PREBUILD_TIMEOUT_S} s; a lock file left "
                    "under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) by a killed build makes "
                    "this hang: remove it and rerun", returncode=1)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-15:])
        pytest.exit(f"building DeepSpeed's ops {PREBUILT_OPS} failed:\n{tail}", returncode=1)
    yield
