"""Faults of the machine mid-run end with the retryable code (``exit_codes.INFRA``) and one ``error:``
line naming the cause: a full disk under ``--async-save`` (the short write and the free space, as a
synchronous save says), a token store cut short, the checkpoint folder deleted under the run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_dist import exit_codes

from .harness import run_ranks
from .test_bad_inputs import _FSIZE_WRAPPER, _rank0_reports_save_failure, _shard, error_line, good_run  # noqa: F401
from .trainrun import CPU_JSON, FAST, TRAIN

pytestmark = pytest.mark.distributed

# Runs train.py with a hook at the end of one step (TEST_HOOK_STEP, on rank 0): "truncate" cuts the
# token file of the run's private store in half, "rmtree" deletes <output-dir>/checkpoints.
_HOOK_WRAPPER = """
import os, runpy, shutil, sys
from pathlib import Path
import moe_dist.checkpoint.manager as manager
after = manager.CheckpointManager.after_step
def hooked(self):
    if self.trainer.state.step == int(os.environ["TEST_HOOK_STEP"]) and os.environ.get("RANK", "0") == "0":
        if os.environ["TEST_HOOK"] == "truncate":
            f = Path(self.trainer.data.train_blocks.store.tokens_file)
            os.truncate(f, f.stat().st_size // 2)
        else:
            shutil.rmtree(self.root)
    return after(self)
manager.CheckpointManager.after_step = hooked
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _hooked_run(tmp_path: Path, hook: str, step: int, *args: str) -> list:
    argv = ["-c", _HOOK_WRAPPER, TRAIN, "--deepspeed-config", CPU_JSON, *FAST, "--output-dir", str(tmp_path / "run"),
            "--store-dir", str(tmp_path / "stores"), "--max-steps", "8", *args]
    return run_ranks(argv, 2, timeout=180, env={"TEST_HOOK": hook, "TEST_HOOK_STEP": str(step),
                                                 "TORCHDYNAMO_DISABLE": "1"})


def test_token_store_cut_short_mid_run(tmp_path):
    res = _hooked_run(tmp_path, "truncate", 2)
    assert exit_codes.INFRA in [r.returncode for r in res], "\n".join(r.output[-3000:] for r in res)
    failed = next(r for r in res if r.returncode == exit_codes.INFRA)
    line = error_line(failed.output)
    assert "tokens.bin: cannot read it mid-run (" in line and "the store changed under the running job" in line, line
    assert "rerun with --resume auto" in line


def test_checkpoint_folder_deleted_mid_run(tmp_path):
    res = _hooked_run(tmp_path, "rmtree", 3, "--save-every", "2")
    codes = [r.returncode for r in res]
    assert set(codes) <= {exit_codes.INFRA, None} and exit_codes.INFRA in codes, res[0].output[-3000:]
    line = error_line(res[0].output)
    root = tmp_path / "run" / "checkpoints"
    assert line.startswith(f"error: {root} vanished during the run (it held checkpoint_step_2"), line
    assert "checkpoint_step_4 was not saved and the folder not recreated" in line
    assert not root.exists()


def test_async_save_on_a_full_disk_names_the_short_write(good_run, tmp_path):  # noqa: F811 - the fixture
    """As test_bad_inputs.test_file_size_limit_during_save, under --async-save: the same reason."""
    out = tmp_path / "run"
    argv = ["-c", _FSIZE_WRAPPER, TRAIN, "--deepspeed-config", CPU_JSON, *FAST, "--output-dir", str(out),
            "--max-steps", "6", "--save-every", "2", "--async-save"]
    limit = _shard(good_run).stat().st_size // 8
    res = run_ranks(argv, 2, timeout=180, env={"TEST_FSIZE_LIMIT": str(limit), "TEST_FSIZE_STEP": "4",
                                                "TEST_FSIZE_RANK": "1", "TORCHDYNAMO_DISABLE": "1"})
    line = _rank0_reports_save_failure(res)
    assert line.startswith(f"error: saving checkpoint_step_4 in {out / 'checkpoints'} failed: rank 1: "), line
    assert any(r in line for r in ("a shard file was written short", "File too large")), line
    assert "CheckpointException ranks" not in line
    if "written short" in line:
        assert "MiB free there" in line, line
    assert os.path.isdir(out / "checkpoints" / "checkpoint_step_2")
