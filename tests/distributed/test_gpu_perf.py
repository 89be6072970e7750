"""``python -m benchmarks.gpu_perf --cpu-smoke``: the whole driver (workers, micro-batch search, report)
on CPU with the tiny model; ~25 s here with OMP_NUM_THREADS=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .harness import REPO_ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_cpu_smoke_writes_a_row_per_engine(tmp_path):
    out = tmp_path / "perf"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_perf", "--cpu-smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=400, env=env, cwd=str(REPO_ROOT))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = (out / "gpu_perf.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| case |"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    rows = [dict(zip(cols, (c.strip() for c in line.strip("|").split("|")))) for line in lines[header + 2:]
            if line.startswith("| ")]
    moe = {r["engine"]: r for r in rows if r["contender"] == "moe" and r["case"].endswith("eager")}
    assert set(moe) == {"deepspeed ZeRO-1", "fsdp2"}, rows
    for r in moe.values():
        assert float(r["tokens/s"].replace(",", "")) > 0
        assert float(r["vs bare: median [min, max]"].split()[0]) > 0
        assert r["MFU"] == "n/a (CPU)"
    assert "compile is off in the CPU smoke" in "\n".join(lines)
    raw = json.loads((out / "gpu_perf.json").read_text())
    assert {o["status"] for o in raw["outcomes"]} == {"ok", "skipped"}
    assert res.stdout.count("| moe |") == len([r for r in rows if r["contender"] == "moe"])
