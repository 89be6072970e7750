"""The non-finite guard on real gloo runs: ``--lr 1e6`` stops with the divergence code under DeepSpeed
(AdamW and Muon) and FSDP2, with one ``error:`` line, no non-finite checkpoint published and
``metrics.jsonl`` strict JSON; a checkpoint holding a NaN is skipped by ``--resume auto``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_dist import exit_codes
from moe_dist.checkpoint import layout
from moe_dist.checkpoint.cli import main as ckpt_main
from moe_dist.checkpoint.manifest import read_manifest, write_manifest

from .test_bad_inputs import error_line
from .trainrun import losses, train

pytestmark = pytest.mark.distributed


def _strict_rows(out: Path) -> list[dict]:
    def refuse(token: str) -> None:
        raise AssertionError(f"metrics.jsonl holds a bare {token}")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,args", [
    ("ds_adamw", ("--set", "train.optimizer=adamw")),
    ("ds_muon", ("--set", "train.adamw_lr=1e6")),
    ("fsdp2", ("--engine", "fsdp2", "--set", "train.optimizer=adamw")),
])
def test_lr_1e6_stops_with_the_divergence_code(tmp_path, name, args):
    out = tmp_path / name
    res = train(out, 2, *args, "--lr", "1e6", "--max-steps", "30", "--save-every", "1",
                "--set", "train.max_nonfinite_steps=2", check=False, stop_on_failure=False)
    # every rank decides from the same all-reduced norm, so every rank stops by itself with the code;
    # stop_on_failure=False, or the harness kills the slower rank the moment the faster one exits
    assert [r.returncode for r in res] == [exit_codes.DIVERGED] * 2, res[0].output[-3000:]
    line = error_line(res[0].output)
    assert line.startswith("error: training diverged at step ") and "2 non-finite step(s) in a row" in line
    rows = _strict_rows(out)
    bad = [r for r in rows if r.get("nonfinite")]
    assert len(bad) == 2 and bad[-1]["step"] == rows[-1]["step"]  # the stopping step has its row
    assert all(not math.isfinite(float(r["loss"])) or not math.isfinite(float(r["grad_norm"])) for r in bad)
    root = out / "checkpoints"
    saved = layout.complete_checkpoints(root)
    assert saved, "the finite steps before the blow-up are saved"
    for _, folder in saved:  # every published checkpoint is finite, and says so
        assert read_manifest(folder)["finite"] is True
        assert ckpt_main(["verify", str(folder)]) == 0
    assert max(s for s, _ in saved) < bad[0]["step"]


def _poison(folder: Path) -> None:
    """Write a NaN into one saved tensor of ``folder`` and rewrite its manifest, so only a scan can tell."""
    reader_sd = {}
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for key, meta in md.items():
        if hasattr(meta, "size") and meta.properties.dtype.is_floating_point:
            reader_sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(reader_sd, checkpoint_id=str(folder), no_dist=True)
    victim = next(k for k in reader_sd if k.startswith("model.") and reader_sd[k].numel() > 1)
    reader_sd[victim].view(-1)[0] = float("nan")
    for p in folder.glob("*.distcp"):
        p.unlink()
    (folder / ".metadata").unlink()
    dcp.save(reader_sd, checkpoint_id=str(folder), no_dist=True)
    m = read_manifest(folder)
    write_manifest(folder, {k: v for k, v in m.items() if k not in ("format", "format_version", "hash", "files")})


def test_resume_auto_skips_a_nan_checkpoint(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(ref, 2, "--max-steps", "6")
    train(run, 2, "--max-steps", "4", "--save-every", "2")
    poisoned = run / "checkpoints" / "checkpoint_step_4"
    _poison(poisoned)
    assert ckpt_main(["verify", str(poisoned)]) == 1
    res = train(run, 2, "--max-steps", "6", "--save-every", "2", "--resume", "auto")
    text = res[0].output
    assert "--resume auto: skipping " in text and "non-finite values (NaN or inf)" in text, text[-3000:]
    assert "resumed from" in text and "checkpoint_step_2 at step 2" in text
    assert losses(run) == losses(ref)
