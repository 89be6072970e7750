"""--async-save: training continues while shards are written; checkpoints are complete, identical in
content to synchronous ones, and resume bitwise."""

from __future__ import annotations

import json
import shutil

import pytest

from moe_dist.checkpoint.manifest import verify_manifest

from .trainrun import by_step, losses, metrics, train

pytestmark = pytest.mark.distributed


def test_async_save_matches_sync_and_resumes(tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    train(sync, 2, "--max-steps", "6", "--save-every", "2")
    train(asyn, 2, "--max-steps", "6", "--save-every", "2", "--async-save")
    assert losses(sync) == losses(asyn)  # the background writes do not disturb training
    ck = asyn / "checkpoints"
    for step in (2, 4, 6):
        verify_manifest(ck / f"checkpoint_step_{step}")
        a = json.loads((ck / f"checkpoint_step_{step}" / "train_state.json").read_text())
        s = json.loads((sync / "checkpoints" / f"checkpoint_step_{step}" / "train_state.json").read_text())
        assert a["step"] == step and a["sampler"] == s["sampler"] and a["tokens"] == s["tokens"]
    assert (ck / "checkpoint_latest").resolve().name == "checkpoint_step_6"
    log = [json.loads(line) for line in (asyn / "checkpoint_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(r["mode"] == "async" for r in log)

    # resume from the step-4 checkpoint written in the background: bitwise the same continuation
    res = tmp_path / "resumed"
    (res / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck / "checkpoint_step_4", res / "checkpoints" / "checkpoint_step_4")
    train(res, 2, "--max-steps", "6", "--resume", "auto")
    a, b = by_step(metrics(sync)), by_step(metrics(res))
    assert [b[s]["loss"] for s in (5, 6)] == [a[s]["loss"] for s in (5, 6)]
