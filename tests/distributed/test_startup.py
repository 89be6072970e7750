"""Start-up memory on 2 gloo ranks, 100m preset (fp32, 403 MB of parameters): the sharded build
holds this rank's share only, the full build the whole model, and the planner's start-up term
(``phase == "init"``) matches the measured RSS increase of the build within the ratio
``test_planner_rss.py`` uses. One launch of ``startup_worker`` per case."""

from __future__ import annotations

import json

import pytest

from moe_dist.run.cli import parse
from moe_dist.plan.memory import GiB, Hardware, plan

from .harness import run_and_check

pytestmark = pytest.mark.distributed

WORLD = 2
FLAGS = ["--preset", "100m"]


def _startup(tmp_path, *flags: str) -> tuple[list[dict], float]:
    """Every rank's report, and the planner's start-up term per rank (bytes) for the same config."""
    report = tmp_path / "startup.json"
    argv = [*FLAGS, *flags]
    run_and_check(["-m", "tests.distributed.startup_worker", "--report", str(report), *argv], WORLD, timeout=300)
    ranks = [json.loads((tmp_path / f"startup.json.rank{r}").read_text()) for r in range(WORLD)]
    cfg = parse(argv)[1]
    pl = plan(cfg, Hardware(None, 64 * GiB, WORLD, 1, accelerator="cpu"))  # rows are per node: 2 ranks
    init = sum(c.bytes for c in pl.cpu.consumers if c.phase == "init") / WORLD
    return ranks, init


def _increase(r: dict) -> float:
    """Bytes the build added to the rank's peak RSS."""
    return (r["hwm_build_mb"] - r["rss_before_build_mb"]) * 2**20


@pytest.mark.parametrize("ep", [1, 2], ids=["ep1", "ep2"])
def test_zero3_no_rank_holds_the_full_model(tmp_path, ep):
    ranks, planned = _startup(tmp_path, "--zero-stage", "3", "--ep-size", str(ep))
    for r in ranks:
        full = 4 * r["model_numel"]  # fp32 bytes of the whole model
        # its ZeRO-3 partition only (+ padding: at most one element per parameter and rank)
        assert r["model_numel"] / WORLD <= r["local_numel"] <= r["model_numel"] / WORLD + 1000, r
        assert _increase(r) < 0.6 * full, f"rank {r['rank']}: the build added {_increase(r) / 2**20:.0f} MiB, the " \
                                          f"full fp32 model is {full / 2**20:.0f} MiB"
        assert 0.75 < planned / _increase(r) < 1.33, (planned / 2**20, _increase(r) / 2**20)


def test_full_build_holds_the_full_model(tmp_path):
    """The baseline the sharded build is measured against: the measure does see a full model."""
    ranks, planned = _startup(tmp_path, "--zero-stage", "3", "--set", "parallel.sharded_build=false")
    for r in ranks:
        assert r["local_numel"] == r["model_numel"]
        assert _increase(r) > 0.9 * 4 * r["model_numel"], r
        assert 0.75 < planned / _increase(r) < 1.33, (planned / 2**20, _increase(r) / 2**20)


def test_zero2_ep2_builds_its_experts_only(tmp_path):
    ranks, planned = _startup(tmp_path, "--zero-stage", "2", "--ep-size", "2")
    for r in ranks:
        assert r["local_numel"] < 0.6 * r["model_numel"], r  # 100m: 93% of the parameters are experts
        assert 0.75 < planned / _increase(r) < 1.33, (planned / 2**20, _increase(r) / 2**20)
