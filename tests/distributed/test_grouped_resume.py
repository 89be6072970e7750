"""A checkpoint written before experts were stacked (one ``nn.Linear`` per expert, a Python loop;
``tests/fixtures/loop_layout_ckpt``) resumes in today's stacked layout: bitwise on the topology that
wrote it (1 rank, ZeRO-2, Muon, EP 1), under the grouped and the loop kernel alike, and within the
resharding bound of ``test_resume_layouts.py`` under ZeRO-2 + EP 2 on 2 ranks.

The bitwise case needs the grouped GEMM to compute exactly what the per-expert ``nn.Linear`` did
(true for ``torch._grouped_mm`` on this CPU in fp32) and DeepSpeed's Muon on a stacked matrix tagged
``is_expert_group`` to equal its 2-D update of each expert; the losses of steps 4-6 would differ
otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .trainrun import by_step, metrics, train

pytestmark = pytest.mark.distributed

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "loop_layout_ckpt"
STEP, STEPS = 3, 6
RESHARD_REL = 1e-4  # test_resume_layouts.py's bound for another layout


def _recorded() -> dict[int, dict]:
    return by_step([json.loads(line) for line in (FIXTURE / "metrics_loop_layout.jsonl").read_text().splitlines()])


def _resume(out: Path, world: int, *args: str) -> dict[int, dict]:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(FIXTURE / f"checkpoint_step_{STEP}", out / "checkpoints" / f"checkpoint_step_{STEP}")
    rows = [r for s, r in sorted(_recorded().items()) if s <= STEP]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(out, world, "--max-steps", str(STEPS), "--resume", "auto", *args, timeout=300)
    return by_step(metrics(out))


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_loop_layout_checkpoint_resumes_bitwise(tmp_path, kernel):
    rows, want = _resume(tmp_path / "r", 1, "--set", f"parallel.expert_kernel={kernel}"), _recorded()
    assert sorted(rows) == list(range(1, STEPS + 1))
    for s in range(STEP + 1, STEPS + 1):
        assert rows[s]["tokens"] == want[s]["tokens"]
        assert rows[s]["loss"] == want[s]["loss"], f"step {s}: {rows[s]['loss']!r} != {want[s]['loss']!r}"


def test_loop_layout_checkpoint_resumes_under_ep2(tmp_path):
    rows, want = _resume(tmp_path / "r", 2, "--ep-size", "2"), _recorded()
    for s in range(STEP + 1, STEPS + 1):
        assert rows[s]["tokens"] == want[s]["tokens"]
        assert abs(rows[s]["loss"] - want[s]["loss"]) <= RESHARD_REL * abs(want[s]["loss"]), \
            f"step {s}: {rows[s]['loss']} vs {want[s]['loss']}"


@pytest.mark.parametrize("world, args", [(2, ("--engine", "fsdp2")), (1, ("--zero-stage", "3"))],
                         ids=["fsdp2-dp2", "zero3"])
def test_loop_layout_checkpoint_resumes_under_other_engines(tmp_path, world, args):
    """The same pre-stacking checkpoint continues under FSDP2 (its own Muon, fp32 Newton-Schulz) and
    ZeRO-3 (DeepSpeed's Muon without reduce-scatter), within the cross-engine bound of
    ``test_fsdp2_resume.py``."""
    from .test_fsdp2_resume import CHAIN_REL

    rows, want = _resume(tmp_path / "r", world, *args), _recorded()
    assert sorted(rows) == list(range(1, STEPS + 1))
    for s in range(STEP + 1, STEPS + 1):
        assert rows[s]["tokens"] == want[s]["tokens"]
        assert abs(rows[s]["loss"] - want[s]["loss"]) <= CHAIN_REL * abs(want[s]["loss"]), \
            f"step {s}: {rows[s]['loss']} vs {want[s]['loss']}"
