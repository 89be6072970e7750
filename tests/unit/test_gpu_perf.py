"""``benchmarks.gpu_perf``'s logic without a worker: the one skip line, the MFU formula, the micro-batch
search (CUDA out of memory = does not fit) and the budget's cut."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from benchmarks import gpu_perf
from benchmarks.gpu_perf import CASES, GPU, Driver, flops_per_token, mfu


def test_without_cuda_it_prints_one_line_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_perf.main(["--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out == gpu_perf.SKIP_LINE + "\n"
    assert gpu_perf.SKIP_LINE.startswith("gpu_perf: skipped: no CUDA device (torch.cuda.is_available() is False)")
    assert not (tmp_path / "r").exists()


def test_mfu_by_hand():
    # 6 x 100 active + 6 x 2 layers x d 4 x seq 8 = 600 + 384 FLOPs per token
    assert flops_per_token(100, 2, 4, 8) == 984
    assert mfu(5e8, 984, 0.984) == pytest.approx(0.5)  # 5e8 tokens/s x 984 / 0.984e12
    assert mfu(5e8, 984, None) is None
    assert gpu_perf.peak_for("NVIDIA H200") == 989.0 and gpu_perf.peak_for("Some new GPU") is None


def test_bad_budget_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        gpu_perf.main(["--budget-s", "0"])
    assert "--budget-s must be positive, found 0" in capsys.readouterr().err


def _fake_worker(monkeypatch, fits_at: int, fail: str = ""):
    """Driver.worker that runs out of memory above ``fits_at`` (or fails with ``fail``)."""
    calls = []

    def worker(self, case, micro, timeout_s):
        calls.append((case.name, micro))
        if fail:
            return subprocess.CompletedProcess([], 1, "", fail), 1.0
        if micro > fits_at:
            return subprocess.CompletedProcess([], 1, "", "torch.OutOfMemoryError: CUDA out of memory."), 1.0
        (self.work / f"{gpu_perf._slug(case.name)}-mb{micro}.json").write_text(json.dumps({"tokens_per_s": {}}))
        return subprocess.CompletedProcess([], 0, "", ""), 2.0

    monkeypatch.setattr(Driver, "worker", worker)
    return calls


def test_largest_micro_batch_that_fits_and_remembered(monkeypatch, tmp_path):
    calls = _fake_worker(monkeypatch, fits_at=2)
    d = Driver(tmp_path, GPU, smoke=False, budget_s=1e6, case_timeout_s=10, smoke_compile=False)
    first = d.run_case(CASES[0])
    assert (first.status, first.micro_batch) == ("ok", 2)
    assert [m for _, m in calls] == [8, 4, 2]
    assert [a["oom"] for a in first.attempts] == [True, True, False]
    calls.clear()
    compiled = next(c for c in CASES if c.compile and c.engine == CASES[0].engine)
    assert d.run_case(compiled).micro_batch == 2 and [m for _, m in calls] == [2]  # starts where eager fitted


def test_nothing_fits_and_other_failures(monkeypatch, tmp_path):
    _fake_worker(monkeypatch, fits_at=0)
    d = Driver(tmp_path, GPU, smoke=False, budget_s=1e6, case_timeout_s=10, smoke_compile=False)
    o = d.run_case(CASES[0])
    assert o.status == "oom" and "every micro-batch" in o.detail
    _fake_worker(monkeypatch, fits_at=8, fail="ImportError: no module named triton")
    o = d.run_case(CASES[1])
    assert o.status == "failed" and "micro-batch 8" in o.detail and "triton" in o.detail


def test_budget_skips_the_tail_and_says_so(monkeypatch, tmp_path):
    _fake_worker(monkeypatch, fits_at=8)
    d = Driver(tmp_path, GPU, smoke=False, budget_s=1e6, case_timeout_s=10, smoke_compile=False)
    d.run_all(CASES[:1])
    d.outcomes[0].seconds = 100.0  # the first case took 100 s ...
    d.budget_s = 150.0             # ... so a second one (~100 s) still fits, a compiled one (~300 s) does not
    d.started -= 10
    d.run_all(CASES[1:3])
    assert [o.status for o in d.outcomes] == ["ok", "ok", "skipped"]
    assert "budget" in d.outcomes[2].detail and "--budget-s 150" in d.outcomes[2].detail


def test_a_worker_cut_short_by_the_budget_is_skipped_not_failed(monkeypatch, tmp_path):
    monkeypatch.setattr(Driver, "worker", lambda self, case, micro, timeout_s: (
        subprocess.CompletedProcess([], 124, "", "timed out after 5 s"), 5.0))
    d = Driver(tmp_path, GPU, smoke=False, budget_s=5, case_timeout_s=300, smoke_compile=False)
    o = d.run_case(CASES[0])
    assert o.status == "skipped" and "ran out" in o.detail
