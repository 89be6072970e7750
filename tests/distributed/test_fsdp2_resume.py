"""One checkpoint, two engines (the default Muon optimizer: Muon momentum and AdamW moments).

* Same engine: an FSDP2 run resumed on its own layout continues bitwise.
* The chain: DeepSpeed ZeRO-2 EP 2 on 2 ranks saves at step 2; FSDP2 EP 1 on 3 ranks resumes it
  and saves at step 4; DeepSpeed ZeRO-3 EP 1 on 1 rank resumes that and runs to step 6. The tokens
  of every step equal the uninterrupted ZeRO-2 run's, the losses are within CHAIN_REL of it, and
  right after each load the engine holds exactly what the checkpoint held: every weight, AdamW
  moment and step, and Muon momentum, compared bitwise (``MOE_DIST_DUMP_LOADED`` saves what the
  engine holds through the checkpoint's own path).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moe_dist.checkpoint.reader import CheckpointReader

from .trainrun import by_step, metrics, train

pytestmark = pytest.mark.distributed

STEPS = 6
CHAIN_REL = 1e-4  # fp32; other world sizes and engines sum in other orders, and the FSDP2 leg runs
                  # Newton-Schulz in fp32 where DeepSpeed runs it in fp16 (test_fsdp2_equivalence.py)
FSDP2 = ("--engine", "fsdp2")


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder, whole."""
    md = CheckpointReader(folder).read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype, device="cpu")
           for k, m in md.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(out, storage_reader=CheckpointReader(folder), no_dist=True)
    return out


def _resume_from(src: Path, step: int, dst: Path, world: int, *args: str, dump: Path) -> dict[int, dict]:
    ck = f"checkpoint_step_{step}"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / ck, dst / "checkpoints" / ck, symlinks=True)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    train(dst, world, "--max-steps", str(STEPS), "--resume", "auto", *args, timeout=300,
          env={"MOE_DIST_DUMP_LOADED": str(dump)})
    return by_step(metrics(dst))


def _assert_loaded_exactly(saved_ckpt: Path, dumped: Path) -> None:
    saved, held = read_all(saved_ckpt), read_all(dumped)
    optim = [k for k in saved if k.startswith("optim.state.")]
    assert any(k.endswith(".momentum_buffer") for k in optim) and any(k.endswith(".exp_avg_sq") for k in optim)
    assert set(held) == set(saved), (sorted(set(saved) - set(held))[:5], sorted(set(held) - set(saved))[:5])
    for key, value in saved.items():
        assert torch.equal(held[key], value), f"{key} changed in the load"


def test_fsdp2_same_layout_resume_is_bitwise(tmp_path):
    ref = tmp_path / "ref"
    args = (*FSDP2, "--ep-size", "2")
    train(ref, 2, "--max-steps", str(STEPS), "--save-every", "3", *args)
    rows = _resume_from(ref, 3, tmp_path / "r", 2, *args, dump=tmp_path / "dump")
    want = by_step(metrics(ref))
    for s in range(4, STEPS + 1):
        assert rows[s]["tokens"] == want[s]["tokens"]
        assert rows[s]["loss"] == want[s]["loss"], f"step {s}: {rows[s]['loss']!r} != {want[s]['loss']!r}"
    _assert_loaded_exactly(ref / "checkpoints" / "checkpoint_step_3", tmp_path / "dump")


def test_cross_engine_chain(tmp_path):
    ref = tmp_path / "ds_z2_ep2_w2"
    train(ref, 2, "--max-steps", str(STEPS), "--save-every", "2", "--zero-stage", "2", "--ep-size", "2")
    want = by_step(metrics(ref))
    fsdp = tmp_path / "fsdp2_ep1_w3"
    rows_f = _resume_from(ref, 2, fsdp, 3, *FSDP2, "--save-every", "2", "--stop-at-step", "4",
                          dump=tmp_path / "dump_fsdp2")
    _assert_loaded_exactly(ref / "checkpoints" / "checkpoint_step_2", tmp_path / "dump_fsdp2")
    z3 = tmp_path / "ds_z3_w1"
    rows_z = _resume_from(fsdp, 4, z3, 1, "--zero-stage", "3", dump=tmp_path / "dump_z3")
    _assert_loaded_exactly(fsdp / "checkpoints" / "checkpoint_step_4", tmp_path / "dump_z3")
    got = {**{s: rows_f[s] for s in (3, 4)}, **{s: rows_z[s] for s in (5, 6)}}
    for s in range(3, STEPS + 1):
        assert got[s]["tokens"] == want[s]["tokens"], f"step {s}"
        assert abs(got[s]["loss"] - want[s]["loss"]) <= CHAIN_REL * abs(want[s]["loss"]), \
            f"step {s}: {got[s]['loss']} vs {want[s]['loss']}"
