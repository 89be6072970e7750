"""The GPU paths on a CPU machine: every tensor a run makes names its device.

A factory call without ``device=`` is harmless on CPU and a crash on a GPU (a CPU tensor beside CUDA
ones, or handed to an NCCL collective). ``MOE_DIST_STRICT_DEVICE=1`` makes the trainer, ``moe-consolidate``
and ``moe-generate`` set the default device to ``meta`` once their model is built, so such a tensor
fails here too (see ``moe_dist.debug.strict_device_from_env``). These tests run every path in that
mode: train steps under ZeRO-1/2/3 and FSDP2, EP 1/2, fp32 and bf16, with and without ``--async-save``,
evaluation, a save, a resume, consolidation and generation.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .harness import REPO_ROOT
from .trainrun import metrics, train

pytestmark = pytest.mark.distributed

STRICT = {"MOE_DIST_STRICT_DEVICE": "1"}

LAYOUTS = {
    "zero1-ep2-bf16": ["--zero-stage", "1", "--ep-size", "2", "--set", "parallel.precision=bf16"],
    "zero2-ep1-async": ["--zero-stage", "2", "--async-save"],
    "zero2-ep2": ["--zero-stage", "2", "--ep-size", "2"],
    "zero3-ep1-bf16": ["--zero-stage", "3", "--set", "parallel.precision=bf16"],
    "fsdp2-ep2-bf16": ["--engine", "fsdp2", "--ep-size", "2", "--set", "parallel.precision=bf16"],
    "fsdp2-ep1-async": ["--engine", "fsdp2", "--async-save"],
}


def _strict_train(out, *args):
    results = train(out, 2, "--max-steps", "4", "--save-every", "2", "--set", "train.eval_every=2", *args,
                    env=STRICT)
    return results[0].output


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_eval_save_resume_name_every_device(tmp_path, name):
    out = tmp_path / "run"
    first = _strict_train(out, "--stop-at-step", "2", *LAYOUTS[name])
    # The engine's parameters really are in that dtype; FSDP2's are its fp32 shards (bf16 is its compute dtype).
    dtype = "bfloat16" if "bf16" in name and not name.startswith("fsdp2") else "float32"
    assert f"optimizer muon, {dtype}" in first
    second = _strict_train(out, "--resume", "auto", *LAYOUTS[name])
    assert "resumed from" in second and "at step 2" in second
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r.get("val_loss") is not None for r in rows if r["step"] % 2 == 0)
    assert all(torch.isfinite(torch.tensor(r["loss"], device="cpu")) for r in rows)


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **STRICT, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=180,
                          env=env, cwd=str(REPO_ROOT))


def test_consolidate_and_generate_name_every_device(tmp_path):
    out = tmp_path / "run"
    train(out, 2, "--max-steps", "2", "--zero-stage", "2", "--ep-size", "2")
    ckpt = out / "checkpoints" / "checkpoint_latest"
    for dtype in ("fp32", "bf16"):
        pt = tmp_path / f"model-{dtype}.pt"
        res = _tool("moe_dist.export.consolidate_cli", str(ckpt), "-o", str(pt), "--dtype", dtype, "--verify", "-q")
        assert res.returncode == 0, res.stderr
        assert "identical" in res.stderr
    st = tmp_path / "st"
    for fmt, folder in (("safetensors", st), ("hf", tmp_path / "hf")):
        res = _tool("moe_dist.export.consolidate_cli", str(ckpt), "-o", str(folder), "--format", fmt, "-q")
        assert res.returncode == 0, res.stderr
    for source in (tmp_path / "model-fp32.pt", tmp_path / "model-bf16.pt", st, ckpt):
        res = _tool("moe_dist.export.inference", str(source), "--prompt", "def ", "--max-new-tokens", "8",
                    "--temperature", "0")
        assert res.returncode == 0, f"{source}: {res.stderr}"
        assert res.stdout.startswith("def ") and len(res.stdout) > len("def \n")
