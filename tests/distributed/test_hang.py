"""A wedged rank ends the run within minutes, with its stacks on disk, and the job resumes bitwise.

One of 2 gloo ranks SIGSTOPs itself after step 5 (``MOE_DIST_FAULT_ACTION=sigstop``): every thread
of it freezes, as a rank wedged in a driver call would. The other waits in its next collective;
within 2x ``parallel.train_timeout_s`` it writes ``hang-0.txt``, prints one ``error:`` line naming
the phase and the silent rank and exits with the hang code. ``--resume auto`` then finishes with
the losses of an uninterrupted run."""

from __future__ import annotations

import pytest

from moe_dist import exit_codes

from .test_bad_inputs import error_line
from .trainrun import losses, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TIMEOUT_S = 8
ARGS = ("--max-steps", "8", "--save-every", "3", "--set", f"parallel.train_timeout_s={TIMEOUT_S}")


def test_sigstopped_rank_is_reported_and_the_run_resumes(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(ref, 2, *ARGS)
    env = {"MOE_DIST_FAULT": "after_step@1", "MOE_DIST_FAULT_STEP": "5", "MOE_DIST_FAULT_ACTION": "sigstop"}
    res = train(run, 2, *ARGS, env=env, check=False)
    assert res[0].returncode == exit_codes.HUNG, res[0].output[-3000:]
    line = error_line(res[0].output)
    assert line.startswith("error: rank 0 hung: ") and "in phase 'step 6: " in line, line
    assert "ranks that stopped answering: 1;" in line and f"parallel.train_timeout_s={TIMEOUT_S}" in line
    hang = run / "hang-0.txt"
    assert f"stacks in {hang}" in line
    text = hang.read_text()
    assert text.startswith("rank 0 of 2: ") and "rank 1: last heartbeat" in text and "File " in text
    # the last row (step 5) was written right before the stall; the hang file at most 2 limits later
    stalled_for = hang.stat().st_mtime - (run / "metrics.jsonl").stat().st_mtime
    assert 0 < stalled_for < 2 * TIMEOUT_S, stalled_for
    train(run, 2, *ARGS, "--resume", "auto")
    assert losses(run) == losses(ref)
