"""A seed checkpoint imported with ``moe-ckpt import-seed`` resumes and trains under DeepSpeed ZeRO-2
EP 2 on 2 ranks, ZeRO-3 on 1 rank and FSDP2 on 2 ranks: loss finite and falling, the metrics rows
continuing the seed's optimizer-step count."""

from __future__ import annotations

import math

import pytest

from moe_dist.seed.importer import import_seed

from ..seed_fixture import make_seed_checkpoint
from .harness import check_ranks, run_ranks
from .trainrun import CPU_JSON, TRAIN, metrics

pytestmark = pytest.mark.distributed

START, MORE = 30, 6  # the seed's optimizer steps, steps trained after the import


def _import_and_resume(tmp_path, world, *layout):
    src, run = tmp_path / "checkpoint_step_60.pt", tmp_path / "run"
    make_seed_checkpoint(src, opt_steps=START)
    import_seed(str(src), str(run), {"data.max_corpus_bytes": 300000, "train.eval_every": 0}, log=lambda _l: None)
    engine = [] if "fsdp2" in layout else ["--deepspeed-config", CPU_JSON]
    argv = [TRAIN, *engine, "--config", str(run / "config.yaml"), "--output-dir", str(run), "--resume", "auto",
            "--stop-at-step", str(START + MORE), *layout]
    check_ranks(run_ranks(argv, world, 240, env={"TORCHDYNAMO_DISABLE": "1"}))
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(START, START + MORE + 1))  # the import's row, then each step
    losses = [r["loss"] for r in rows[1:]]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    assert rows[1]["tokens"] == rows[0]["tokens"] + 4 * 32  # tokens continue from the seed's


@pytest.mark.parametrize("world, layout", [
    (2, ("--zero-stage", "2", "--ep-size", "2")),
    pytest.param(1, ("--zero-stage", "3"), marks=pytest.mark.slow),
    pytest.param(2, ("--engine", "fsdp2"), marks=pytest.mark.slow),
], ids=["zero2-ep2-w2", "zero3-w1", "fsdp2-w2"])
def test_imported_seed_checkpoint_resumes_and_trains(tmp_path, world, layout):
    _import_and_resume(tmp_path, world, *layout)
