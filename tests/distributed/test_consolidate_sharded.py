"""Checkpoints written by real sharded runs (ZeRO-2 + EP 2, and ZeRO-3, on 2 ranks) consolidate to a
file whose model reproduces the training model's logits at that step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_dist import load_model_for_inference

from .trainrun import train

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("args", [["--zero-stage", "2", "--ep-size", "2"], ["--zero-stage", "3"]],
                         ids=["zero2-ep2", "zero3"])
def test_consolidated_model_matches_training_logits(tmp_path, args):
    out, probe = tmp_path / "run", tmp_path / "probe.safetensors"
    train(out, 2, "--max-steps", "3", *args, env={"MOE_DIST_DUMP_LOGITS": str(probe)})
    ckpt = out / "checkpoints" / "checkpoint_latest"
    pt = tmp_path / "model.pt"
    res = subprocess.run([sys.executable, "-m", "moe_dist.export.consolidate_cli", str(ckpt), "-o", str(pt), "--verify"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    want = load_file(str(probe))
    for source in (pt, ckpt):  # the consolidated file, and the DCP folder directly
        model, cfg, step = load_model_for_inference(str(source))
        assert step == 3
        with torch.no_grad():
            logits, aux = model(want["tokens"], return_aux_loss=False)
        assert aux is None
        torch.testing.assert_close(logits, want["logits"], rtol=1e-5, atol=1e-5)
    sd = torch.load(pt, weights_only=True)
    assert set(sd) >= {"step", "model_state_dict", "config", "metrics"}
    assert sum(".experts." in k for k in sd["model_state_dict"]) == 2 * 8 * 3  # all 8 experts, global order
