"""Checkpoints cross sharding layouts: ZeRO-3 + EP 2 (world 4), ZeRO-2 + EP 2 (world 2) and
ZeRO-1 + EP 1 (world 3) each resume from each other's checkpoint (the default Muon optimizer).

One uninterrupted run per layout saves at step HALF and is the reference; a resume copies that
step-HALF checkpoint into a fresh run folder. Same layout: bitwise equal to the reference. Another
layout: the same tokens, losses within RESHARD_REL of the source's reference (as test_resume.py:
another layout sums gradients in another order, and Muon carries the rounding on). Every save is
expert-audited by the checkpoint manager; the test audits the sources again from their metadata.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moe_dist.checkpoint.audit import audit_experts
from moe_dist.config import apply_overrides, get_preset

from .trainrun import by_step, metrics, train

# 3 reference runs and 9 resumes on up to 4 ranks (~7 min here): in the slow set, which .ci/run runs too.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, HALF = 6, 3
RESHARD_REL = 1e-4
LAYOUTS = {
    "z3ep2w4": (4, ["--zero-stage", "3", "--ep-size", "2"]),
    "z2ep2w2": (2, ["--zero-stage", "2", "--ep-size", "2"]),
    "z1ep1w3": (3, ["--zero-stage", "1"]),
}
FAST_MODEL = apply_overrides(get_preset("tiny"), {  # trainrun.FAST's model
    "model.d_model": 64, "model.d_ff": 64, "model.n_heads": 2, "model.max_seq_len": 32, "train.seq_len": 32}).model
PAIRS = [(a, b) for a in LAYOUTS for b in LAYOUTS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """layout -> its uninterrupted run folder (with a checkpoint at HALF), built on first use."""
    base, done = tmp_path_factory.mktemp("layouts"), {}

    def get(name: str) -> Path:
        if name not in done:
            world, args = LAYOUTS[name]
            train(base / name, world, "--max-steps", str(STEPS), "--save-every", str(HALF), *args, timeout=400)
            done[name] = base / name
        return done[name]
    return get


def _resume(src: Path, dst: Path, layout: str) -> dict[int, dict]:
    ck = f"checkpoint_step_{HALF}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / ck, dst / "checkpoints" / ck, symlinks=True)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    world, args = LAYOUTS[layout]
    train(dst, world, "--max-steps", str(STEPS), "--resume", "auto", *args, timeout=400)
    return by_step(metrics(dst))


@pytest.mark.parametrize("src, dst", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_resume_across_layouts(reference, tmp_path, src, dst):
    ref = reference(src)
    audit_experts(ref / "checkpoints" / f"checkpoint_step_{HALF}", FAST_MODEL)  # each global expert once, whole
    rows, want = _resume(ref, tmp_path / "r", dst), by_step(metrics(ref))
    assert sorted(rows) == list(range(1, STEPS + 1))
    for s in range(HALF + 1, STEPS + 1):
        assert rows[s]["tokens"] == want[s]["tokens"]  # no sample repeated or skipped
        if src == dst:
            assert rows[s]["loss"] == want[s]["loss"], f"step {s}: {rows[s]['loss']!r} != {want[s]['loss']!r}"
        else:
            assert abs(rows[s]["loss"] - want[s]["loss"]) <= RESHARD_REL * abs(want[s]["loss"]), \
                f"step {s}: {rows[s]['loss']} vs {want[s]['loss']}"
