"""The memory planner's CPU total against the measured peak RSS of a real training run (tiny, fp32, ZeRO-2)."""

from __future__ import annotations

import pytest

from moe_dist.config import apply_overrides, get_preset
from moe_dist.plan.memory import GiB, Hardware, plan

from .trainrun import FAST, metrics, train

pytestmark = pytest.mark.distributed


def test_planner_cpu_total_matches_measured_rss(tmp_path):
    # the default path, torch.compile of DeepSpeed's Muon kernels included (the planner's baseline counts it)
    train(tmp_path / "rss", 1, "--zero-stage", "2", "--max-steps", "3", env={"TORCHDYNAMO_DISABLE": "0"})
    measured = max(r["rss_peak_mb"] for r in metrics(tmp_path / "rss")) * 2**20
    # the same config the run used: FAST's --set overrides on the tiny preset
    sets = dict(a.split("=", 1) for a in FAST[FAST.index("--set"):] if "=" in a)
    cfg = apply_overrides(get_preset("tiny"), {**sets, "parallel.zero_stage": 2, "parallel.precision": "fp32"})
    planned = plan(cfg, Hardware(None, 64 * GiB, 1, 1, accelerator="cpu")).cpu.total
    assert 0.75 < planned / measured < 1.33, f"planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
