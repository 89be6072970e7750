"""bf16 end to end on CPU: DeepSpeed's bf16 (bf16 parameters and activations, fp32 masters and
optimizer states) trains, saves, resumes (an fp32 checkpoint too) and stays close to fp32.

The bound: over 20 steps of the tiny model (world 2, ZeRO-2), bf16 losses sat at most 7.3e-4
(relative) from fp32 with Muon and 5.7e-4 with AdamW, mean 2.9e-4 and 2.2e-4 (measured 2026-11-30:
the two runs of the first test, and the same with ``--set train.optimizer=adamw``). The test allows
3e-3, about 4x the worst measured step; a bf16 run that silently ran in fp32 is caught by the
opposite check (not equal).
"""

from __future__ import annotations

import shutil

import pytest

from .trainrun import losses, metrics, train

pytestmark = pytest.mark.distributed

STEPS, HALF = 20, 10
BF16_REL_BOUND = 3e-3


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


@pytest.fixture(scope="module")
def fp32_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "fp32"
    train(out, 2, "--max-steps", str(STEPS), "--save-every", str(HALF), "--set", "parallel.precision=fp32",
          timeout=400)
    return out


def test_bf16_losses_stay_within_the_measured_bound_of_fp32(fp32_ref, tmp_path):
    out = tmp_path / "bf16"
    first = train(out, 2, "--max-steps", str(STEPS), "--set", "parallel.precision=bf16", timeout=400)[0].output
    assert "optimizer muon, bfloat16" in first
    ref, got = losses(fp32_ref), losses(out)
    assert len(got) == STEPS
    gaps = [_rel(a, b) for a, b in zip(ref, got)]
    assert max(gaps) <= BF16_REL_BOUND, f"bf16 vs fp32 relative loss gaps {gaps}"
    assert max(gaps) > 1e-6, "bf16 losses equal fp32's: the run did not compute in bf16"
    assert got[-1] < got[0] - 1.0  # it learns


def test_fp32_checkpoint_resumes_into_bf16(fp32_ref, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(fp32_ref / "checkpoints" / f"checkpoint_step_{HALF}",
                    out / "checkpoints" / f"checkpoint_step_{HALF}", symlinks=True)
    shutil.copy(fp32_ref / "metrics.jsonl", out / "metrics.jsonl")
    log = train(out, 2, "--max-steps", str(STEPS), "--resume", "auto", "--set", "parallel.precision=bf16",
                timeout=400)[0].output
    assert f"at step {HALF}" in log and "bfloat16" in log
    ref, got = {r["step"]: r for r in metrics(fp32_ref)}, {r["step"]: r for r in metrics(out)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(HALF + 1, STEPS + 1):
        assert got[s]["tokens"] == ref[s]["tokens"]
        assert _rel(ref[s]["loss"], got[s]["loss"]) <= BF16_REL_BOUND, (s, ref[s]["loss"], got[s]["loss"])
