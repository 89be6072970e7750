"""``python -m benchmarks.gpu_check``: skipped in one line without CUDA, and its orchestration (launches,
metrics reading, comparisons, report) checked on CPU processes with ``--cpu-smoke``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .harness import REPO_ROOT

pytestmark = pytest.mark.distributed


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT), TORCHDYNAMO_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO_ROOT))


def test_without_cuda_it_says_why_in_one_line(tmp_path):
    res = _run("--out", str(tmp_path / "r.md"), timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines() == [res.stdout.strip()]
    assert res.stdout.startswith("gpu_check: skipped: no CUDA device")
    assert not (tmp_path / "r.md").exists()


@pytest.mark.slow  # ~90 s of launches; .ci/run runs it with the other slow cases
def test_cpu_smoke_runs_every_case_and_writes_the_report(tmp_path):
    report = tmp_path / "report.md"
    res = _run("--cpu-smoke", "--out", str(report), "--work", str(tmp_path / "work"), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | " in line[2:]][1:]
    results = {row.split(" | ")[0][2:]: row.split(" | ")[1] for row in rows}
    assert sum(r == "PASS" for r in results.values()) == 4, results
    assert [name for name, r in results.items() if r == "SKIP"] == [
        "4090 preset, 4090_offload (ZeRO-3, param + optimizer offload)"]
    assert "CPU smoke run" in text
    # The runs sit in a fresh folder inside --work, so a second check there starts clean (on the H200 a
    # reused folder made the second check's 4090 case refuse to start: "already holds a run").
    assert [p.name.startswith("gpu_check-") for p in (tmp_path / "work").iterdir()] == [True]
