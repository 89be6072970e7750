"""The non-finite guard's verdicts, the strict-JSON metrics file, and the watchdog firing in a process of its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from moe_dist import exit_codes
from moe_dist.run.guard import SPIKE_WARMUP, Diverged, NonFiniteGuard
from moe_dist.run.metrics import MetricsLog


def _row(step, loss, norm=1.0):
    return {"step": step, "loss": loss, "grad_norm": norm}


def test_streak_marks_rows_and_diverges_at_the_limit():
    warned = []
    g = NonFiniteGuard(3, 10.0, warned.append)
    g.check(_row(1, 4.0), 0)
    rows = [_row(2, float("nan"), float("nan")), _row(3, 4.0, float("inf")), _row(4, 4.0, 1.0)]
    g.check(rows[0], 0)
    g.check(rows[1], 0)
    assert not g.healthy and g.streak == 2 and rows[1]["nonfinite"] and rows[1]["skipped_steps"] == 2
    g.check(rows[2], 1)  # a finite norm here, but one rank saw a non-finite one: still a bad step
    assert g.diverged is not None and "diverged at step 4" in g.diverged and "3 non-finite step(s) in a row" in g.diverged
    with pytest.raises(Diverged):
        g.raise_if_diverged()
    assert len(warned) == 2 and "step skipped, no update (1 in a row of at most 3)" in warned[0]


def test_a_finite_step_ends_the_streak():
    g = NonFiniteGuard(2, 0.0, lambda _m: None)
    g.check(_row(1, float("nan")), 0)
    g.check(_row(2, 3.0), 0)
    g.check(_row(3, float("nan")), 0)
    assert g.diverged is None and g.streak == 1 and g.skipped == 2


def test_loss_spike_warns_once_the_mean_is_trusted():
    warned = []
    g = NonFiniteGuard(3, 10.0, warned.append)
    g.check(_row(1, 1.0), 0)
    g.check(_row(2, 50.0), 0)  # within the first SPIKE_WARMUP steps: no warning yet
    assert warned == []
    for step in range(3, SPIKE_WARMUP + 60):
        g.check(_row(step, 1.0), 0)
    assert warned == []
    g.check(_row(99, 80.0), 0)
    assert len(warned) == 1 and warned[0].startswith("step 99: loss spike: 80 is ") and "loss_spike_factor=10" in warned[0]


def test_metrics_file_stays_strict_json(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})

    def refuse(token):
        raise AssertionError(token)

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row == {"step": 1, "loss": "nan", "grad_norm": "inf", "lr": 0.1}
    assert math.isnan(log.history[0]["loss"])  # in memory the numbers stay numbers


_STALL = """
import time, sys
from moe_dist.run.watchdog import Watchdog
w = Watchdog(sys.argv[1], 0, 1, train_limit_s=0.5, long_limit_s=0.5).start()
w.beat("optimizer step (gradient reduction, norm, update)", 7)
time.sleep(30)
"""


def test_watchdog_fires_writes_the_hang_file_and_exits_hung(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _STALL, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == exit_codes.HUNG, proc.stderr
    assert proc.stderr.startswith("error: rank 0 hung: no progress for ")
    assert "in phase 'step 7: optimizer step (gradient reduction, norm, update)'" in proc.stderr
    text = (tmp_path / "hang-0.txt").read_text()
    assert text.startswith("rank 0 of 1: no progress for ")
    assert "stacks of every thread of this rank:" in text and 'File "<string>", line 6' in text  # the sleeping main


def test_flight_recorder_env_only_on_gpu_and_never_over_the_users(monkeypatch, tmp_path):
    from moe_dist.parallel.timeouts import enable_flight_recorder, flight_recorder_env

    env = flight_recorder_env(str(tmp_path))
    for key in env:
        monkeypatch.delenv(key, raising=False)
    enable_flight_recorder(str(tmp_path), on_gpu=False)
    assert not any(key in os.environ for key in env)  # gloo: nothing to record
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "17")
    enable_flight_recorder(str(tmp_path), on_gpu=True)
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "17"  # the user's value is kept
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "nccl_trace_rank_")  # monkeypatch restores all
