"""CPU offload: ZeRO-2 with optimizer offload (world 2), ZeRO-3 with parameter + optimizer offload
(world 1, the single-4090 layout) and the same with EP 2 (world 2) train, and agree with each other
and with the no-offload run."""

from __future__ import annotations

import pytest

from .trainrun import losses, train

pytestmark = pytest.mark.distributed


def test_offload_layouts_train_and_agree(tmp_path):
    # The first offload run in a new environment JIT-builds DeepSpeed's CPU Adam (~1 min, more on a
    # loaded machine): a generous timeout for it.
    train(tmp_path / "z2", 2, "--zero-stage", "2", "--max-steps", "5")
    train(tmp_path / "z2off", 2, "--zero-stage", "2", "--offload-optimizer", "--max-steps", "5", timeout=900)
    train(tmp_path / "z3off", 1, "--zero-stage", "3", "--offload-optimizer", "--offload-params", "--max-steps", "5",
          timeout=600)
    train(tmp_path / "z3epoff", 2, "--zero-stage", "3", "--ep-size", "2", "--offload-optimizer", "--offload-params",
          "--max-steps", "5", timeout=600)
    base, z2, z3 = losses(tmp_path / "z2"), losses(tmp_path / "z2off"), losses(tmp_path / "z3off")
    z3ep = losses(tmp_path / "z3epoff")
    assert z3[-1] < z3[0] - 0.3 and z2[-1] < z2[0] - 0.3
    for a, b, c in zip(z2, z3, z3ep):  # all use DeepSpeedCPUAdam for the AdamW half, on other layouts
        assert abs(a - b) < 1e-4 and abs(a - c) < 1e-4
    for a, b in zip(base, z2):  # torch AdamW vs DeepSpeedCPUAdam: same maths, other kernels
        assert abs(a - b) < 1e-3
